"""A sub-network of an RDN as stock torch modules on disk (``rdn export``, :meth:`EarlyExitModel.export`)."""

from __future__ import annotations

import importlib.util
import io
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from rdn.data import DataSpec
from rdn.errors import DeployError
from rdn.files import atomic_write, write_json

__all__ = ["EXPORT_FILES", "write_subnet"]

# What `write_subnet` writes into its folder, by format, and its description.
_EXPORT_NAMES = {"state_dict": "state_dict.pt", "torchscript": "model.torchscript.pt",
                 "exported_program": "model.pt2", "onnx": "model.onnx"}  # fmt: skip
EXPORT_FILES = (*_EXPORT_NAMES.values(), "export.json")


def write_subnet(net: nn.Module, spec: DataSpec, subnet: int, out: str | os.PathLike,
                 formats: Sequence[str] | None = None, source: str = "") -> dict[str, Path]:  # fmt: skip
    """Write sub-network N_``subnet`` of ``net`` (a RussianDollNet, moved to the CPU) as a module of stock
    layers (:meth:`RussianDollNet.export`) into ``out``; ``spec`` gives the example input's shape and
    the normalisation recorded beside it, ``source`` where the network came from.

    Formats: ``state_dict`` (``torch.save`` of its state dict), ``torchscript`` (``torch.jit.trace``
    on one input of the spec's shape; runs any batch size), ``exported_program`` (``torch.export``
    with a dynamic batch dimension, saved with ``torch.export.save``: what torch now recommends over
    TorchScript), ``onnx`` (``torch.onnx.export``, needs the onnx package, dynamic batch); default:
    the first three, and onnx when installed.
    Beside them ``export.json``: input shape, normalisation, class names, MACs and parameters.
    Files already in ``out`` are replaced. Returns format → path.
    """
    net = net.cpu().eval()
    if isinstance(subnet, bool) or not isinstance(subnet, int) or not 1 <= subnet <= net.num_subnets:
        raise DeployError(f"subnet must be one of 1..{net.num_subnets} (this RDN's sub-networks), got {subnet!r}")
    onnx_installed = importlib.util.find_spec("onnx") is not None
    if formats is None:
        formats = ["state_dict", "torchscript", "exported_program"] + (["onnx"] if onnx_installed else [])
    unknown = sorted(set(formats) - set(_EXPORT_NAMES))
    if unknown or not formats:
        raise DeployError(f"export formats must be among {list(_EXPORT_NAMES)}, got {list(formats)}")
    if "onnx" in formats and not onnx_installed:
        raise DeployError("ONNX export needs the onnx package (pip install onnx); the other formats do not")
    out = Path(out)
    module = net.export(subnet).eval()
    example = torch.zeros(1, spec.in_chans, spec.image_size, spec.image_size)
    written: dict[str, Path] = {}
    if "state_dict" in formats:
        state = module.state_dict()
        written["state_dict"] = atomic_write(out / _EXPORT_NAMES["state_dict"], lambda tmp: torch.save(state, tmp))
    if "torchscript" in formats:
        with torch.no_grad():
            traced = torch.jit.trace(module, example)
        written["torchscript"] = atomic_write(out / _EXPORT_NAMES["torchscript"], lambda tmp: traced.save(str(tmp)))
    if "exported_program" in formats:
        # Traced on two images: an example batch of 1 would specialise the batch dimension to 1.
        program = torch.export.export(module, (example.expand(2, -1, -1, -1),),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))  # fmt: skip
        archive = io.BytesIO()  # torch.export.save warns about a file name not ending in .pt2 (the temporary's)
        torch.export.save(program, archive)
        written["exported_program"] = atomic_write(out / _EXPORT_NAMES["exported_program"],
                                                   lambda tmp: tmp.write_bytes(archive.getvalue()))  # fmt: skip
    if "onnx" in formats:
        written["onnx"] = atomic_write(out / _EXPORT_NAMES["onnx"], lambda tmp: _onnx_export(module, example, tmp))
    written["description"] = write_json(out / EXPORT_FILES[-1], {
        "source": source, "subnet": subnet, "input_shape": ["batch", *example.shape[1:]],
        "preprocessing": "pixels / 255, then (x - mean) / std per channel", "mean": list(spec.mean),
        "std": list(spec.std), "classes": list(spec.classes), "macs": net.macs(subnet), "params": net.params(subnet),
        "files": {kind: path.name for kind, path in written.items()}, "torch": torch.__version__,
    })  # fmt: skip
    return written


def _onnx_export(module: nn.Module, example: Tensor, path: Path) -> None:
    import onnx

    # dynamo=False: the TorchScript-based exporter, which needs onnx only (the dynamo one also needs onnxscript).
    torch.onnx.export(module, (example,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)  # fmt: skip
    onnx.checker.check_model(str(path))
