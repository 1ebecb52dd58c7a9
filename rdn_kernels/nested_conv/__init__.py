"""The nested convolution / nested linear op family.

Public functions (:func:`nested_conv2d`, :func:`nested_linear`) validate their arguments, pick a
backend (:mod:`rdn_kernels.backends`) and call one of three ``torch.library`` custom ops under
the ``rdn::`` namespace:

- ``rdn::nested_conv2d``           functional forward, with autograd;
- ``rdn::nested_conv2d_backward``  gradients of input, weight and bias;
- ``rdn::nested_conv2d_out``       forward written into a channel slice of ``out`` (in place).

Each backend module (``naive`` = the pure-PyTorch reference, ``cpp``, ``triton``) implements
``forward(input, weight, bias, layout, geometry, lo, hi, out)`` and
``backward(grad_output, input, weight, has_bias, layout, geometry, lo, hi, needs_input,
needs_weight)``.

Every argument check lives here, before a backend is chosen, so that every backend behaves the
same on bad input. That includes the ``out=`` contract, which follows PyTorch's own ``out=`` ops:

- ``out`` must not overlap itself (an expanded tensor) nor ``input``, ``weight`` or ``bias``
  (the same tensor, or views sharing memory): ValueError. Disjoint views of one buffer are fine.
- The write is an in-place op: ``out``'s version counter is bumped, so overwriting a tensor that
  autograd saved for backward makes that backward raise instead of using stale values.
- Under grad mode, when ``out`` or an operand requires grad, the write is recorded (a copy into
  ``out``'s channel slice): gradients flow through the written channels to the operands and not
  to what they overwrote. ``out`` that is a leaf requiring grad (or a view of one) is refused,
  as for any in-place op on such a leaf; under ``torch.no_grad()`` it is written.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence

import torch
from torch import Tensor

from rdn_kernels._memory import check_out_aliasing
from rdn_kernels.backends import resolve_backend
from rdn_kernels.layout import NestedLayout, check_stages, make_layout

from .geometry import ConvGeometry, output_memory_format
from .naive import nested_conv2d_reference
from .self_check import passes_self_check

__all__ = ["nested_conv2d", "nested_linear", "nested_conv2d_reference"]

_BACKEND_MODULES = {"torch": "naive", "cpp": "cpp", "triton": "triton", "cuda": "cuda"}


@functools.cache
def _backend(name: str):
    return importlib.import_module(f"{__name__}.{_BACKEND_MODULES[name]}")


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def nested_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    in_splits: Sequence[int],
    out_splits: Sequence[int],
    stride=1,
    padding=0,
    dilation=1,
    block_mask=None,
    stages: tuple[int, int] | None = None,
    out: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Block-lower-triangular 2-D convolution.

    Args:
        input: (N, C, H, W), any memory format; or (N, sum(in_splits[:hi]), H, W) — only the
            input groups below ``hi`` are ever read.
        weight: (D, C, kh, kw), dense-shaped like ``nn.Conv2d`` (groups = 1).
        bias: (D,) or None.
        in_splits, out_splits: K non-negative group sizes summing to C and D.
        block_mask: (K, K) bool, lower-triangular; ``[j][i]`` true when output group j reads
            input group i. Default: all i <= j.
        stages: ``(lo, hi)`` computes output groups lo..hi-1 only. Default ``(0, K)``.
        out: optional (N, D, H_out, W_out) buffer of input's dtype and device; the computed groups
            are written into their channel slice and ``out`` is returned, its other channels
            untouched. As with PyTorch's ``out=`` ops: ``out`` overlapping itself, ``input``,
            ``weight`` or ``bias`` is a ValueError; the write bumps ``out``'s version counter;
            under grad mode it is recorded by autograd, and a leaf ``out`` that requires grad is
            a ValueError (see the module docstring).
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"`` or ``"cuda"``.

    Returns:
        (N, sum(out_splits[lo:hi]), H_out, W_out), or ``out``.
    """
    _check_tensor("input", input, dims=4, shape_hint="(N, C, H, W)")
    _check_tensor("weight", weight, dims=4, shape_hint="(D, C, kh, kw)")
    autocast_dtype = _autocast_dtype(input)
    if autocast_dtype is not None:
        input, weight, bias = (_autocast_operand(t, autocast_dtype) for t in (input, weight, bias))
    layout = make_layout(in_splits, out_splits, block_mask)
    geometry = ConvGeometry.from_args(stride, padding, dilation)
    lo, hi = check_stages(stages, layout.num_groups)
    _check_operands(input, weight, bias, layout, hi)
    height_out, width_out = geometry.output_size(input.shape[2], input.shape[3], weight.shape[2:])
    if height_out <= 0 or width_out <= 0:
        raise ValueError(
            f"input spatial size {tuple(input.shape[2:])} is too small for kernel "
            f"{tuple(weight.shape[2:])} with {geometry}: the output would be {height_out}×{width_out}"
        )
    if out is not None:
        _check_out(out, input, weight, bias, (input.shape[0], weight.shape[0], height_out, width_out),
                   autocast_dtype)  # fmt: skip
    backend = resolve_backend(backend, input.device, input.dtype, verify=passes_self_check)
    if bias is not None:
        # D elements: one contiguous copy here (differentiable, and free when already contiguous)
        # spares every backend a strided bias read (the Triton forward read it as contiguous).
        bias = bias.contiguous()
    tensors = (input, weight, bias, out)
    needs_grad = torch.is_grad_enabled() and (
        input.requires_grad
        or weight.requires_grad
        or (bias is not None and bias.requires_grad)
        or (out is not None and out.requires_grad)
    )
    if torch.jit.is_tracing():
        # torch.jit.trace cannot record the registered op (its block mask is a list of bools) and
        # would freeze the eager fast path's result into a constant: trace the reference's stock
        # convolutions instead, which record, differentiate and run wherever TorchScript does.
        result = nested_conv2d_reference(input, weight, bias, layout, geometry, lo, hi)
        return result if out is None else _write_stages(out, result, layout, lo)
    if _plain_eager(tensors):
        # Plain eager mode: the registered op would only add dispatch overhead (about 90 µs a call
        # under autograd, 10 µs without; as much as a small stage's whole kernel), so inference
        # calls the backend directly and training records an autograd.Function of the same backend.
        if needs_grad:
            result = _NestedConv2dFunction.apply(input, weight, bias, layout, geometry, lo, hi, backend)
            return result if out is None else _write_stages(out, result, layout, lo)
        result = _backend(backend).forward(input, weight, bias, layout, geometry, lo, hi, out)
        if out is not None:
            # The compiled kernels write through raw pointers, unseen by autograd: bump the version
            # as any in-place op does (the custom op does it too), so that a saved copy of `out`
            # overwritten here is reported by backward instead of silently used.
            torch.autograd.graph.increment_version(out)
        return result
    args = (
        list(layout.in_splits),
        list(layout.out_splits),
        list(layout.flat_mask),
        list(geometry.stride),
        list(geometry.padding),
        list(geometry.dilation),
        lo,
        hi,
        backend,
    )
    if out is None:
        return _nested_conv2d_op(input, weight, bias, *args)
    if needs_grad:
        # The in-place op has no autograd formula; record the write as a copy autograd can see
        # (also when only `out` is in a graph: what it held in these channels gets no gradient).
        return _write_stages(out, _nested_conv2d_op(input, weight, bias, *args), layout, lo)
    _nested_conv2d_out_op(input, weight, bias, *args, out)
    return out


def _autocast_dtype(input: Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs convolutions in on ``input``'s device, None outside autocast."""
    device_type = "cuda" if input.is_cuda else "cpu" if input.is_cpu else input.device.type  # cheap cases first
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _autocast_operand(tensor: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``tensor`` cast as autocast casts a convolution's operands: 16- and 32-bit floats to ``dtype``,
    float64 left as it is (a differentiable cast: gradients reach float32 master weights)."""
    if tensor is None or tensor.dtype == dtype or tensor.dtype == torch.float64 or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def _write_stages(out: Tensor, result: Tensor, layout: NestedLayout, lo: int) -> Tensor:
    """Copy the groups ``result`` holds (from group ``lo`` on) into their channel slice of ``out``."""
    out.narrow(1, layout.out_offsets[lo], result.shape[1]).copy_(result)
    return out


def _plain_eager(tensors) -> bool:
    """True outside torch.compile / tracing, with no dispatch mode active and plain tensors only:
    then nothing but the kernel itself would see the registered op."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0:
        return False
    for tensor in tensors:  # a loop, not all(<generator>): this runs on every inference call
        if tensor is not None and type(tensor) not in _PLAIN_TENSOR_TYPES:
            return False
    return True


# nn.Parameter is a plain tensor to the dispatcher (it disables __torch_function__): a module's
# weights must not push every inference call of a nested layer onto the slower registered-op path.
_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def nested_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    in_splits: Sequence[int],
    out_splits: Sequence[int],
    block_mask=None,
    stages: tuple[int, int] | None = None,
    out: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Block-lower-triangular linear layer: ``input`` (N, C), ``weight`` (D, C) → (N, D_stages).

    The 1×1 case of :func:`nested_conv2d`; see it for the arguments.
    """
    _check_tensor("input", input, dims=2, shape_hint="(N, C)")
    _check_tensor("weight", weight, dims=2, shape_hint="(D, C)")
    out_4d = None
    if out is not None:
        _check_tensor("out", out, dims=2, shape_hint="(N, D)")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous for nested_linear")
        out_4d = out.view(out.shape[0], out.shape[1], 1, 1)
    # Views with plain ints (about 1 µs each, half the cost of a view from a sliced shape).
    result = nested_conv2d(
        input.view(input.shape[0], input.shape[1], 1, 1),
        weight.view(weight.shape[0], weight.shape[1], 1, 1),
        bias,
        in_splits=in_splits,
        out_splits=out_splits,
        block_mask=block_mask,
        stages=stages,
        out=out_4d,
        backend=backend,
    )
    # With out=, out itself, as PyTorch's out= ops return it (the write went through its view).
    return out if out is not None else result.view(result.shape[0], result.shape[1])


# ----------------------------------------------------------------------------------------------
# Argument checks: every bad input is a TypeError / ValueError naming the argument.
# ----------------------------------------------------------------------------------------------


def _check_tensor(name: str, tensor, dims: int, shape_hint: str) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_hint}, got {type(tensor).__name__}")
    if tensor.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {shape_hint}, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}")


def _check_operands(input: Tensor, weight: Tensor, bias: Tensor | None, layout: NestedLayout, hi: int) -> None:
    channels, out_channels = layout.in_offsets[-1], layout.out_offsets[-1]
    weight_out, weight_in, kernel_h, kernel_w = weight.shape  # unpacked once: this runs on every call
    if weight_out != out_channels:
        raise ValueError(f"weight has {weight_out} output channels but sum(out_splits) = {out_channels}")
    if kernel_h < 1 or kernel_w < 1:
        raise ValueError(f"weight must have a kernel size >= 1 in both dims (kh, kw), got {(kernel_h, kernel_w)}")
    if weight_in != channels:
        raise ValueError(
            f"weight has {weight_in} input channels but sum(in_splits) = {channels}; nested "
            "layers need dense-shaped (groups=1) weights (D, C, kh, kw)"
        )
    input_channels = input.shape[1]
    prefix = layout.in_offsets[hi]
    if input_channels != channels and input_channels != prefix:
        raise ValueError(
            f"input has {input_channels} channels; expected C = sum(in_splits) = {channels}"
            + (f" or the prefix read by stages < {hi}: {prefix}" if prefix != channels else "")
        )
    if weight.dtype != input.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match input dtype {input.dtype}")
    if weight.device != input.device:
        raise ValueError(f"weight is on {weight.device} but input is on {input.device}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor (D,) or None, got {type(bias).__name__}")
        if bias.shape != (out_channels,):
            raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")
        if bias.dtype != input.dtype or bias.device != input.device:
            raise TypeError(
                f"bias must match input ({input.dtype} on {input.device}), got {bias.dtype} on {bias.device}"
            )


def _check_out(out, input: Tensor, weight: Tensor, bias: Tensor | None, shape: tuple[int, ...],
               autocast_dtype: torch.dtype | None = None) -> None:  # fmt: skip
    """The ``out=`` contract (module docstring), checked once for every backend."""
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor of the full output shape {shape}, got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"out must have the full output shape {shape}, got {tuple(out.shape)}")
    if out.dtype != input.dtype or out.device != input.device:
        raise TypeError(
            f"out must match input ({input.dtype} on {input.device}), got {out.dtype} on {out.device}"
            + (f"; under torch.autocast the op computes in {autocast_dtype}, as F.conv2d does, so out must "
               "have that dtype" if autocast_dtype is not None and out.dtype != input.dtype else "")
        )  # fmt: skip
    if torch.is_grad_enabled() and out.requires_grad and (out if out._base is None else out._base).is_leaf:
        raise ValueError(
            "out is (a view of) a leaf tensor that requires grad: autograd cannot record an in-place write "
            "into it, as for any in-place op on such a leaf. Call without out= (and use the result), pass a "
            "buffer that does not require grad, or write under torch.no_grad()"
        )
    check_out_aliasing(out, {"input": input, "weight": weight, "bias": bias})


# ----------------------------------------------------------------------------------------------
# Custom ops (rdn::) and autograd
# ----------------------------------------------------------------------------------------------


def _unpack(in_splits, out_splits, flat_mask, stride, padding, dilation) -> tuple[NestedLayout, ConvGeometry]:
    num_groups = len(in_splits)
    mask = tuple(tuple(flat_mask[j * num_groups : (j + 1) * num_groups]) for j in range(num_groups))
    layout = make_layout(tuple(in_splits), tuple(out_splits), mask)
    return layout, ConvGeometry(tuple(stride), tuple(padding), tuple(dilation))


@torch.library.custom_op("rdn::nested_conv2d", mutates_args=())
def _nested_conv2d_op(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    in_splits: list[int],
    out_splits: list[int],
    block_mask: list[bool],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    stage_lo: int,
    stage_hi: int,
    backend: str,
) -> Tensor:
    layout, geometry = _unpack(in_splits, out_splits, block_mask, stride, padding, dilation)
    return _backend(backend).forward(input, weight, bias, layout, geometry, stage_lo, stage_hi, None)


@_nested_conv2d_op.register_fake
def _(input, weight, bias, in_splits, out_splits, block_mask, stride, padding, dilation, stage_lo, stage_hi, backend):
    geometry = ConvGeometry(tuple(stride), tuple(padding), tuple(dilation))
    height_out, width_out = geometry.output_size(input.shape[2], input.shape[3], weight.shape[2:])
    channels = sum(out_splits[stage_lo:stage_hi])
    return input.new_empty((input.shape[0], channels, height_out, width_out)).contiguous(
        memory_format=output_memory_format(input)
    )


@torch.library.custom_op("rdn::nested_conv2d_out", mutates_args=("out",))
def _nested_conv2d_out_op(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    in_splits: list[int],
    out_splits: list[int],
    block_mask: list[bool],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    stage_lo: int,
    stage_hi: int,
    backend: str,
    out: Tensor,
) -> None:
    layout, geometry = _unpack(in_splits, out_splits, block_mask, stride, padding, dilation)
    _backend(backend).forward(input, weight, bias, layout, geometry, stage_lo, stage_hi, out)


@_nested_conv2d_out_op.register_fake
def _(input, weight, bias, in_splits, out_splits, block_mask, stride, padding, dilation, stage_lo, stage_hi, backend,
      out):
    return None


@torch.library.custom_op("rdn::nested_conv2d_backward", mutates_args=())
def _nested_conv2d_backward_op(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    has_bias: bool,
    in_splits: list[int],
    out_splits: list[int],
    block_mask: list[bool],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    stage_lo: int,
    stage_hi: int,
    backend: str,
    needs_input: bool,
    needs_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_input, grad_weight, grad_bias); a gradient not asked for is an empty tensor."""
    layout, geometry = _unpack(in_splits, out_splits, block_mask, stride, padding, dilation)
    grads = _run_backward(grad_output, input, weight, has_bias, layout, geometry, stage_lo, stage_hi, backend,
                          needs_input, needs_weight)  # fmt: skip
    return tuple(grad if grad is not None else input.new_empty(0) for grad in grads)


def _run_backward(grad_output: Tensor, input: Tensor, weight: Tensor, has_bias: bool, layout: NestedLayout,
                  geometry: ConvGeometry, lo: int, hi: int, backend: str, needs_input: bool,
                  needs_weight: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """(grad_input, grad_weight, grad_bias) from the backend, None where not asked for or no bias."""
    return _backend(backend).backward(
        grad_output.contiguous(memory_format=output_memory_format(input)),
        input,
        weight,
        has_bias,
        layout,
        geometry,
        lo,
        hi,
        needs_input,
        needs_weight,
    )


@_nested_conv2d_backward_op.register_fake
def _(grad_output, input, weight, has_bias, in_splits, out_splits, block_mask, stride, padding, dilation,
      stage_lo, stage_hi, backend, needs_input, needs_weight):
    return (
        torch.empty_like(input) if needs_input else input.new_empty(0),
        torch.empty_like(weight) if needs_weight else weight.new_empty(0),
        weight.new_empty(weight.shape[0]) if has_bias else weight.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, *options = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None
    ctx.options = options


def _backward(ctx, grad_output: Tensor):
    input, weight = ctx.saved_tensors
    needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grad_input, grad_weight, grad_bias = _nested_conv2d_backward_op(
        grad_output, input, weight, ctx.has_bias, *ctx.options, needs_input, needs_weight
    )
    return (
        grad_input if needs_input else None,
        grad_weight if needs_weight else None,
        grad_bias if needs_bias else None,
    ) + (None,) * len(ctx.options)


_nested_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


class _NestedConv2dFunction(torch.autograd.Function):
    """The registered op's forward and backward as an autograd.Function, for plain eager training.

    Same backend calls and gradients as ``rdn::nested_conv2d`` with its autograd formula, without
    the dispatcher's cost. torch.compile, export, dispatch modes and tensor subclasses still see
    the registered op (see :func:`_plain_eager`).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, layout, geometry, lo, hi, backend):
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        ctx.call = (layout, geometry, lo, hi, backend)
        return _backend(backend).forward(input, weight, bias, layout, geometry, lo, hi, None)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: the gradients would carry no graph, silently
            raise RuntimeError(
                "nested_conv2d has no double backward: its backward kernels are not differentiable, so "
                "gradients computed with create_graph=True cannot be differentiated again"
            )
        input, weight = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_input, grad_weight, grad_bias = _run_backward(grad_output, input, weight, ctx.has_bias, *ctx.call,
                                                           needs_input, needs_weight)  # fmt: skip
        return (
            grad_input if needs_input else None,
            grad_weight if needs_weight else None,
            grad_bias if needs_bias else None,
        ) + (None,) * len(ctx.call)
