"""What the RDN keeps alive: the staged state caches only what a later stage reads (nested-layer
inputs, head inputs) in buffers whose uncomputed groups are never read, and ``forward`` frees every
intermediate after its last reader."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from rdn.surgery import Role, RussianDollNet, nest
from tests.surgery.checks import staged_states
from tests.surgery.toys import squeeze_excite_net, toy

ATOL = 1e-5


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 10, 10, generator=torch.Generator().manual_seed(1))


def nested(model: nn.Module, **kwargs) -> RussianDollNet:
    calib = torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    return nest(model, k=3, calib=calib, **kwargs).eval()


NETS = {
    "toy": lambda: nested(toy(), skip=["stem"]),
    "squeeze_excite": lambda: nested(squeeze_excite_net(), skip=["0"]),
    "depth_split": lambda: nested(toy(), skip=["stem"], depth_split="body.2"),
}


def fill_uncomputed_groups(rdn: RussianDollNet, state, value: float) -> None:
    """Overwrite every buffered channel of groups the state has not computed yet."""
    for name, tensor in state.values.items():
        space = rdn.plan.step(name).space
        if space is None or space.is_single_group or not isinstance(tensor, torch.Tensor):
            continue
        tensor[:, space.offsets[state.widths[rdn.plan.region_of(name)]] :] = value


@pytest.mark.parametrize("kind", NETS)
def test_state_caches_only_nested_inputs_and_head_inputs(images, kind):
    rdn = NETS[kind]()
    plan = rdn.plan
    nested_inputs = {step.inputs[0] for step in plan.steps if step.role is Role.NESTED}
    split, features = plan.heads.split, plan.heads.features
    heads = {features} | ({split} if split is not None else set())
    channel_steps = [step for step in plan.steps if step.space is not None and not step.space.is_single_group]
    with torch.no_grad():
        for subnet, state in staged_states(rdn, images):
            assert set(state.values) <= nested_inputs | heads
            assert (split is None or split in state.values) and (
                features in state.values or state.widths[-1] == 0  # deep part not run yet
            )
            assert len(state.values) < len(channel_steps) // 2  # BN, activations, adds... are not kept
            if subnet == rdn.num_subnets and split is None:  # nothing steps further: only the heads' inputs
                assert set(state.values) <= heads
            for name, value in state.values.items():
                space = plan.step(name).space
                assert value.shape[0] == images.shape[0]
                region = plan.region_of(name)
                prefix = space.offsets[state.widths[region]] if not space.is_single_group else len(space)
                # the cache holds the groups computed so far and no more: a stage before the last grows
                # it by concatenation, the last writes full-width buffers (its prefix is every group)
                assert value.shape[1] == prefix


@pytest.mark.parametrize("kind", NETS)
def test_uncomputed_groups_are_never_read(images, kind):
    """The buffers are not zero-filled: NaN in every group not computed yet must not reach any logit."""
    rdn = NETS[kind]()
    with torch.no_grad():
        state = rdn.start(images)
        for subnet in range(1, rdn.num_subnets + 1):
            if subnet > 1:
                state = rdn.step(state)
            torch.testing.assert_close(state.logits, rdn(images, subnet=subnet), atol=ATOL, rtol=ATOL)
            fill_uncomputed_groups(rdn, state, float("nan"))


@pytest.mark.parametrize("kind", NETS)
def test_samples_dropped_between_steps(images, kind):
    """index_select before every step: each remaining sample still gets its own sub-network's logits."""
    rdn = NETS[kind]()
    rows = torch.arange(images.shape[0])
    with torch.no_grad():
        state = rdn.start(images)
        for subnet in range(2, rdn.num_subnets + 1):
            if rows.numel() > 2:
                keep = torch.arange(1, rows.numel())  # drop the first remaining sample
                state, rows = state.index_select(keep), rows[keep]
            state = rdn.step(state)
            torch.testing.assert_close(state.logits, rdn(images[rows], subnet=subnet), atol=ATOL, rtol=ATOL)
            assert all(value.shape[0] == rows.numel() for value in state.values.values())


@pytest.mark.parametrize("subnet", [None, 1, 5])
def test_forward_frees_intermediates_after_their_last_reader(images, subnet):
    """When the head runs, the outputs of the layers before it are gone (as in an eager forward)."""
    rdn = NETS["toy"]()
    outputs: list[weakref.ref] = []
    alive_at_head: list[int] = []
    hooks = [
        layer.register_forward_hook(lambda module, args, output: outputs.append(weakref.ref(output)))
        for layer in rdn.layers.values()
    ]
    head = rdn.heads[-1 if subnet is None else subnet - 1]
    hooks.append(
        head.register_forward_pre_hook(lambda module, args: alive_at_head.append(sum(o() is not None for o in outputs)))
    )
    try:
        with torch.no_grad():
            rdn(images, subnet=subnet)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(outputs) > 10
    assert alive_at_head[0] <= 1  # at most the head conv's activation, read through the pooled features
