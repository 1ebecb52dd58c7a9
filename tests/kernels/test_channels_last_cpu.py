"""The ``cpp`` backend's channels_last 1×1 path (csrc/cpu/channels_minor.*) against the reference.

In channels_last a float32 1×1 convolution runs on one of two kernel families, chosen per call
(``prefers_channels_minor``): the channels-minor kernels (vectors along output channels, 64-column
blocks whose vectors may span output groups, lane masks, reductions cut into L1-sized chunks) or
the pixel-major ones. ``RDN_KERNELS_CPU_CHANNELS_MINOR=1`` / ``=0`` forces one, so both are checked
on shapes that reach every part of the channels-minor kernels: blocks of 1–4 vectors and a partial
last vector, segments that skip leading vectors, sparse masks whose lanes are not a suffix, reductions
longer than one chunk, pixel counts that are not a multiple of any register block, stages into
``out=``, a prefix-only input, bias. ``channels-minor-streamed`` also sets
``RDN_KERNELS_CPU_STREAM_MIN_BYTES=0``, so every output the channels-minor kernels write in whole
lines (a fresh output or grad_input whose channels are a multiple of 16) takes the non-temporal
stores meant for outputs larger than the cache. On a CPU without AVX-512 every setting runs the
pixel-major kernels (the test still passes, and says nothing about the other path).
"""

from __future__ import annotations

import pytest
import torch

from rdn_kernels import nested_conv2d, nested_linear
from tests.kernels.availability import require_backend
from tests.utils import assert_close, nan_filled_like

PATHS = ["channels-minor", "channels-minor-streamed", "pixel-major", "chosen"]


def nested_conv2d_reference(input, weight, bias, **kwargs):
    """The reference backend (one F.conv2d per block), the oracle of every kernel test."""
    return nested_conv2d(input, weight, bias, backend="torch", **kwargs)
_SETTING = {"channels-minor": "1", "channels-minor-streamed": "1", "pixel-major": "0"}


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    require_backend("cpp")
    if request.param in _SETTING:
        monkeypatch.setenv("RDN_KERNELS_CPU_CHANNELS_MINOR", _SETTING[request.param])
    else:
        monkeypatch.delenv("RDN_KERNELS_CPU_CHANNELS_MINOR", raising=False)
    if request.param == "channels-minor-streamed":
        monkeypatch.setenv("RDN_KERNELS_CPU_STREAM_MIN_BYTES", "0")
    else:
        monkeypatch.delenv("RDN_KERNELS_CPU_STREAM_MIN_BYTES", raising=False)
    return request.param


SPARSE = ((1, 0, 0, 0), (0, 1, 0, 0), (1, 0, 1, 0), (0, 1, 1, 1))  # lanes of a segment are not a suffix
SHAPES = [
    # (in_splits, out_splits, block_mask, N, H, W)
    ((24, 24, 24, 24), (36, 36, 36, 36), None, 2, 17, 19),  # 144 columns: blocks of 4, 4 and 1 vectors
    ((6, 6, 6, 6), (36, 36, 36, 36), None, 3, 13, 11),  # expansion, narrow reduction
    ((96, 96, 96, 96), (6, 6, 6, 6), None, 2, 16, 16),  # projection: one block, 2 vectors, 6-wide groups
    ((160, 160, 160, 160), (40, 40, 40, 40), None, 1, 23, 12),  # 640 channels: several chunks per block
    ((5, 0, 7, 3), (9, 4, 0, 30), None, 2, 15, 17),  # odd and empty groups
    ((8, 8, 8, 8), (20, 20, 20, 20), SPARSE, 2, 16, 17),
    ((3, 4, 5, 6, 7, 8, 9), (11, 10, 9, 8, 7, 6, 5), None, 1, 19, 21),  # K = 7
]


def _tensors(in_splits, out_splits, batch, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    channels, outputs = sum(in_splits), sum(out_splits)
    input = torch.randn(batch, channels, height, width, generator=generator).to(memory_format=torch.channels_last)
    weight = torch.randn(outputs, channels, 1, 1, generator=generator) / channels**0.5
    bias = torch.randn(outputs, generator=generator)
    return input, weight, bias


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{sum(s[0])}to{sum(s[1])}-K{len(s[0])}")
def test_forward_and_stages_match_reference(path, shape):
    in_splits, out_splits, block_mask, batch, height, width = shape
    input, weight, bias = _tensors(in_splits, out_splits, batch, height, width)
    mask = None if block_mask is None else [list(row) for row in block_mask]
    kwargs = {"in_splits": in_splits, "out_splits": out_splits, "block_mask": mask}
    expected = nested_conv2d_reference(input.double(), weight.double(), bias.double(), **kwargs)
    for with_bias in (True, False):
        actual = nested_conv2d(input, weight, bias if with_bias else None, backend="cpp", **kwargs)
        reference = expected if with_bias else nested_conv2d_reference(input.double(), weight.double(), None, **kwargs)
        assert actual.is_contiguous(memory_format=torch.channels_last)
        assert_close(actual, reference, torch.float32, what=f"forward, bias={with_bias}")
    # Every stage into one NaN-filled channels_last buffer: each writes its slice, nothing else.
    out = nan_filled_like(expected.float()).contiguous(memory_format=torch.channels_last)
    offsets = [0]
    for size in out_splits:
        offsets.append(offsets[-1] + size)
    for stage in range(len(out_splits)):
        nested_conv2d(input, weight, bias, backend="cpp", stages=(stage, stage + 1), out=out, **kwargs)
        untouched = out[:, offsets[stage + 1] :]
        assert torch.isnan(untouched).all(), f"stage {stage} wrote past its slice"
    assert_close(out, expected, torch.float32, what="stages into out=")
    # The last stage on an input holding only the prefix it reads (all of it here) and alone.
    last = len(out_splits) - 1
    alone = nested_conv2d(input, weight, bias, backend="cpp", stages=(last, last + 1), **kwargs)
    assert_close(alone, expected[:, offsets[last] :], torch.float32, what="last stage alone")


def test_prefix_input_of_an_early_stage(path):
    in_splits, out_splits = (16, 16, 16, 16), (40, 40, 40, 40)
    input, weight, bias = _tensors(in_splits, out_splits, 2, 16, 18)
    prefix = input[:, :32].contiguous(memory_format=torch.channels_last)  # groups 0–1 only
    expected = nested_conv2d_reference(input.double(), weight.double(), bias.double(), in_splits=in_splits,
                                       out_splits=out_splits)
    actual = nested_conv2d(prefix, weight, bias, in_splits=in_splits, out_splits=out_splits, stages=(1, 2),
                           backend="cpp")
    assert_close(actual, expected[:, 40:80], torch.float32)


def test_unread_channels_never_reach_an_output(path):
    """Inf / NaN in input groups an output group does not read leave it finite (a zero weight times
    Inf would be NaN: the channels-minor kernels mask lanes, they do not rely on zero weights)."""
    in_splits, out_splits = (8, 8, 8, 8), (12, 12, 12, 12)  # 48 columns: every vector spans two groups
    input, weight, _ = _tensors(in_splits, out_splits, 2, 16, 16)
    poisoned = input.clone()
    poisoned[:, 24:] = float("inf")
    poisoned[:, 16:24] = float("nan")
    actual = nested_conv2d(poisoned, weight, in_splits=in_splits, out_splits=out_splits, backend="cpp")
    expected = nested_conv2d_reference(input.double(), weight.double(), None, in_splits=in_splits,
                                       out_splits=out_splits)
    assert_close(actual[:, :24], expected[:, :24], torch.float32, what="groups 0-1 read only finite channels")
    assert not torch.isfinite(actual[:, 24:]).any()


def test_linear_layers_at_many_rows(path):
    in_splits, out_splits = (50, 40, 30, 20), (70, 60, 50, 40)
    generator = torch.Generator().manual_seed(1)
    input = torch.randn(300, 140, generator=generator)
    weight = torch.randn(220, 140, generator=generator) / 12
    bias = torch.randn(220, generator=generator)
    actual = nested_linear(input, weight, bias, in_splits=in_splits, out_splits=out_splits, backend="cpp")
    expected = nested_linear(input.double(), weight.double(), bias.double(), in_splits=in_splits,
                             out_splits=out_splits, backend="torch")
    assert_close(actual, expected, torch.float32)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{sum(s[0])}to{sum(s[1])}-K{len(s[0])}")
def test_backward_matches_reference(path, shape):
    """grad_input runs on the same kernels (the transposed triangle: input group i reads the
    gradients of the output groups that read it); every gradient of the full op and of a stage."""
    in_splits, out_splits, block_mask, batch, height, width = shape
    input, weight, bias = _tensors(in_splits, out_splits, batch, height, width)
    mask = None if block_mask is None else [list(row) for row in block_mask]
    kwargs = {"in_splits": in_splits, "out_splits": out_splits, "block_mask": mask}
    stages = [None, (len(out_splits) - 2, len(out_splits) - 1), (0, 1)]
    for stage in stages:
        extra = {} if stage is None else {"stages": stage}
        leaves = [t.detach().clone().requires_grad_() for t in (input, weight, bias)]
        output = nested_conv2d(*leaves, backend="cpp", **kwargs, **extra)
        grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(2)).contiguous(
            memory_format=torch.channels_last)
        actual = torch.autograd.grad(output, leaves, grad_output)
        references = [t.detach().double().requires_grad_() for t in (input, weight, bias)]
        expected_output = nested_conv2d_reference(*references, **kwargs, **extra)
        expected = torch.autograd.grad(expected_output, references, grad_output.double())
        for name, got, want in zip(("input", "weight", "bias"), actual, expected, strict=True):
            assert_close(got, want, torch.float32, what=f"grad {name}, stages={stage}")
        assert actual[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("storage_offset", [0, 3, 8, 13])
def test_stages_into_out_whose_lines_start_anywhere(path, storage_offset):
    """A stage's first channel at any lane of a 64-byte line: the channels-minor kernels shift their
    vectors onto whole lines (ColumnBlock::head) and mask the lanes before the stage's first channel
    off every load and store. 300 input channels: the reduction spans two L1 chunks, so later chunks
    reload the shifted output block. ``out`` starts ``storage_offset`` floats into its storage."""
    in_splits, out_splits = (100, 100, 100), (40, 32, 24)  # 96 channels: every row starts a line
    input, weight, bias = _tensors(in_splits, out_splits, 2, 13, 11)
    expected = nested_conv2d_reference(input.double(), weight.double(), bias.double(), in_splits=in_splits,
                                       out_splits=out_splits)
    storage = torch.full((storage_offset + expected.numel(),), float("nan"))
    batch, channels, height, width = expected.shape
    out = storage[storage_offset:].view(batch, height, width, channels).permute(0, 3, 1, 2)
    assert out.is_contiguous(memory_format=torch.channels_last)
    for stage in reversed(range(len(out_splits))):  # later stages first: a stray write before a slice shows
        nested_conv2d(input, weight, bias, in_splits=in_splits, out_splits=out_splits, stages=(stage, stage + 1),
                      out=out, backend="cpp")
        first = sum(out_splits[:stage])
        assert torch.isnan(out[:, :first]).all(), f"stage {stage} wrote before its slice"
    assert_close(out, expected, torch.float32, what=f"stages into out= at storage offset {storage_offset}")
