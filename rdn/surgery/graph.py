"""The dataflow analysis behind surgery: which layers are nested, which tensors share a channel space.

Design choice: the model is traced with ``torch.fx`` (any module that symbolic tracing handles:
``nn.Sequential`` stacks, torchvision / timm-style blocks with residual adds, SE gates, ...).
Every node of the graph gets a :class:`~rdn.surgery.plan.Role` by the *type* of what it calls,
never by attribute names:

- ``nested``: ``nn.Conv2d`` with groups = 1 and ``nn.Linear`` (except the classifier) — nested;
- ``grouped``: ``nn.Conv2d`` with groups > 1 (depthwise included) — acts per conv group;
- ``channel_params``: modules whose parameters and buffers are all per channel (1-D of the
  channel count, or 0-d) and which the probe below shows act per channel: BatchNorm, timm's
  BatchNorm + activation, ... — applied to a channel slice through a view of their tensors; also a
  tensor a block's ``forward`` reads itself (fx ``get_attr``) that is one value per channel of the
  tensor it multiplies / adds to (ConvNeXt's layer scale): the trace makes it, and the op applying
  it, a module of its own (:class:`ChannelTensorOp`, :meth:`SurgeryGraph._fold_channel_tensors`);
- ``channelwise``: any other parameter-free module, function or method whose output has the
  input's channels and which a probe shows acts per channel (permuting the input channels permutes
  the output the same way, and a channel prefix in gives the prefix out): activations, pooling,
  residual adds, SE products, flatten after global pooling, TF "same" padding, ...;
- ``concat``: ``torch.cat`` on the channels: its output is a *composite* space made of its parts'
  spaces (:class:`~rdn.surgery.spaces.ConcatSpace`, see :meth:`SurgeryGraph._build_parts`);
- ``groupwise``: with ``norms="grouped"``, a LayerNorm over the channels or a GroupNorm, run with
  statistics per channel group (:class:`~rdn.nn.GroupedNorm`);
- ``opaque``: anything else that makes a tensor (softmax over channels, LayerNorm by default,
  slices to a fixed channel count, channel shuffles, permutes to channels-last, modules with other
  parameters, blocks whose ``forward`` reads a tensor of their own that is not per channel, kept
  whole): allowed only where every tensor is un-nested;
- ``meta``: nodes that make no tensor (``x.size(0)``); ``classifier``: the ``nn.Linear`` whose
  result is the model's output (replaced by the RDN heads).

Channel spaces. Channel-wise and channel_params nodes share their inputs' space (a union-find over
nodes); so do the operands of an add or product: the residual stream of a stage is *one* space,
whose layout is decided once, by the first nested layer writing it (its *definer*, in graph
order), and every other layer writing it (later blocks' projections, the downsampling shortcut)
is built to produce that same layout. A grouped conv maps its input's units one to one onto its
output's, so spaces linked by grouped convs share one *layout* (unit order, groups, copies).

Un-nested region. Skipped layers and opaque nodes write *single-group* spaces (all channels in
group 0). A layer that writes a single-group space can only read a single-group space (group 0
reads group 0 only), so un-nestedness spreads: to every layer writing into the same space (a
residual stage whose first block was skipped stays un-nested up to its next channel change) and
back to the producers of a skipped layer's input. :class:`SurgeryGraph` runs this to a fixed point.

Limits: the model must be ``torch.fx``-traceable (no data-dependent Python control flow; a
``self.training`` branch outside a leaf module is frozen at its eval-mode value) and return the
classifier's logits; every module with parameters is called once (shared weights are refused);
tensors keep their channels on dim 1; tensors of the model itself read directly by its ``forward``
(fx ``get_attr``) are refused unless one value per channel; channel splits (``torch.split`` /
``chunk``: parts of fixed sizes) and channel-coupled ops stay in the un-nested part. Shape-only
nodes after the classifier and slices keeping every element are removed from the trace before
anything else.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from rdn.nn import split_channels
from rdn.surgery.plan import SKIPPED_REASON, Role
from rdn.surgery.spaces import ChannelSpace, ConcatSpace, channel_view, ladder, num_groups_for


def _has_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _per_channel_tensors(module: nn.Module, channels: int) -> bool:
    """All tensors are the module's own, per channel (1-D of ``channels``) or 0-d; children hold none."""
    if any(_has_tensors(child) for child in module.children()):
        return False
    tensors = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
    return all(t.dim() == 0 or (t.dim() == 1 and t.shape[0] == channels) for t in tensors)


def _holds_tensors(meta) -> bool:
    """Whether fx tensor metadata of a tuple / list / dict value holds a tensor."""
    if hasattr(meta, "shape"):
        return True
    if isinstance(meta, (tuple, list)):
        return any(_holds_tensors(item) for item in meta)
    if isinstance(meta, dict):
        return any(_holds_tensors(item) for item in meta.values())
    return False


def channel_norm(module: nn.Module, shape: tuple[int, ...]) -> str | None:
    """What kind of channel-coupling normalisation ``module`` is on inputs of ``shape`` (N, C, ...):
    ``"GroupNorm"``, ``"LayerNorm over channels"`` (a probe shows it normalises dim 1 at every
    position, as ConvNeXt's ``LayerNorm2d`` or a LayerNorm of pooled features), or None."""
    channels = shape[1]
    if isinstance(module, nn.GroupNorm) and type(module).forward is nn.GroupNorm.forward:
        return "GroupNorm" if module.num_channels == channels else None
    if not isinstance(module, nn.LayerNorm) or tuple(module.normalized_shape) != (channels,):
        return None
    dtype = module.weight.dtype if module.weight is not None else torch.get_default_dtype()
    device = module.weight.device if module.weight is not None else torch.device("cpu")
    probe = torch.randn((2, *shape[1:]), generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    with torch.no_grad():
        try:
            result = module(probe)
        except Exception:  # a subclass that takes other layouts: not this one
            return None
        expected = F.layer_norm(probe.movedim(1, -1), (channels,), module.weight, module.bias, module.eps)
    same = isinstance(result, Tensor) and result.shape == probe.shape
    return "LayerNorm over channels" if same and torch.allclose(result, expected.movedim(-1, 1), atol=1e-5) else None


_CONCATENATIONS = (torch.cat, torch.concat, torch.concatenate)


def concat_inputs(node: fx.Node) -> list[fx.Node] | None:
    """The tensors a ``torch.cat`` on the channels (dim 1) joins, in order; None for any other node."""
    if node.op != "call_function" or node.target not in _CONCATENATIONS:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
    meta = node.meta.get("tensor_meta")
    if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int) or meta is None:
        return None
    if not all(isinstance(t, fx.Node) for t in tensors) or dim % len(meta.shape) != 1:
        return None
    return list(tensors)


def _listed(texts: list[str], most: int = 8) -> str:
    """``texts`` joined by commas, the ones past ``most`` counted (error messages stay readable)."""
    return ", ".join(texts[:most] + ([f"{len(texts) - most} more"] if len(texts) > most else []))


class _LeafTracer(fx.Tracer):
    """Keeps whole every module without children (custom padding layers with shape maths) and every
    module with tensors of its own (timm's BatchNorm + activation, which reads them functionally),
    except a module that also has children with tensors (a block with a layer scale): that one is
    traced through, its own tensors read by ``get_attr`` nodes (:meth:`SurgeryGraph._fold_channel_tensors`),
    unless ``whole`` names it. ``whole=None``: every module with tensors of its own is kept whole."""

    def __init__(self, whole: Iterable[str] | None = ()) -> None:
        super().__init__()
        self.whole = None if whole is None else frozenset(whole)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if super().is_leaf_module(module, qualified_name) or not any(True for _ in module.children()):
            return True
        if not any(t is not None for t in (*module._parameters.values(), *module._buffers.values())):
            return False
        if self.whole is None or qualified_name in self.whole:
            return True
        return not any(_has_tensors(child) for child in module.children())


def call_node(node: fx.Node, fetch: Callable[[fx.Node], Any], module: nn.Module | None) -> Any:
    """Run one traced node on the values ``fetch`` gives for the nodes it reads.

    ``module`` is the layer a ``call_module`` node runs (unused for other nodes).
    """
    args = fx.node.map_arg(node.args, fetch)
    kwargs = fx.node.map_arg(node.kwargs, fetch)
    if node.op == "call_module":
        return module(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def describe_node(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """A traced node as error messages name it: ``qualified.module (Type)``, or the function or method
    it calls and the module it is called in (``modules``: the traced model's named modules)."""
    if node.op == "call_module":
        return f"{node.target} ({type(modules[node.target]).__name__})"
    if node.op == "placeholder":
        return f"the model input {node.target!r}"
    stack = [path for path, _ in node.meta.get("nn_module_stack", {}).values() if path]
    called = getattr(node.target, "__name__", str(node.target))
    called = f".{called}()" if node.op == "call_method" else f"{called}()"
    return f"{called}{f' in {stack[-1]}' if stack else ''} (node {node.name})"


def trace(model: nn.Module, whole: Iterable[str] = ()) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` with leaf modules kept whole (:class:`_LeafTracer`; ``whole``: the
    modules with tensors of their own beside children with tensors that are kept whole too). When the
    modules it traces through cannot be traced, every module with tensors of its own is kept whole."""
    try:
        try:
            graph = _LeafTracer(whole).trace(model)
        except Exception:  # a block traced through, not traceable itself: kept whole, as a leaf
            graph = _LeafTracer(None).trace(model)
    except Exception as error:  # tracing failures come as many exception types
        raise ValueError(
            f"model {type(model).__name__} cannot be traced by torch.fx ({type(error).__name__}: {error}); "
            "surgery needs a traceable model (no data-dependent Python control flow in forward)"
        ) from error
    return fx.GraphModule(model, graph)


# Elementwise ops that apply a tensor of one value per channel to a channel tensor (a layer scale, a
# per-channel shift): what they are to copies="sum" copies (every copy scaled; a shift on the primary only).
_SCALE, _SHIFT = "scale", "shift"
_CHANNEL_FUNCTIONS = {
    operator.mul: _SCALE, torch.mul: _SCALE, operator.imul: _SCALE,
    operator.add: _SHIFT, torch.add: _SHIFT, operator.iadd: _SHIFT,
    operator.sub: _SHIFT, torch.sub: _SHIFT, operator.isub: _SHIFT,
    operator.truediv: _SCALE, torch.div: _SCALE, torch.true_divide: _SCALE, operator.itruediv: _SCALE,
}  # fmt: skip
_CHANNEL_METHODS = {"mul": _SCALE, "add": _SHIFT, "sub": _SHIFT, "div": _SCALE, "true_divide": _SCALE}
_IN_PLACE = (operator.imul, operator.iadd, operator.isub, operator.itruediv)
_DIVISIONS = (operator.truediv, torch.div, torch.true_divide, operator.itruediv, "div", "true_divide")


class ChannelTensorOp(nn.Module):
    """A tensor of one value per channel that the base model's ``forward`` reads itself (fx ``get_attr``)
    and applies to a channel tensor with one elementwise op: timm's ``x.mul(self.gamma.reshape(1, -1, 1,
    1))``, torchvision's ``self.layer_scale * x``. Surgery makes it a module of its own
    (:meth:`SurgeryGraph._fold_channel_tensors`), so it is sliced and copied as BN's tensors are.

    Args:
        value: (C,) one value per channel, or 0-d (one value for all).
        parameter: whether it is a parameter (else a buffer), with ``requires_grad``.
        shape: the shape the base model gave it (-1 for the channels), e.g. (1, -1, 1, 1).
        op: the function (``operator.mul``, ...) or, with ``method``, the tensor method name (``"mul"``).
        first: whether the tensor is the op's first operand (``self.layer_scale * x``).
        kind: ``"scale"`` or ``"shift"`` (what it is to ``copies="sum"`` copies), None for neither (p / x).
    """

    def __init__(self, value: Tensor, parameter: bool, requires_grad: bool, shape: tuple[int, ...], op,
                 method: bool, first: bool, kind: str | None) -> None:  # fmt: skip
        super().__init__()
        if parameter:
            self.weight = nn.Parameter(value, requires_grad=requires_grad)
        else:
            self.register_buffer("weight", value)
        self.shape, self.op, self.method, self.first, self.kind = tuple(shape), op, method, first, kind
        # the tensors that copies="sum" puts on primaries only (rdn.surgery.spaces.inflate_channel_module)
        self.sum_offsets = None if kind is None else ("weight",) if kind == _SHIFT else ()

    def forward(self, x: Tensor) -> Tensor:
        value = self.weight.reshape(self.shape)
        a, b = (value, x) if self.first else (x, value)
        return getattr(a, self.op)(b) if self.method else self.op(a, b)

    def extra_repr(self) -> str:
        op = f".{self.op}()" if self.method else getattr(self.op, "__name__", str(self.op))
        return f"{op}, shape={self.shape}, first={self.first}"


@dataclass
class NodeInfo:
    """What surgery knows about one fx node."""

    node: fx.Node
    role: Role
    shape: tuple[int, ...] | None = None  # output shape at the calibration batch, if a tensor
    dtype: torch.dtype | None = None
    module: nn.Module | None = None
    space_key: str | None = None  # root node name of the output's channel space
    inputs: list[str] = field(default_factory=list)  # tensor arguments that carry channels
    why_opaque: str | None = None  # for Role.OPAQUE: why it is not per channel (error messages)


class SurgeryGraph:
    """Roles, channel spaces and nesting structure of a traced model (module docstring).

    Args:
        model: the base model (eval mode recommended: BN uses running statistics).
        example: one input batch, for shape propagation.
        skip: layers kept un-nested: qualified module names (their sub-modules included), an int n
            (the first n nestable layers) or None (the layers at output stride <= 4, at most the first
            quarter of the nestable layers).
        k, mode, exact: the surgery settings (see :func:`rdn.surgery.nest`).
        depth_split: qualified name of the module after which the shallow exits branch off.
        copy_fraction: share of every primary group's units that get copies (:func:`rdn.surgery.nest`).
        norms: ``"fixed"`` (norms that couple channels stay un-nested) or ``"grouped"`` (they nest,
            with statistics per channel group: :class:`~rdn.nn.GroupedNorm`).
    """

    def __init__(
        self,
        model: nn.Module,
        example: Tensor,
        skip,
        k: int,
        mode: str,
        exact: bool,
        depth_split: str | None = None,
        copy_fraction: float = 1.0,
        norms: str = "fixed",
    ):
        self.k, self.mode, self.exact, self.copy_fraction = k, mode, exact, copy_fraction
        self.norms = norms
        self.num_groups = num_groups_for(k, mode)
        self._device = example.device  # where the model runs: the probes of its modules go there too
        self._trace(model, example)
        self.after_classifier = self._strip_after_classifier()
        self._drop_whole_slices()
        self.infos: dict[str, NodeInfo] = {}
        for node in self.graph_module.graph.nodes:
            self.infos[node.name] = self._classify(node)
        self._check_single_calls()
        self.classifier = self._find_classifier()
        self._parent: dict[str, str] = {}
        self._build_spaces()
        self._build_parts()
        self.skipped_targets = self._resolve_skip(skip)
        self.plain = {
            name
            for name, info in self.infos.items()
            if info.role is Role.NESTED and info.node.target in self.skipped_targets
        }
        self._pin()
        self.nested = [name for name, info in self.infos.items() if info.role is Role.NESTED and name not in self.plain]
        if not self.nested:
            raise ValueError(self._no_nested_layer_message())
        self._resolve_layouts()
        self.rungs = self._resolve_rungs()
        self.depth_split = None if depth_split is None else self._split_node(depth_split)

    def _trace(self, model: nn.Module, example: Tensor) -> None:
        """Trace ``model`` and propagate ``example``'s shapes, folding the per-channel tensors that blocks
        read themselves into modules (:meth:`_fold_channel_tensors`); a block whose own tensors do not
        fold is traced again as one leaf (``self._kept_whole``: block → why)."""
        self._kept_whole: dict[str, str] = {}
        while True:
            self.graph_module = trace(model, self._kept_whole)
            self.modules = dict(self.graph_module.named_modules())
            self._propagate_shapes(example)
            unfolded = self._fold_channel_tensors(model)
            if not unfolded:
                return
            for owner, why in unfolded.items():
                if not owner or owner in self._kept_whole:  # no block to keep whole: the model's own forward
                    raise ValueError(
                        f"the model's forward reads the {why}; surgery supports tensors read directly by forward "
                        "(fx get_attr) only as one value per channel of the tensor they scale or shift, other "
                        "parameters must live in modules"
                    )
                self._kept_whole[owner] = why

    def _split_node(self, module_name: str) -> str:
        """The output node of module ``module_name``: the last node traced inside it."""
        inside = [
            name
            for name, info in self.infos.items()
            if any(path == module_name for path, _ in info.node.meta.get("nn_module_stack", {}).values())
        ]
        if not inside:
            raise ValueError(f"depth_split {module_name!r} names no module the model's forward runs")
        split = inside[-1]
        info = self.infos[split]
        if info.space_key is None or len(info.shape) != 4:
            raise ValueError(f"depth_split {module_name!r} must end in a feature map (N, C, H, W), got {info.shape}")
        if self.position(split) >= self.position(self.classifier_input):
            raise ValueError(f"depth_split {module_name!r} must come before the pooled features")
        return split

    # ------------------------------------------------------------------------------------------
    # Roles
    # ------------------------------------------------------------------------------------------

    def _check_input(self, example: Tensor) -> None:
        """Refuse calibration samples the model's first conv / linear layer cannot take, naming that
        layer and what it takes (torch's own error would come from deep inside shape propagation)."""
        sample = tuple(example.shape[1:])
        for node in self.graph_module.graph.nodes:
            if node.op != "placeholder":
                continue
            for user in node.users:
                module = self.modules.get(user.target) if user.op == "call_module" else None
                if isinstance(module, nn.Conv2d):
                    takes, layout = module.in_channels, f"(N, {module.in_channels}, H, W)"
                    channels = sample[0] if len(sample) == 3 else None
                elif isinstance(module, nn.Linear) and len(sample) == 1:
                    takes, layout, channels = module.in_features, f"(N, {module.in_features})", sample[0]
                else:
                    continue
                layer = f"{user.target} ({type(module).__name__})"
                if channels is None:
                    raise ValueError(
                        f"calib must be {layout} for the model's first layer {layer}; its samples have shape {sample} "
                        "(one image without a batch dimension? calib[None] adds it)"
                    )
                if channels != takes:
                    raise ValueError(
                        f"calib has {channels} channels per sample (sample shape {sample}), but the model's first "
                        f"layer {layer} takes {takes}: calib must be {layout}"
                    )

    def _propagate_shapes(self, example: Tensor) -> None:
        self._check_input(example)
        try:
            with torch.no_grad():
                ShapeProp(self.graph_module).propagate(example)
        except Exception as error:
            raise ValueError(
                f"calibration input of shape {tuple(example.shape)} does not fit the model "
                f"({type(error).__name__}: {error})"
            ) from error

    def _fold_channel_tensors(self, model: nn.Module) -> dict[str, str]:
        """Make every tensor a block's ``forward`` reads itself (fx ``get_attr``: a layer scale) and applies
        to a channel tensor as one value per channel a :class:`ChannelTensorOp` module of its own (named
        after the tensor), which then is a per-channel module as BN is (``Role.CHANNEL_PARAMS``).

        The tensor may pass through shape-only nodes first (``reshape(1, -1, 1, 1)``); broadcast against
        the channel tensor it must put its values on the channels (dim 1) only: (C,) on (N, C), (C, 1, 1)
        or (1, C, 1, 1) on (N, C, H, W), or one value for all.

        Returns {block to keep whole (:meth:`_reading_block`) because its forward reads a tensor that does
        not fold: why} and then changes nothing; else folds them all and returns {}.
        """
        graph = self.graph_module.graph
        getters = [node for node in graph.nodes if node.op == "get_attr"]
        reads: dict[str, int] = {}
        for node in getters:
            reads[node.target] = reads.get(node.target, 0) + 1
        folds, unfolded = [], {}
        for node in getters:
            fold = self._channel_tensor_fold(node, model, reads[node.target])
            if isinstance(fold, str):
                unfolded.setdefault(self._reading_block(node, model), fold)
            else:
                folds.append(fold)
        if unfolded or not getters:
            return unfolded
        for node, chain, consumer, module in folds:
            if module is None:  # read and never used
                graph.erase_node(node)
                continue
            other = consumer.args[1] if module.first else consumer.args[0]  # as an earlier fold left it
            owner, _, attr = node.target.rpartition(".")
            container = self.graph_module.get_submodule(owner) if owner else self.graph_module
            delattr(container, attr)  # the traced copy's attribute; the base model keeps its tensor
            container.add_module(attr, module)
            with graph.inserting_before(consumer):
                folded = graph.call_module(node.target, (other,))
            folded.meta = dict(consumer.meta)
            consumer.replace_all_uses_with(folded)
            for dead in (consumer, *reversed(chain), node):
                graph.erase_node(dead)
        self.graph_module.recompile()
        self.modules = dict(self.graph_module.named_modules())
        return {}

    def _channel_tensor_fold(self, node: fx.Node, model: nn.Module, reads: int):
        """How get_attr ``node`` folds (:meth:`_fold_channel_tensors`): (node, the shape-only nodes after it,
        the op applying it to a channel tensor, the module replacing them), or why it does not (a string
        naming the tensor)."""
        target = node.target
        owner, _, attr = target.rpartition(".")
        container = self.graph_module.get_submodule(owner) if owner else self.graph_module
        tensor = getattr(container, attr, None)
        if not isinstance(tensor, Tensor):
            return f"attribute {target!r} (not a tensor)"
        what = "parameter" if isinstance(tensor, nn.Parameter) else "tensor"
        name = f"{what} {attr!r} of shape {tuple(tensor.shape)}"
        if reads > 1:
            return f"{name}, which it reads {reads} times"
        chain, current = [], node
        while True:
            users = list(current.users)
            if not users and current is node:
                return (node, [], None, None)
            if len(users) != 1:
                return f"{name}, which it uses {len(users)} times"
            (consumer,) = users
            if consumer.op not in ("call_method", "call_function") or consumer.all_input_nodes != [current]:
                break
            chain.append(consumer)
            current = consumer
        method = consumer.op == "call_method"
        op = consumer.target
        kinds = _CHANNEL_METHODS if method else _CHANNEL_FUNCTIONS
        kind = kinds.get(op.removesuffix("_") if method else op, False) if consumer.op != "call_module" else False
        args = consumer.args
        first = bool(args) and args[0] is current
        other = args[1] if first and len(args) == 2 else args[0] if args else None
        meta, other_meta = current.meta.get("tensor_meta"), getattr(other, "meta", {}).get("tensor_meta")
        if (
            kind is False or len(args) != 2 or consumer.kwargs or sum(arg is current for arg in args) != 1
            or not isinstance(other, fx.Node) or not self._carries_channels(other) or meta is None
        ):  # fmt: skip
            return (
                f"{name}, which {describe_node(consumer, self.modules)} uses; a tensor read by forward nests "
                "only as one value per channel that multiplies, divides, adds to or subtracts from a channel tensor"
            )
        shape, channels_shape = tuple(meta.shape), tuple(other_meta.shape)
        out = getattr(consumer.meta.get("tensor_meta"), "shape", None)
        padded = (1,) * (len(channels_shape) - len(shape)) + shape
        channels = channels_shape[1]
        if (
            out is None or tuple(out) != channels_shape or len(shape) > len(channels_shape)
            or any(size != 1 for dim, size in enumerate(padded) if dim != 1) or padded[1] not in (1, channels)
            or tensor.numel() != padded[1]
        ):  # fmt: skip
            return (
                f"{name}, which {describe_node(consumer, self.modules)} applies as shape {shape} to a tensor of "
                f"shape {channels_shape}: not one value per channel"
            )
        if (op in _IN_PLACE or (method and op.endswith("_"))) and first:
            return f"{name}, which {describe_node(consumer, self.modules)} writes in place"
        probe = torch.arange(tensor.numel(), dtype=torch.float64).reshape(tensor.shape)
        values = {node.name: probe}
        try:
            for link in chain:
                values[link.name] = call_node(link, lambda n: values[n.name], None)
            result = values[current.name]
            preserved = isinstance(result, Tensor) and result.numel() == probe.numel()
            preserved = preserved and torch.equal(result.reshape(-1).double(), probe.reshape(-1))
        except Exception:  # a foreign op failing on the probe: not shape-only
            preserved = False
        if not preserved:
            return f"{name}, whose values it changes before use ({describe_node(chain[0], self.modules)})"
        try:
            original = model.get_submodule(owner) if owner else model
        except AttributeError:
            original = None
        if container is original:  # the tensor of a layer called elsewhere: the traced copy shares it
            return f"{name}, a tensor of a module it calls as a layer"
        per_channel = padded[1] == channels and channels > 1
        position = 1 - (len(channels_shape) - len(shape))
        view = tuple(-1 if per_channel and dim == position else size for dim, size in enumerate(shape))
        value = tensor.detach().reshape(channels if per_channel else ())
        if (op in _DIVISIONS and first) or (kind == _SHIFT and not per_channel):
            kind = None  # p / x is no scale of x; one shift for all has no channel to put on the primary copy
        module = ChannelTensorOp(value, isinstance(tensor, nn.Parameter), tensor.requires_grad, view, op, method,
                                 first, kind)  # fmt: skip
        return (node, chain, consumer, module)

    @staticmethod
    def _reading_block(node: fx.Node, model: nn.Module) -> str:
        """The innermost module whose ``forward`` made get_attr ``node`` and that is traced through for
        having tensors of its own beside children with tensors (the one to keep whole when the tensor does
        not fold); "" when there is none (the model's own forward reads it)."""
        for path, _ in reversed(list(node.meta.get("nn_module_stack", {}).values())):
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            own = any(t is not None for t in (*module._parameters.values(), *module._buffers.values()))
            if own and any(_has_tensors(child) for child in module.children()):
                return path
        return ""

    def _why_whole(self, target: str, module: nn.Module) -> str:
        """Why a leaf module with tensors is not per channel (it is traced as one node)."""
        why = "has parameters or buffers that are not one value per channel"
        if target in self._kept_whole:
            return f"{why} (its forward reads its {self._kept_whole[target]}): kept whole, as one opaque layer"
        if any(_has_tensors(child) for child in module.children()):
            return f"{why} (tensors of its own beside sub-modules with tensors): kept whole, as one opaque layer"
        return why

    def _strip_after_classifier(self) -> list[str]:
        """Remove the shape-only nodes between the classifier and the output; returns what they called.

        timm heads end in ``head.flatten`` (``nn.Identity`` or ``nn.Flatten``) after ``head.fc``; other
        models reshape or drop out after the logits. A node is dropped when it reads only the logits
        (besides sizes computed from them) and a probe shows it returns the same values in the same
        order (eval mode: dropout is the identity), and the chain ends in the classifier's own shape,
        so the heads' (N, C) logits are what the model returned.
        """
        graph = self.graph_module.graph
        output = next(node for node in graph.nodes if node.op == "output")
        result, chain = output.args[0], []
        modules = self.modules
        self._tail = result  # what the model's output comes from, shape-only nodes aside (error messages)
        while isinstance(result, fx.Node) and not isinstance(modules.get(result.target), nn.Linear):
            source = self._value_preserving_input(result)
            if source is None:
                self._tail = result
                return []  # not shape-only: _find_classifier names it
            chain.append(result)
            result = source
        if not chain or not isinstance(result, fx.Node):
            return []
        final = output.args[0].meta.get("tensor_meta")
        logits = result.meta.get("tensor_meta")
        if final is None or logits is None or tuple(final.shape) != tuple(logits.shape):
            return []
        output.args = (result,)
        for node in chain:  # last first: each one's reader is gone by then
            extras = [extra for extra in node.all_input_nodes if extra not in chain and extra is not result]
            graph.erase_node(node)
            for extra in extras:  # sizes read from the logits (x.view(x.size(0), -1))
                if not extra.users and extra.op in ("call_method", "call_function"):
                    graph.erase_node(extra)
        self.graph_module.recompile()
        return [describe_node(node, modules) for node in chain]

    def _drop_whole_slices(self) -> None:
        """Replace by their input the slices that keep every element (``out[:, :self.out_chs]`` of
        timm's GhostNet where ``out_chs`` is all the channels): in an RDN the tensor may hold more
        channels than the base's (the copies), and the slice would cut them."""
        graph = self.graph_module.graph
        changed = False
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
                continue
            source, index = node.args
            meta = source.meta.get("tensor_meta") if isinstance(source, fx.Node) else None
            if meta is None or not hasattr(meta, "shape"):
                continue
            index = index if isinstance(index, tuple) else (index,)
            if len(index) > len(meta.shape) or not all(
                isinstance(item, slice) and item.step in (None, 1) and item.start in (None, 0)
                and (item.stop is None or (isinstance(item.stop, int) and item.stop >= size))
                for item, size in zip(index, meta.shape, strict=False)
            ):  # fmt: skip
                continue
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            changed = True
        if changed:
            self.graph_module.recompile()

    def _value_preserving_input(self, node: fx.Node) -> fx.Node | None:
        """The one tensor ``node`` reads when it returns that tensor's values in their order (a probe), else None."""
        if node.op not in ("call_module", "call_method", "call_function") or len(node.users) > 1:
            return None
        tensors = [arg for arg in node.all_input_nodes if self._carries_channels(arg)]
        meta = node.meta.get("tensor_meta")
        if len(tensors) != 1 or meta is None or not hasattr(meta, "shape"):
            return None
        (source,) = tensors
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if module is not None and _has_tensors(module):
            return None
        shape = tuple(source.meta["tensor_meta"].shape)
        probe = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(
            device=self._device, dtype=source.meta["tensor_meta"].dtype
        )

        def value(arg: fx.Node):
            if arg is source:
                return probe.clone()
            shape = getattr(arg.meta.get("tensor_meta"), "shape", None)
            if shape is not None:  # another tensor, read for its sizes only (x.size(0) of the logits)
                return torch.zeros(tuple(shape), device=self._device)
            if arg.op in ("call_method", "call_function"):
                return call_node(arg, value, None)
            raise ValueError(f"reads {arg.name}")

        try:
            with torch.no_grad():
                out = call_node(node, value, module)
        except Exception:  # a foreign op failing on the probe: not shape-only
            return None
        if not isinstance(out, Tensor) or out.numel() != probe.numel() or out.shape[:1] != probe.shape[:1]:
            return None
        return source if torch.equal(out.reshape(shape[0], -1), probe.reshape(shape[0], -1)) else None

    def _classify(self, node: fx.Node) -> NodeInfo:
        meta = node.meta.get("tensor_meta")
        is_tensor = meta is not None and hasattr(meta, "shape")
        info = NodeInfo(node, Role.META)
        if is_tensor:
            info.shape, info.dtype = tuple(meta.shape), meta.dtype
        if node.op == "placeholder":
            info.role = Role.INPUT
            return info
        if node.op == "output":
            info.role = Role.OUTPUT
            return info
        if node.op == "get_attr":
            raise ValueError(
                f"node {node.name} reads the attribute {node.target!r} directly (fx get_attr); surgery "
                "supports models whose parameters live in modules"
            )
        info.inputs = [arg.name for arg in node.all_input_nodes if self._carries_channels(arg)]
        if not is_tensor and info.inputs and _holds_tensors(meta):
            # torch.split / chunk / unbind: the parts have fixed sizes, which a sub-network's channel
            # prefix does not have, so what it splits stays un-nested (computed whole by N_1)
            info.why_opaque = (
                "splits its input's channels into parts of fixed sizes (torch.split / chunk / unbind), which "
                "a sub-network's channels cannot follow"
            )
            return info
        if not is_tensor or len(info.shape) < 2:
            return info  # sizes, tuples and scalars: recomputed as they are
        parts = concat_inputs(node)
        if parts is not None and all(self._carries_channels(part) for part in parts):
            info.role = Role.CONCAT
            return info
        if node.op == "call_module":
            module = self.modules[node.target]
            info.module = module
            if isinstance(module, nn.Conv2d):
                info.role = Role.NESTED if module.groups == 1 else Role.GROUPED
                return info
            if isinstance(module, nn.Linear):
                info.role = Role.NESTED
                return info
            if _has_tensors(module) and not _per_channel_tensors(module, info.shape[1]):
                info.role, info.why_opaque = Role.OPAQUE, self._why_whole(node.target, module)
                return info
        info.why_opaque = self._coupling(node, info)
        norm = channel_norm(info.module, info.shape) if info.why_opaque and info.module is not None else None
        if norm is not None and self.norms == "grouped":
            info.role, info.why_opaque = Role.GROUPWISE, None
            return info
        if norm is not None:
            info.why_opaque = (
                f"normalises over all its channels ({norm}); NestConfig(norms='grouped') takes its statistics per "
                "channel group so that it nests"
            )
        splits = [arg for arg in node.all_input_nodes if self.infos[arg.name].why_opaque is not None]
        if info.why_opaque is not None and not info.inputs and splits:  # a part of a split
            split = splits[0].name
            info.why_opaque = f"is a part of {self.describe(split)}, which {self.infos[split].why_opaque}"
        with_tensors = info.module is not None and _has_tensors(info.module)
        per_channel = Role.CHANNEL_PARAMS if with_tensors else Role.CHANNELWISE
        info.role = per_channel if info.why_opaque is None else Role.OPAQUE
        return info

    def _carries_channels(self, node: fx.Node) -> bool:
        meta = node.meta.get("tensor_meta")
        return meta is not None and hasattr(meta, "shape") and len(meta.shape) >= 2

    def _coupling(self, node: fx.Node, info: NodeInfo) -> str | None:
        """Probe: permuting / cutting the channels of every tensor input does the same to the output.

        Returns None when it does (the node acts per channel), else why not (for error messages).
        """
        channel_inputs = [arg for arg in node.all_input_nodes if arg.name in info.inputs]
        if not channel_inputs:
            return "makes a channel tensor without reading one"
        channels = {tuple(arg.meta["tensor_meta"].shape)[1] for arg in channel_inputs}
        if len(channels) != 1:
            return f"combines tensors of different channel counts {sorted(channels)}"
        (count,) = channels
        if info.shape[1] != count:
            shape = tuple(channel_inputs[0].meta["tensor_meta"].shape)
            if len(shape) > 2 and sorted(info.shape) == sorted(shape):  # a permute to or from channels-last
                return (
                    f"permutes the dimensions ({shape} → {info.shape}), to or from a channels-last layout; "
                    "surgery follows channels on dim 1 only"
                )
            return f"changes the channel count ({count} → {info.shape[1]})"
        generator = torch.Generator().manual_seed(0)
        probes = {
            arg.name: torch.randn((2, *arg.meta["tensor_meta"].shape[1:]), generator=generator).to(
                device=self._device, dtype=arg.meta["tensor_meta"].dtype
            )
            for arg in channel_inputs
        }
        permutation = torch.randperm(count, generator=generator)
        prefix = max(count // 2, 1)
        module = self.modules[node.target] if node.op == "call_module" else None
        has_tensors = module is not None and _has_tensors(module)

        def run(index):  # fresh copies for every call: in-place activations overwrite their input
            view = channel_view(module, index) if has_tensors else module
            with torch.no_grad():
                result = self._call(node, {name: t[:, index].clone() for name, t in probes.items()}, view)
            return result if isinstance(result, Tensor) and result.dim() >= 2 else None

        try:
            full = run(slice(None))
        except Exception as error:  # any failure of a foreign op means "not per channel"
            return f"fails on a probe input ({type(error).__name__}: {error})"
        if full is None or full.shape[1] != count:
            return "does not return one tensor with its input's channels"
        try:
            permuted = run(permutation)
        except Exception:
            permuted = None
        if (
            permuted is None
            or permuted.shape != full.shape
            or not torch.allclose(permuted, full[:, permutation], atol=1e-6)
        ):
            return "mixes channels (permuting its input channels does not permute its output alike)"
        try:
            cut = run(slice(0, prefix))
        except Exception:
            cut = None
        if cut is None or cut.shape[1] != prefix or not torch.allclose(cut, full[:, :prefix], atol=1e-6):
            return (
                "couples all channels (its first output channels change, or it fails, when the later input "
                "channels are left out), so no channel group can be computed without the later ones"
            )
        repeated = torch.cat([torch.arange(count), torch.arange(count)])  # an RDN tensor holds copies
        try:
            longer = run(repeated)
        except Exception:
            longer = None
        if longer is None or longer.shape[1] != 2 * count or not torch.allclose(longer, full[:, repeated], atol=1e-6):
            return (
                f"depends on the number of channels ({count}; it fails or cuts them when given more, as a "
                "sub-network with channel copies has)"
            )
        return None

    def _call(self, node: fx.Node, tensors: dict[str, Tensor], module: nn.Module | None = None):
        """Run one node with the given values for its channel inputs (``module`` replaces its layer)."""

        def value(arg: fx.Node):
            if arg.name in tensors:
                return tensors[arg.name]
            if self.infos[arg.name].role is Role.META:  # e.g. x.size(0) of a probed tensor
                return self._call(arg, tensors)
            raise ValueError(f"node {node.name} reads {arg.name}, which is not probed")

        if module is None and node.op == "call_module":
            module = self.modules[node.target]
        return call_node(node, value, module)

    def _check_single_calls(self) -> None:
        calls: dict[str, str] = {}
        for name, info in self.infos.items():
            if info.module is None or not _has_tensors(info.module):
                continue
            if info.node.target in calls:
                raise ValueError(
                    f"module {info.node.target!r} is called twice (nodes {calls[info.node.target]} and {name}); "
                    "surgery needs one call per module with parameters (shared weights are not supported)"
                )
            calls[info.node.target] = name

    def _find_classifier(self) -> str:
        output = next(node for node in self.graph_module.graph.nodes if node.op == "output")
        result = output.args[0]
        if not isinstance(result, fx.Node) or not isinstance(self.modules.get(result.target), nn.Linear):
            tail = self._tail
            got = describe_node(tail, self.modules) if isinstance(tail, fx.Node) else repr(tail)
            raise ValueError(
                "the model's output must be the logits of an nn.Linear classifier (the last layer; identity, "
                f"dropout and reshapes after it are dropped), got {got}; surgery replaces that layer with one "
                "head per sub-network (a conv classifier, as in SqueezeNet, is not supported)"
            )
        info = self.infos[result.name]
        info.role = Role.CLASSIFIER
        if len(result.users) != 1:
            raise ValueError(f"the classifier output {result.name} is used inside the model as well")
        return result.name

    def _resolve_skip(self, skip) -> tuple[str, ...]:
        """Targets of the nestable layers kept un-nested (see :func:`rdn.surgery.nest` for ``skip``)."""
        nestable = [info for info in self.infos.values() if info.role is Role.NESTED]
        if skip is None:  # output stride <= 4, at most the first quarter of the nestable layers
            (source,) = [info for info in self.infos.values() if info.role is Role.INPUT]
            if len(source.shape) != 4:
                return ()
            early = [
                info.node.target for info in nestable if len(info.shape) == 4 and 4 * info.shape[2] >= source.shape[2]
            ]
            # The cap: a model for small inputs (28×28, never past stride 4) would otherwise skip everything.
            return tuple(early[: len(nestable) // 4])
        if isinstance(skip, int):
            return tuple(info.node.target for info in nestable[:skip])
        return tuple(
            info.node.target
            for info in nestable
            if any(info.node.target == name or info.node.target.startswith(name + ".") for name in skip)
        )

    # ------------------------------------------------------------------------------------------
    # Channel spaces
    # ------------------------------------------------------------------------------------------

    def _find(self, name: str) -> str:
        while self._parent[name] != name:
            self._parent[name] = self._parent[self._parent[name]]
            name = self._parent[name]
        return name

    def _union(self, a: str, b: str) -> None:
        a, b = self._find(a), self._find(b)
        if a != b:
            # Keep the earlier node as root: the space is named after where it first appears.
            first, second = sorted((a, b), key=self.position)
            self._parent[second] = first

    def position(self, name: str) -> int:
        """Index of node ``name`` in graph order (a part of a grouped conv's output: that conv's)."""
        return self._order[name.split("/")[0]]

    def _rank(self, name: str) -> tuple[int, str]:
        """A total order of spaces (parts of one conv's output share its position)."""
        return self.position(name), name

    def _build_spaces(self) -> None:
        self._order = {name: index for index, name in enumerate(self.infos)}
        carriers = [
            info
            for info in self.infos.values()
            if info.shape is not None and len(info.shape) >= 2 and info.role not in (Role.OUTPUT, Role.CLASSIFIER)
        ]
        for info in carriers:
            self._parent[info.node.name] = info.node.name
        for info in carriers:
            if info.role in (Role.CHANNEL_PARAMS, Role.CHANNELWISE, Role.GROUPWISE):  # same channels, same layout
                for name in info.inputs:
                    self._union(info.node.name, name)
        for info in carriers:
            info.space_key = self._find(info.node.name)
        self.classifier_input = self.infos[self.classifier].inputs[0]
        if len(self.infos[self.classifier_input].shape) != 2:
            raise ValueError(
                f"the classifier reads a tensor of shape {self.infos[self.classifier_input].shape}; "
                "it must read pooled features (N, F)"
            )

    def space_of(self, name: str) -> str:
        return self.infos[name].space_key

    def _writers(self, role: Role) -> list[NodeInfo]:
        return [info for info in self.infos.values() if info.role == role]

    # ------------------------------------------------------------------------------------------
    # Concatenations: composite spaces made of parts
    # ------------------------------------------------------------------------------------------

    def leaves(self, space: str) -> tuple[str, ...]:
        """The simple spaces a space is made of: its parts when it holds a concatenation, else itself."""
        return self.parts.get(space, (space,))

    def _build_parts(self) -> None:
        """The parts of every space that holds a channel concatenation (see :class:`ConcatSpace`).

        A ``torch.cat`` on the channels makes a *composite* space whose parts are the (simple) spaces of
        what it joins; a grouped conv reading a composite space writes one whose parts are new simple
        spaces (``"<conv>/<i>"``), each sharing its layout with the input part it is computed from.
        Where one space holds several of these (a residual add of two concatenations), their parts
        must have the same channel counts, and the matching parts share one layout; otherwise, or
        where a grouped conv's groups straddle two parts, the space stays un-nested.
        """
        self.parts: dict[str, tuple[str, ...]] = {}
        self._part_channels: dict[str, int] = {}  # parts made for grouped convs → channels
        self._links: list[tuple[str, str, str]] = []  # (space, space, node): one layout, pinned together
        self._group_counts: list[tuple[str, int]] = []  # (space, conv groups in it): a unit is whole groups
        self._conflicts: list[tuple[str, str]] = []  # (simple space, node) kept un-nested
        self._reasons: dict[str, str] = {}  # node → why it un-nests what it touches (not its role's reason)
        for info in self.infos.values():
            name = info.node.name
            if info.role is Role.CONCAT:
                joined = concat_inputs(info.node)
                made = tuple(leaf for part in joined for leaf in self.leaves(self.space_of(part.name)))
            elif info.role is Role.GROUPED:
                made = self._grouped_parts(info)
                if made is None:
                    continue
            else:
                continue
            space = self.space_of(name)
            known = self.parts.get(space)
            if known is None:
                self.parts[space] = made
            elif [self.channels(leaf) for leaf in known] == [self.channels(leaf) for leaf in made]:
                self._links += [(a, b, name) for a, b in zip(known, made, strict=True) if a != b]
            else:
                sizes = [[self.channels(leaf) for leaf in leaves] for leaves in (known, made)]
                why = f"joins concatenations of different channel splits {sizes[0]}, {sizes[1]}"
                self._conflict(known + made, name, why)
        for info in self._writers(Role.GROUPED):
            name = info.node.name
            out_space, in_space = self.space_of(name), self.space_of(info.inputs[0])
            if (out_space in self.parts) != (in_space in self.parts):
                why = "reads or writes a concatenation while the other side of it is not one"
                self._conflict(self.leaves(out_space) + self.leaves(in_space), name, why)
            elif out_space not in self.parts:
                self._links.append((out_space, in_space, name))
                self._group_counts.append((out_space, info.module.groups))

    def _grouped_parts(self, info: NodeInfo) -> tuple[str, ...] | None:
        """The parts a grouped conv writes when it reads a composite space (None: it reads a simple one)."""
        name, conv = info.node.name, info.module
        in_space = self.space_of(info.inputs[0])
        if in_space not in self.parts:
            return None
        per_group_in, per_group_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
        leaves = self.parts[in_space]
        if any(self.channels(leaf) % per_group_in for leaf in leaves):
            why = (f"is a grouped conv whose groups of {per_group_in} channels straddle the parts "
                   f"{[self.channels(leaf) for leaf in leaves]} of the concatenation it reads")  # fmt: skip
            self._conflict(leaves + self.leaves(self.space_of(name)), name, why)
            return None
        made = []
        for index, leaf in enumerate(leaves):
            part = f"{name}/{index}"
            groups = self.channels(leaf) // per_group_in
            self._part_channels[part] = groups * per_group_out
            self._links.append((part, leaf, name))
            self._group_counts.append((part, groups))
            made.append(part)
        return tuple(made)

    def _conflict(self, spaces: tuple[str, ...], node: str, why: str) -> None:
        """Keep ``spaces`` un-nested because of ``node`` (``why``: for error messages)."""
        self._conflicts += [(space, node) for space in spaces]
        self._reasons.setdefault(node, why)

    # ------------------------------------------------------------------------------------------
    # The un-nested region
    # ------------------------------------------------------------------------------------------

    def _pin(self) -> None:
        """Fixed point of the un-nested region (module docstring), remembering what pinned each space.

        Pinning works on simple spaces (a composite space's parts): a part may be un-nested (it lies in
        group 0) while the other parts of its concatenation are nested; a layer writing a composite
        space writes all of it, so it is un-nested as soon as one part is, and then so is every part.
        """
        # pinned space → (node that pinned it, the space whose own cause explains that node, or None:
        # the node is the root cause — the input, an opaque node or a skipped layer)
        self._pinned_by: dict[str, tuple[str, str | None]] = {}

        def pin(space: str, node: str, via: str | None = None) -> bool:
            changed = False
            for leaf in self.leaves(space):
                if leaf not in self._pinned_by:
                    self._pinned_by[leaf] = (node, via)
                    changed = True
            return changed

        for info in self._writers(Role.INPUT) + self._writers(Role.OPAQUE):
            pin(self.space_of(info.node.name), info.node.name)
        for info in self._writers(Role.META):  # splits: what they split stays un-nested
            if info.why_opaque is not None:
                for source in info.inputs:
                    pin(self.space_of(source), info.node.name)
        for space, node in self._conflicts:
            pin(space, node)
        for name in sorted(self.plain, key=self.position):  # the skipped layers
            pin(self.space_of(name), name)
        changed = True
        while changed:
            changed = False
            for info in self._writers(Role.NESTED):
                name = info.node.name
                if name not in self.plain and self._pinned_leaf(self.space_of(name)) is not None:
                    self.plain.add(name)
                    changed = True
            for name in sorted(self.plain, key=self.position):  # an un-nested layer reads all of its input
                via = None if self._is_skipped(name) else self._pinned_leaf(self.space_of(name))
                changed |= pin(self.space_of(name), name, via)  # and writes all of its output in group 0
                for source in self.infos[name].inputs:
                    changed |= pin(self.space_of(source), name, via)
            for info in self._writers(Role.OPAQUE):
                for source in info.inputs:
                    changed |= pin(self.space_of(source), info.node.name)
            for a, b, node in self._links:  # linked spaces share one layout: un-nested together
                for space, other in ((a, b), (b, a)):
                    if other in self._pinned_by:
                        changed |= pin(space, node, other)
        self.pinned: set[str] = set(self._pinned_by)

    def _pinned_leaf(self, space: str) -> str | None:
        """The first un-nested part of ``space`` (itself when simple), None when it has none."""
        return next((leaf for leaf in self.leaves(space) if leaf in self._pinned_by), None)

    def _is_skipped(self, name: str) -> bool:
        info = self.infos[name]
        return info.role is Role.NESTED and info.node.target in self.skipped_targets

    def describe(self, name: str) -> str:
        """Node ``name`` as error messages name it (:func:`describe_node`)."""
        return describe_node(self.infos[name].node, self.modules)

    def _why(self, root: str) -> str:
        """What the root cause ``root`` of an un-nested region does that un-nests it."""
        if root in self._reasons:
            return self._reasons[root]
        info = self.infos[root]
        if info.role is Role.INPUT:
            return "is un-nested (every sub-network reads all of it)"
        if info.role in (Role.OPAQUE, Role.META):
            return info.why_opaque or "does not act per channel"
        return "is kept un-nested by skip"

    def unnested_cause(self, name: str) -> tuple[str, list[str]]:
        """Why nestable layer ``name`` (or any node whose output is un-nested) is un-nested: (root cause
        node, the un-nested nodes the cause reached it through, nearest first). The root is the layer
        itself when it is skipped."""
        if self._is_skipped(name):
            return name, []
        through: list[str] = []
        node, via = self._pinned_by[self._pinned_leaf(self.space_of(name))]
        while via is not None:
            through.append(node)
            node, via = self._pinned_by[via]
        return node, through

    def _short(self, name: str) -> str:
        """Node ``name`` in a path of error messages: the module it calls, or the node's name."""
        node = self.infos[name].node
        return node.target if node.op == "call_module" else name

    def unnested_reason(self, name: str) -> str:
        """Why node ``name`` (a nestable layer kept un-nested, or any node of the un-nested part) is
        un-nested, in words: the skip, or the root cause and what it does."""
        if self._is_skipped(name):
            return SKIPPED_REASON
        root, through = self.unnested_cause(name)
        path = f" (through {', '.join(self._short(n) for n in through)})" if through else ""
        return f"{self.describe(root)} {self._why(root)}{path}"

    def _no_nested_layer_message(self) -> str:
        """The error when nothing is left to nest: which nodes un-nested which layers, and why."""
        layers = [name for name, info in self.infos.items() if info.role is Role.NESTED]
        what = "nn.Conv2d (groups=1) and nn.Linear layers other than the classifier"
        if not layers:
            return f"the model has no nestable layer: surgery nests {what}, and it has none"
        by_root: dict[str, list[tuple[str, list[str]]]] = {}
        for name in layers:
            root, through = self.unnested_cause(name)
            by_root.setdefault(root, []).append((name, through))
        skipped, causes = [], []
        for root, affected in by_root.items():
            others = sorted((item for item in affected if item[0] != root), key=lambda item: len(item[1]))
            if not others:  # a skipped layer that un-nests nothing else
                skipped.append(self.describe(root))
                continue
            texts = [
                self.describe(name) + (" through " + ", ".join(self._short(n) for n in through))
                if through
                else self.describe(name)
                for name, through in others
            ]
            causes.append(f"{self.describe(root)} {self._why(root)}; that un-nests {_listed(texts)}")
        if skipped:
            causes.append(f"skip keeps {_listed(skipped)} un-nested")
        fix = ""
        if self.skipped_targets:
            fix = " (skip=0, or a shorter list of module names, nests the skipped layers)"
        return (
            f"the model has no nestable layer left outside the un-nested part (surgery nests {what}, unless "
            f"their channels must stay un-nested). What un-nests them: {'. '.join(causes)}. "
            f"Skipped layers: {list(self.skipped_targets)}{fix}"
        )

    def is_pinned(self, name: str) -> bool:
        """Whether the output of node ``name`` is un-nested (all of it in group 0)."""
        return all(leaf in self.pinned for leaf in self.leaves(self.space_of(name)))

    def channels(self, space: str) -> int:
        if space in self._part_channels:
            return self._part_channels[space]
        return self.infos[space].shape[1]

    # ------------------------------------------------------------------------------------------
    # Layouts: spaces linked by grouped convs share one unit order and one set of copies
    # ------------------------------------------------------------------------------------------

    def _resolve_layouts(self) -> None:
        """Group the nested (simple) spaces into *layouts* and fix their unit counts.

        A grouped conv maps its input's units one to one onto its output's, so both spaces share
        one layout (order, primary groups, copies). In MobileNeXt a whole stage is one layout: the
        residual stream is the output of every block's last depthwise conv. The matching parts of two
        concatenations added together share one layout too. A layout has n units, n = gcd of every
        member's channel count and every linking conv's group count, so a unit of each member is a
        whole number of conv groups.
        """
        writers = self.nested + [info.node.name for info in self._writers(Role.GROUPED)]
        spaces = {leaf for name in writers for leaf in self.leaves(self.space_of(name))}
        spaces |= {leaf for leaves in self.parts.values() for leaf in leaves} | set(self._part_channels)
        spaces -= self.pinned
        self._layout_parent = {space: space for space in spaces}
        for a, b, _ in self._links:
            if a in spaces and b in spaces:
                a, b = self._layout_root(a), self._layout_root(b)
                if a != b:
                    first, second = sorted((a, b), key=self._rank)
                    self._layout_parent[second] = first
        self.layouts: dict[str, list[str]] = {}
        for space in sorted(spaces, key=self._rank):
            self.layouts.setdefault(self._layout_root(space), []).append(space)
        self.unit_counts: dict[str, int] = {}
        for layout, members in self.layouts.items():
            counts = [self.channels(space) for space in members]
            counts += [
                groups for space, groups in self._group_counts if space in spaces and self.layout_of(space) == layout
            ]
            self.unit_counts[layout] = math.gcd(*counts)
            if self.unit_counts[layout] < self.k:
                raise ValueError(
                    f"k={self.k} is larger than the number of channel units of the tensors {members} "
                    f"({self.unit_counts[layout]} units: gcd of their channel counts and of the group counts "
                    f"of the grouped convs linking them); use k <= {self.unit_counts[layout]} or skip those layers"
                )
        self.units = {space: self.channels(space) // self.unit_counts[self.layout_of(space)] for space in spaces}

    def _layout_root(self, space: str) -> str:
        while self._layout_parent[space] != space:
            space = self._layout_parent[space]
        return space

    def layout_of(self, space: str) -> str:
        """The layout (named after its earliest space) a nested space belongs to."""
        return self._layout_root(space)

    def layout_writers(self, layout: str) -> list[str]:
        """Nested layers writing any space of ``layout`` (or a concatenation holding one), in graph order."""
        members = set(self.layouts[layout])
        return [name for name in self.nested if members.intersection(self.leaves(self.space_of(name)))]

    def layout_definers(self) -> dict[str, str]:
        """First nested writer (graph order) of a space of every layout → that layout, whose order its
        selection decides. A layout written only as part of concatenations (no such writer) has none:
        its units keep their index order."""
        definers = {}
        for layout in self.layouts:
            simple = [name for name in self.layout_writers(layout) if self.space_of(name) not in self.parts]
            if simple:
                definers[simple[0]] = layout
        return definers

    def primary_sizes(self, layout: str) -> tuple[int, ...]:
        """Units per primary group: near-equal, the remainder to the first groups (``split_channels``)."""
        return split_channels(self.unit_counts[layout], self.k)

    def copied_sizes(self, layout: str) -> tuple[int, ...] | None:
        """Units per primary group that get copies: ``copy_fraction`` of each, rounded; None: all."""
        if self.copy_fraction >= 1:
            return None
        return tuple(round(self.copy_fraction * size) for size in self.primary_sizes(layout))

    def _resolve_rungs(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Copies of every layout: the rungs some writer's input needs (fixed point)."""
        rungs = {layout: [{g} for g in range(self.k)] for layout in self.layouts}

        def occupied(space: str) -> set[int]:
            groups = set()
            for leaf in self.leaves(space):
                if leaf in self.pinned:
                    groups.add(0)
                    continue
                layout = self.layout_of(leaf)
                copied = self.copied_sizes(layout) or self.primary_sizes(layout)
                groups |= set(range(self.k)).union(*(r for g, r in enumerate(rungs[layout]) if copied[g]))
            return groups

        changed = True
        while changed:
            changed = False
            for writer in self.nested:
                needed = occupied(self.space_of(self.infos[writer].inputs[0]))
                for layout in {self.layout_of(leaf) for leaf in self.leaves(self.space_of(writer))}:
                    for g in range(self.k):
                        candidates = ladder(g, self.k, self.mode, self.exact)
                        for group in needed:
                            reachable = [q for q in candidates if q >= group]
                            if reachable and reachable[0] not in rungs[layout][g]:
                                rungs[layout][g].add(reachable[0])
                                changed = True
        return {layout: tuple(tuple(sorted(r)) for r in value) for layout, value in rungs.items()}

    def space(self, space: str, orders: dict[str, Iterable[int]]) -> ChannelSpace | ConcatSpace:
        """The :class:`ChannelSpace` of ``space`` given the unit order of every layout (a
        :class:`ConcatSpace` of its parts' for a concatenation with a nested part)."""
        if space in self.parts:
            leaves = self.parts[space]
            if all(leaf in self.pinned for leaf in leaves):
                return ChannelSpace.single_group(self.channels(space), self.num_groups)
            return ConcatSpace(self.num_groups, tuple(self.space(leaf, orders) for leaf in leaves))
        if space in self.pinned:
            return ChannelSpace.single_group(self.channels(space), self.num_groups)
        layout = self.layout_of(space)
        units = self.unit_counts[layout]
        order = tuple(int(u) for u in orders[layout])
        if sorted(order) != list(range(units)):
            raise ValueError(f"order of layout {layout} must be a permutation of its {units} units, got {list(order)}")
        return ChannelSpace(
            self.num_groups,
            self.channels(space),
            self.units[space],
            order,
            self.primary_sizes(layout),
            self.rungs[layout],
            self.copied_sizes(layout),
        )
