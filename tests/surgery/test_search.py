"""The MAC budget's search (rdn/surgery/search.py): nest's default chooses copies, blocks and compensation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rdn.models.profile import profile_model
from rdn.surgery import NestConfig, RussianDollNet, nest
from rdn.surgery.costs import activation_ratio
from rdn.surgery.passes.budget import BudgetOutOfReach
from rdn.surgery.search import (
    BudgetWarning,
    CandidateCosts,
    FeatureMapsOutOfReach,
    logit_error,
    scoring_split,
    search_construction,
)
from tests.surgery.toys import toy

CALIB = torch.randn(40, 3, 10, 10, generator=torch.Generator().manual_seed(3))  # 30 to build on, 10 to score


@pytest.fixture(scope="module")
def searched() -> RussianDollNet:
    return nest(toy(), k=3, calib=CALIB, skip=["stem"]).eval()


def test_default_nest_searches_within_the_budget_and_keeps_the_least_error(searched):
    record, base = searched.record, toy().eval()
    base_macs = profile_model(base, (1, 3, 10, 10)).macs
    assert record.config.mac_budget == 1.2 and not record.config.exact
    assert searched.macs(searched.num_subnets) <= 1.2 * base_macs
    assert record.config.activation_budget is None  # the chosen copy_fraction is fixed in the record
    tried = {(c["copy_fraction"], c["compensate"]) for c in record.search}
    assert tried == {(f, c) for f in (1.0, 0.75, 0.5, 0.25, 0.125) for c in (False, True)}
    fitting = [c for c in record.search if c["logit_error"] is not None]
    best = min(fitting, key=lambda c: (c["logit_error"], c["mac_ratio"]))
    assert (record.config.copy_fraction, record.config.compensate) == (best["copy_fraction"], best["compensate"])
    assert all(c["mac_ratio"] <= 1.2 and c["activation_ratio"] <= 1.1 for c in fitting)
    # this toy nests most of its layers: only the fewest copies fit 1.1x the feature maps; the others say why
    too_wide = [c for c in record.search if c["logit_error"] is None]
    assert too_wide and all("activation_budget=1.1 is out of reach" in c["note"] for c in too_wide)
    assert {c["copy_fraction"] for c in fitting} == {0.125}
    assert best["activation_ratio"] == pytest.approx(
        activation_ratio(searched.plan, searched.num_subnets))
    # the recorded score is N_K's logit error on the held-out quarter, recomputed here from first principles
    held_out = CALIB[-10:]
    with torch.no_grad():
        z, z_base = searched(held_out, subnet=searched.num_subnets).double(), base(held_out).double()
    expected = float((z - z_base).pow(2).sum() / (z_base - z_base.mean(0)).pow(2).sum())
    assert best["logit_error"] == pytest.approx(expected, rel=1e-4)
    assert best["mac_ratio"] == pytest.approx(searched.macs(searched.num_subnets) / base_macs)


def test_the_chosen_network_is_rebuilt_from_its_record(searched):
    rebuilt = RussianDollNet.from_config(json.loads(json.dumps(searched.record.to_dict())), model=toy(seed=11))
    rebuilt.load_state_dict(searched.state_dict())
    assert rebuilt.record == searched.record
    with torch.no_grad():
        for a, b in zip(rebuilt.eval()(CALIB[:4]), searched(CALIB[:4]), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_set_options_restrict_the_search():
    net = nest(toy(), k=3, calib=CALIB, skip=["stem"], copy_fraction=0.5)  # its feature maps: the user's choice
    assert {c["copy_fraction"] for c in net.record.search} == {0.5} and len(net.record.search) == 2
    net = nest(toy(), k=3, calib=CALIB, skip=["stem"], compensate=False)
    assert {c["compensate"] for c in net.record.search} == {False} and len(net.record.search) == 5
    assert not net.record.config.compensate
    assert nest(toy(), k=3, calib=CALIB, skip=["stem"], exact=True).record.search is None
    assert nest(toy(), k=3, calib=CALIB, skip=["stem"], mac_budget=None).record.search is None
    assert nest(toy(), calib=CALIB, config=NestConfig(k=3, skip=("stem",))).record.search is not None


def test_the_activation_budget_bounds_the_feature_maps_and_none_lifts_it():
    """Without the feature-map bound every fraction fits 1.2x the MACs; with a looser one, the fractions under it."""
    unbounded = nest(toy(), k=3, calib=CALIB, skip=["stem"], compensate=False, activation_budget=None)
    ratios = {c["copy_fraction"]: c["activation_ratio"] for c in unbounded.record.search}
    assert unbounded.record.config.activation_budget is None and None not in ratios.values()
    assert ratios[1.0] > ratios[0.75] > ratios[0.5] > ratios[0.25] > ratios[0.125] > 1  # copies are feature maps
    bound = (ratios[0.5] + ratios[0.25]) / 2
    bounded = nest(toy(), k=3, calib=CALIB, skip=["stem"], compensate=False, activation_budget=bound)
    fitting = {c["copy_fraction"] for c in bounded.record.search if c["logit_error"] is not None}
    assert fitting == {0.25, 0.125} and bounded.record.config.copy_fraction in fitting
    with pytest.warns(BudgetWarning, match="activation_budget=1.0 is out of reach for every copy fraction"):
        cheapest = nest(toy(), k=3, calib=CALIB, skip=["stem"], compensate=False, activation_budget=1.0)
    assert cheapest.record.config.copy_fraction == 0.125


def test_logit_error_and_the_scoring_split():
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert logit_error(z, z) == 0
    assert logit_error(z.mean(0).expand_as(z), z) == pytest.approx(1.0)  # the mean logits: none of the variance
    constant = torch.ones(3, 4)
    assert logit_error(2 * constant, constant) == pytest.approx(1.0)  # no spread: relative to the logits' size
    build, score = scoring_split(torch.arange(40))
    assert build.tolist() == list(range(30)) and score.tolist() == list(range(30, 40))
    build, score = scoring_split(torch.arange(20))  # a quarter would be 5 images: score on all of them
    assert build.shape[0] == score.shape[0] == 20


class _Constant(nn.Module):
    """A stand-in network whose N_K returns fixed logits."""

    num_subnets = 1

    def __init__(self, logits: torch.Tensor, ratio: float, repeated: int = 0) -> None:
        super().__init__()
        self.logits, self.ratio, self.repeated = logits, ratio, repeated

    def forward(self, x: torch.Tensor, subnet: int | None = None) -> torch.Tensor:
        return self.logits


def measure(net: _Constant) -> CandidateCosts:
    return CandidateCosts(net.ratio, 1.0, net.repeated)


def test_equal_errors_go_to_the_cheaper_and_unreachable_candidates_are_recorded():
    target = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    nets = {1.0: _Constant(target + 0.1, 1.2), 0.75: None, 0.5: _Constant(target + 0.1, 1.0),
            0.25: _Constant(target + 1.0, 0.9), 0.125: _Constant(target, 0.8, repeated=1)}  # fmt: skip

    def build(config: NestConfig, activation_budget: float | None) -> nn.Module:
        assert config.activation_budget is None  # the search's bound is passed apart
        if nets[config.copy_fraction] is None:
            raise BudgetOutOfReach("mac_budget=1.2 is out of reach: ...")
        return nets[config.copy_fraction]

    chosen, config, candidates = search_construction(
        NestConfig(compensate=False), build, lambda net: net, torch.zeros(4, 1), lambda: target, measure
    )
    # 0.125 reproduces the target but one of its exits repeats the one before: fewer void exits come first
    assert chosen is nets[0.5] and config.copy_fraction == 0.5 and config.compensate is False
    assert candidates[4].logit_error == 0 and candidates[4].repeated_exits == 1
    assert [c.copy_fraction for c in candidates] == [1.0, 0.75, 0.5, 0.25, 0.125]
    assert candidates[1].mac_ratio is None and candidates[1].note == "mac_budget=1.2 is out of reach: ..."
    with pytest.raises(ValueError, match="out of reach for every construction"):
        search_construction(NestConfig(copy_fraction=0.75), build, lambda net: net, torch.zeros(4, 1),
                            lambda: target, measure)  # fmt: skip


def test_the_selection_depends_on_copy_fraction_only_through_copies_first():
    """The search builds every fraction below 1 on one selection: a fresh surgery at each agrees with it."""
    import warnings

    from rdn.surgery.graph import SurgeryGraph
    from rdn.surgery.passes.select import select_orders

    model = toy().eval()
    orders = {}
    for fraction in (1.0, 0.75, 0.5, 0.25):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = SurgeryGraph(model, CALIB[:1], ["stem"], 3, "expand", False, None, fraction, "fixed")
        orders[fraction] = select_orders(graph, CALIB, "greedy", 0)
    assert orders[0.75] == orders[0.5] == orders[0.25]
    searched = nest(toy(), k=3, calib=CALIB, skip=["stem"], copy_fraction=0.5, compensate=False)
    alone = nest(toy(), k=3, calib=CALIB, skip=["stem"], copy_fraction=0.5, compensate=False, mac_budget=None)
    assert searched.record.orders == alone.record.orders


def test_when_no_fraction_fits_the_feature_maps_the_fewest_are_kept_with_a_warning():
    target = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    ratios = {1.0: 1.5, 0.75: 1.4, 0.5: 1.3, 0.25: 1.2, 0.125: 1.15}
    nets = {fraction: _Constant(target + fraction, 1.0) for fraction in ratios}
    nets[0.125] = None  # over the MAC budget once built: the next fewest feature maps is kept

    def build(config: NestConfig, activation_budget: float | None) -> nn.Module:
        ratio = ratios[config.copy_fraction]
        if activation_budget is not None and ratio > activation_budget:
            raise FeatureMapsOutOfReach(f"activation_budget={activation_budget} is out of reach: {ratio}", ratio)
        if nets[config.copy_fraction] is None:
            raise BudgetOutOfReach("mac_budget=1.2 is out of reach: ...")
        return nets[config.copy_fraction]

    with pytest.warns(BudgetWarning, match=r"1.200x the base model's at copy_fraction=0.25"):
        chosen, config, candidates = search_construction(
            NestConfig(compensate=False), build, lambda net: net, torch.zeros(4, 1), lambda: target, measure
        )
    assert chosen is nets[0.25] and config.copy_fraction == 0.25 and config.activation_budget is None
    assert [c.logit_error is None for c in candidates] == [True] * 5 + [True, False]  # 5 over, 0.125, then 0.25
