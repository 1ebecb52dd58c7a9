"""rdn.config: typed frozen configs, JSON round trip with a version, migrations, differences, generated CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from rdn.config import Config, ConfigError, add_config_arguments, config_from_arguments, setting
from rdn.surgery import NestConfig
from rdn.train import TrainConfig


@dataclass(frozen=True)
class Inner(Config):
    size: int = setting(3, "an inner size")


@dataclass(frozen=True)
class Example(Config):
    VERSION: ClassVar[int] = 3
    # v1 had "width" only; v2 added "depth" (default 2); v3 renamed "width" to "channels".
    MIGRATIONS: ClassVar[dict] = {
        1: lambda values: {**values, "depth": 2},
        2: lambda values: {"channels": values.pop("width"), **values},
    }

    channels: int = setting(8, "channels of the first layer")
    depth: int = setting(2, "number of blocks")
    mode: str = setting("expand", "how", choices=("expand", "truncate"))
    scales: tuple[float, ...] = setting((1.0, 0.5), "scales")
    budget: float | None = setting(None, "a budget")
    exact: bool = setting(True, "exact")
    inner: Inner = setting(Inner(), "nested config", cli=False)
    hidden: int = setting(0, "not on the command line", cli=False)


def test_round_trip_through_json_keeps_types():
    config = Example(channels=4, scales=(2.0,), budget=1.5, inner=Inner(5))
    text = config.to_json()
    assert json.loads(text)["kind"] == "Example" and json.loads(text)["version"] == 3
    again = Example.from_json(text)
    assert again == config and isinstance(again.scales, tuple) and isinstance(again.inner, Inner)


def test_frozen_and_replace_checks_again():
    config = Example()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.depth = 3
    assert config.replace(depth=5).depth == 5 and config.depth == 2
    with pytest.raises(ConfigError, match=r"mode must be one of \['expand', 'truncate'\], got 'sideways'"):
        config.replace(mode="sideways")


def test_older_versions_are_migrated_and_future_or_foreign_ones_refused():
    assert Example.from_dict({"kind": "Example", "version": 1, "width": 16}) == Example(channels=16, depth=2)
    assert Example.from_dict({"version": 2, "width": 16, "depth": 7}) == Example(channels=16, depth=7)
    with pytest.raises(ConfigError, match=r"Example version 4 cannot be read by this rdn \(versions 1..3\)"):
        Example.from_dict({"version": 4})
    with pytest.raises(ConfigError, match="expected a Example, got a TrainConfig"):
        Example.from_dict(TrainConfig().to_dict())
    with pytest.raises(ConfigError, match=r"unknown Example fields \['colour'\]"):
        Example.from_dict({"version": 3, "colour": "red"})


def test_differences_name_the_fields():
    a, b = Example(), Example(depth=3, budget=1.2)
    assert a.differences(b) == ["depth", "budget"] and a.differences(b, ignore=["budget"]) == ["depth"]
    assert b.describe_differences(a) == "depth: 2 -> 3, budget: None -> 1.2"
    with pytest.raises(ConfigError, match="cannot compare"):
        a.differences(TrainConfig())


def test_cli_is_generated_from_the_config():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Example, defaults={"depth": 4})
    text = parser.format_help()
    assert "--channels CHANNELS" in text and "(default: 8)" in text and "(default: 4)" in text
    assert "--exact, --no-exact" in text and "(default: not set)" in text and "--hidden" not in text
    arguments = parser.parse_args(["--channels", "2", "--no-exact", "--scales", "1", "3", "--mode", "truncate"])
    config = config_from_arguments(Example, arguments, defaults={"depth": 4}, budget=0.5)
    assert config == Example(channels=2, depth=4, exact=False, scales=(1.0, 3.0), mode="truncate", budget=0.5)
    assert config_from_arguments(Example, parser.parse_args([])) == Example()  # nothing given: class defaults
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "sideways"])


def test_train_config_is_a_versioned_config():
    config = TrainConfig(epochs=3, exit_weights=[1, 2])
    assert config.exit_weights == (1.0, 2.0)
    assert TrainConfig.from_dict(config.to_dict()) == config
    # What checkpoints before versioned configs stored: the plain fields, no kind or version.
    legacy = {key: value for key, value in config.to_dict().items() if key not in ("kind", "version")}
    assert TrainConfig.from_dict(legacy) == config


def test_nest_config_checks_its_options_by_name():
    config = NestConfig(k=3, exact=False, copy_fraction=0.25, skip=["stem"])
    assert config.skip == ("stem",) and config.num_subnets == 5
    assert NestConfig.from_dict(json.loads(config.to_json())) == config
    for changes, error, pattern in (
        ({"k": 0}, ValueError, "k .* must be >= 1"),
        ({"mode": "sideways"}, ConfigError, "mode must be one of"),
        ({"copy_fraction": 0.5, "exact": True}, ValueError, "copy_fraction < 1 .* exact=False"),
        ({"mac_budget": 1.1, "mode": "truncate"}, ValueError, "mac_budget drops blocks"),
        ({"mac_budget": 1.5, "exact": True}, ValueError, "exact=True .* takes no mac_budget"),
        ({"activation_budget": 0.9}, ValueError, "activation_budget .* must be >= 1"),
        ({"activation_budget": "1.1"}, TypeError, "activation_budget must be a finite number"),
        ({"activation_budget": 1.3, "exact": True}, ValueError, "activation_budget bounds the copy_fraction"),
        ({"activation_budget": 1.3, "mac_budget": None}, ValueError, "activation_budget bounds the copy_fraction"),
        ({"activation_budget": 1.3, "copy_fraction": 0.5}, ValueError, "copy_fraction not set"),
        ({"compensate": "yes"}, TypeError, "compensate must be a bool or None"),
        ({"compensate": True, "copies": "sum"}, ValueError, "compensate=True needs copies='latest'"),
        ({"skip": -1}, ValueError, "skip .* must be >= 0"),
        ({"depth_split": True}, TypeError, "depth_split must be"),
    ):
        with pytest.raises(error, match=pattern):
            NestConfig(**changes)


def test_nest_config_defaults_to_the_budget_and_exact_takes_none():
    """The default is the MAC budget's search (1.2x the base); exact or truncate drop the default budget,
    and a version-1 dict (before the budget was the first knob) keeps the exact surgery it meant."""
    default = NestConfig()
    assert (default.exact, default.mac_budget, default.copy_fraction, default.compensate) == (False, 1.2, None, None)
    assert default.activation_budget == 1.1
    exact = NestConfig(exact=True)
    assert (exact.mac_budget, exact.copy_fraction, exact.compensate) == (None, None, None)  # unset stays unset
    # the feature-map bound belongs to the search: dropped wherever the MAC budget is
    assert exact.activation_budget is NestConfig(mode="truncate").activation_budget is None
    assert NestConfig(mac_budget=None).activation_budget is None
    assert NestConfig(copy_fraction=0.5).activation_budget is None  # a fixed fraction leaves it nothing to bound
    assert exact.resolved() == exact.replace(copy_fraction=1.0, compensate=False)  # what the surgery uses
    assert NestConfig(mode="truncate").mac_budget is None
    # a preset that nests exactly leaves the choices open for a run that turns exact off and sets a budget
    assert NestConfig(exact=True).replace(exact=False, mac_budget=1.2).copy_fraction is None
    assert NestConfig.from_dict(json.loads(default.to_json())) == default
    version_1 = {key: value for key, value in NestConfig(k=3).to_dict().items()
                 if key not in ("exact", "mac_budget", "copy_fraction", "compensate", "activation_budget")}  # fmt: skip
    read = NestConfig.from_dict({**version_1, "version": 1})
    assert (read.exact, read.mac_budget, read.copy_fraction, read.compensate) == (True, None, 1.0, False)
    # version 2 (the MAC budget alone) keeps meaning that: its searches had no feature-map bound
    version_2 = {key: value for key, value in default.to_dict().items() if key != "activation_budget"}
    read = NestConfig.from_dict({**version_2, "version": 2})
    assert (read.mac_budget, read.activation_budget) == (1.2, None)


def test_a_budget_the_pipeline_would_ignore_is_refused():
    """rdn pipeline's presets nest exactly, which takes no budget: --mac-budget alone is an error naming --no-exact."""
    from rdn.cli import build_parser
    from rdn.experiments.config import from_arguments

    arguments = build_parser().parse_args(["pipeline", "--data", "synthetic", "--mac-budget", "1.2"])
    with pytest.raises(ConfigError, match="add --no-exact"):
        from_arguments(arguments)
    arguments = build_parser().parse_args(["pipeline", "--data", "synthetic", "--no-exact", "--mac-budget", "1.2"])
    assert from_arguments(arguments).nest.mac_budget == 1.2
    assert from_arguments(arguments).nest.activation_budget is None  # the preset's: none
    arguments = build_parser().parse_args(["pipeline", "--data", "synthetic", "--activation-budget", "1.1"])
    with pytest.raises(ConfigError, match="activation_budget=1.1 applies to expand mode without exact"):
        from_arguments(arguments)
    arguments = build_parser().parse_args(["pipeline", "--data", "synthetic", "--no-exact", "--mac-budget", "1.2",
                                           "--activation-budget", "1.1"])  # fmt: skip
    assert from_arguments(arguments).nest.activation_budget == 1.1
