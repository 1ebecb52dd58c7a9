"""The typed record of an RDN (``NestRecord``) and ``nest``'s two ways of taking options."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rdn.config import ConfigError
from rdn.surgery import NestConfig, NestRecord, RussianDollNet, nest
from tests.surgery.toys import toy

CALIB = torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def pruned() -> RussianDollNet:
    return nest(toy(), k=3, calib=CALIB, skip=["stem"], exact=False, mac_budget=1.2, copy_fraction=1.0,
                compensate=False, base={"name": "toy"}).eval()  # fmt: skip


def test_keywords_and_config_give_the_same_network():
    by_keywords = nest(toy(), k=3, mode="truncate", select="random", seed=4, calib=CALIB, skip=["stem"])
    options = NestConfig(k=3, mode="truncate", select="random", seed=4, skip=("stem",))
    by_config = nest(toy(), calib=CALIB, config=options)
    assert by_config.record == by_keywords.record
    # the skipped layers themselves, and the choices as the surgery used them
    assert by_config.record.config == options.replace(skip=("stem.0",)).resolved()
    with pytest.raises(TypeError, match="not both; got config= and {'k': 2}"):
        nest(toy(), k=2, calib=CALIB, config=options)
    with pytest.raises(TypeError, match="config must be a NestConfig"):
        nest(toy(), calib=CALIB, config={"k": 3})


def test_modules_and_indices_are_recorded_as_names():
    model = toy()
    net = nest(model, k=3, calib=CALIB, skip=[model.stem], depth_split=model.body[2])
    assert net.record.config.skip == ("stem.0",) and net.record.config.depth_split == "body.2"
    with pytest.raises(ValueError, match="skip entry .* is not a sub-module"):
        nest(model, k=3, calib=CALIB, skip=[nn.Conv2d(3, 3, 1)])


def test_record_round_trip(pruned):
    record = pruned.record
    assert record.pruned_blocks and record.ties == {"select": record.ties["select"], "mac_budget": {}}
    again = NestRecord.from_json(json.dumps(record.to_dict()))
    assert again == record and isinstance(again.orders[next(iter(again.orders))], tuple)
    assert len(record.search) == 1 and record.search[0]["copy_fraction"] == 1.0  # the one candidate, scored
    # the version-1 view has no search
    assert NestRecord.read(json.loads(json.dumps(pruned.rdn_config))) == record.replace(search=None)
    with pytest.raises(ValueError, match="resolved to module names"):
        NestRecord(record.config.replace(depth_split=2), record.input_shape, record.orders, {})


def test_rdn_config_is_a_read_only_view(pruned):
    view = pruned.rdn_config
    assert view["version"] == 1 and view["mac_budget"] == 1.2 and view["pruned_blocks"]
    view["k"] = 7
    view["ties"]["select"].setdefault("x", []).append(0)
    assert pruned.rdn_config["k"] == 3 and pruned.record.config.k == 3 and "x" not in pruned.record.ties["select"]


def test_version_1_dicts_are_migrated(pruned):
    """An rdn_config written before typed records (no select, seed, mac_budget, pruned_blocks,
    copy_fraction, compensate or ties) means those settings' defaults."""
    first_keys = ("version", "k", "mode", "exact", "copies", "skip", "input_shape", "orders", "base")
    early = {key: value for key, value in pruned.rdn_config.items() if key in first_keys}
    record = NestRecord.read(early)
    # version 1's defaults: no budget, every copy, no refit (NestConfig's version-1 migration)
    assert record.config == NestConfig(k=3, exact=False, mac_budget=None, copy_fraction=1.0, compensate=False,
                                       skip=("stem.0",))  # fmt: skip
    assert record.pruned_blocks == {} and record.ties is None and record.base == {"name": "toy"}
    assert record.differences(pruned.record) == ["mac_budget", "pruned_blocks", "ties", "search"]
    rebuilt = RussianDollNet.from_config(early, model=toy())
    assert rebuilt.record == record
    with pytest.raises(ConfigError, match=r"misses the keys \['orders'\]"):
        NestRecord.read({key: value for key, value in early.items() if key != "orders"})
    with pytest.raises(ConfigError, match="version 3 cannot be read"):
        NestRecord.read({**pruned.record.to_dict(), "version": 3})
    with pytest.raises(ValueError, match="mode must be one of"):  # the options are checked by NestConfig
        NestRecord.read({**early, "mode": "grow"})
    with pytest.raises(TypeError, match="config must be a NestRecord or the dict"):
        RussianDollNet.from_config([early])
