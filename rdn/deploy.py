"""Deployment: an RDN's predictions on image files (``rdn infer``) and its sub-networks as stock
modules (``rdn export``).

Both start from a trained RDN (:func:`load_deployable`): a ``finetune`` (or ``nest``) run folder,
its ``checkpoint.pt``, a ``pipeline`` run folder (its ``finetune/`` run, and its policy for early
exits), or an :class:`~rdn.early_exit.EarlyExitModel` file (network, policy, certified λ and input
spec in one). The input's channels, size and normalisation come from the run's ``summary.json``
(``data_spec``, written by :func:`rdn.steps.train`); for runs written before that record, name the
dataset the model was trained on (``dataset=``) and its spec is rebuilt by loading it.

Example::

    deployable = load_deployable("runs/demo")                       # a pipeline run
    rule = ExitRule.choose(deployable)                              # its policy at its operating point
    predictions = predict(deployable, find_images(["photos/"]), rule)
    write_predictions(predictions, "predictions.csv")
    export_subnet(deployable, 3, "exported/")                       # N_3 as TorchScript & co
"""

from __future__ import annotations

import csv
import ctypes
import dataclasses
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rdn.data import IMAGE_SUFFIXES, BatchTransform, DataSpec
from rdn.errors import DeployError
from rdn.export import EXPORT_FILES, write_subnet
from rdn.files import atomic_write, load_torch_data, write_json
from rdn.steps import DataConfig, load_data, load_trained, spec_from_summary

__all__ = [
    "EXPORT_FILES",
    "Deployable",
    "ExitRule",
    "Prediction",
    "decode_images",
    "export_subnet",
    "find_images",
    "load_deployable",
    "predict",
    "reuse_freed_memory",
    "write_predictions",
]



# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory of any size for reuse instead of returning it to the system.

    With glibc's defaults, in a fresh process, a large block (an activation of a few MB and up) is
    mapped fresh from the system when it is allocated and unmapped when it is freed, so every
    forward pass pays a page fault per 4 KB page of its activations; at batch 64 and above that
    costs as much as the network itself on a CPU (static N_7 of the Fashion-MNIST default at batch 256, BN folded,
    channels_last, 2 threads: 64–66 ms with the defaults, 30 ms after this call). The same as
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set before Python starts, or a caching
    allocator (jemalloc, tcmalloc) preloaded. The cost: the process keeps its peak memory
    allocated. ``rdn infer`` calls it (``--no-reuse-freed-memory`` does not). Returns whether it
    applied: False where the C library has no ``mallopt`` (not glibc) or refuses the values.
    """
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # Sizes up to 1 GiB are served from the heap; freed memory is returned only above 2 GiB free.
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))


@dataclass(frozen=True)
class Deployable:
    """A trained RDN ready to run: the network (eval mode), its input spec, where it came from.

    Attributes:
        net: the :class:`~rdn.surgery.RussianDollNet`.
        spec: channels, size, normalisation and class names of its input.
        checkpoint: the checkpoint it was loaded from.
        run: the run folder given (a pipeline run's policy is found there).
        early_exit: the :class:`~rdn.early_exit.EarlyExitModel` when loaded from one's file (its
            policy and λ are the default exit rule).
    """

    net: nn.Module
    spec: DataSpec
    checkpoint: Path
    run: Path
    early_exit: nn.Module | None = None


def load_deployable(source: str | os.PathLike, *, use_ema: bool = True, dataset: str | None = None,
                    data_root: str | os.PathLike | None = None) -> Deployable:  # fmt: skip
    """The RDN of a run (module docstring); its EMA weights when it has them and ``use_ema``.

    Raises :class:`DeployError` when the run records no input spec and no ``dataset`` is given, or
    when the spec does not fit the network (another dataset's channels, size or classes).
    """
    path = Path(source)
    run = path if path.is_dir() else path.parent
    if path.is_file():
        early_exit = _early_exit_model(path)
        if early_exit is not None:
            if early_exit.spec is None:
                raise DeployError(f"{path} was saved without its input spec (EarlyExitModel(..., spec=...)): its "
                                  "images' size and normalisation are unknown")  # fmt: skip
            return Deployable(early_exit.net, early_exit.spec, path, run, early_exit)
    if path.is_dir() and not (path / "checkpoint.pt").is_file() and (path / "finetune" / "checkpoint.pt").is_file():
        path = path / "finetune"  # a pipeline run folder: its fine-tuned RDN
    net, _, checkpoint = load_trained(path, "rdn", use_ema=use_ema)
    summary = checkpoint.parent / "summary.json"
    spec = spec_from_summary(json.loads(summary.read_text())) if summary.is_file() else None
    if spec is None:
        if dataset is None:
            raise DeployError(f"{checkpoint.parent} does not record its input's size and normalisation (no data_spec "
                              "in summary.json: a run older than that record); name the dataset it was trained on "
                              "(--data NAME, and --data-root if needed)")  # fmt: skip
        spec = load_data(DataConfig(dataset=dataset), data_root, seed=0).spec
    net.eval()
    with torch.no_grad():
        try:
            classes = net(torch.zeros(1, spec.in_chans, spec.image_size, spec.image_size), subnet=1).shape[1]
        except RuntimeError as error:  # the convolutions refuse another number of input channels
            raise DeployError(f"{checkpoint} does not take {spec.in_chans}-channel images ({spec.name}): {error}"
                              ) from error  # fmt: skip
    if classes != spec.num_classes:
        raise DeployError(f"{checkpoint} predicts {classes} classes, its data spec ({spec.name}) has "
                          f"{spec.num_classes}")  # fmt: skip
    return Deployable(net, spec, checkpoint, run)


def _early_exit_model(path: Path) -> nn.Module | None:
    """The :class:`~rdn.early_exit.EarlyExitModel` saved at ``path``; ``None`` when it is another file."""
    from rdn.early_exit import FORMAT, EarlyExitModel

    state, _ = load_torch_data(path, what="model file")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return None
    try:
        return EarlyExitModel.load(path)
    except ValueError as error:
        raise DeployError(str(error)) from error


# ----------------------------------------------------------------------------------------------
# Which exit each image takes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExitRule:
    """Where images leave the network: a static sub-network N_s, or the early-exit policy at ε.

    Build it with :meth:`static`, :meth:`early_exit` or :meth:`choose`.
    """

    subnet: int | None = None
    policy: nn.Module | None = None
    epsilon: float | None = None
    lam: float | None = None
    guarantee: str | None = None  # what a risk-controlled calibration certified (rdn.calibration)

    @classmethod
    def static(cls, net: nn.Module, subnet: int) -> ExitRule:
        if isinstance(subnet, bool) or not isinstance(subnet, int) or not 1 <= subnet <= net.num_subnets:
            raise DeployError(f"subnet must be one of 1..{net.num_subnets} (this RDN's sub-networks), got {subnet!r}")
        return cls(subnet=subnet)

    @classmethod
    def early_exit(cls, net: nn.Module, source: str | os.PathLike, epsilon: float | None = None) -> ExitRule:
        """The policy of ``source`` (a pipeline run folder or its ``policy.pt``): at the calibrated
        ``epsilon`` (the paper's λ* rule) when given, else at the run's risk-controlled λ from the
        ``calibration.json`` beside it (with its guarantee), else at its λ* operating point."""
        policy, calibration = _load_policy(net, source)
        certified = calibration.get("risk_control", {}).get("policy")
        if epsilon is None and certified is not None:
            return cls(policy=policy, lam=certified["parameter"], guarantee=certified["guarantee"])
        operating = calibration.get("operating_epsilon")
        if epsilon is None:
            if operating is None:
                raise DeployError(f"{source}: no calibration.json beside the policy names an operating point; give "
                                  f"--epsilon, one of {sorted(policy.lambdas)}")  # fmt: skip
            epsilon = operating
        epsilon = _calibrated(policy, epsilon, source)
        return cls(policy=policy, epsilon=epsilon, lam=policy.lambdas[epsilon])

    @classmethod
    def choose(cls, deployable: Deployable, subnet: int | None = None, policy: str | os.PathLike | None = None,
               epsilon: float | None = None) -> ExitRule:  # fmt: skip
        """``rdn infer``'s choice: ``subnet``, else ``policy``, else the policy of the pipeline run the
        network came from; a :class:`DeployError` when none applies or they contradict each other."""
        if subnet is not None and (policy is not None or epsilon is not None):
            raise DeployError("--subnet runs one sub-network for every image; --policy / --epsilon choose per image: "
                              "give one of them")  # fmt: skip
        if subnet is not None:
            return cls.static(deployable.net, subnet)
        if policy is None and deployable.early_exit is not None:
            if epsilon is not None:
                raise DeployError("an early-exit model file runs at its certified λ; --epsilon applies to a pipeline "
                                  "run's policy")  # fmt: skip
            model = deployable.early_exit
            return cls(policy=model.policy, lam=model.lam, guarantee=model.guarantee)
        if policy is None:
            if not (deployable.run / "policy.pt").is_file():
                raise DeployError(f"{deployable.run} has no early-exit policy (policy.pt of an `rdn pipeline` run): "
                                  f"give --subnet S (1..{deployable.net.num_subnets}) or --policy")  # fmt: skip
            policy = deployable.run
        return cls.early_exit(deployable.net, policy, epsilon)

    def describe(self) -> str:
        if self.subnet is not None:
            return f"static N_{self.subnet}"
        if self.guarantee is not None:
            where = "every image runs N_K" if self.lam is None else f"λ = {self.lam:.4g}"
            return f"early exits, risk-controlled ({where}): {self.guarantee}"
        if self.lam is None:
            return f"early exits at ε = {self.epsilon:g} (not reached in calibration: every image runs N_K)"
        return f"early exits at ε = {self.epsilon:g} (λ* = {self.lam:.4g})"


def _load_policy(net: nn.Module, source: str | os.PathLike) -> tuple[nn.Module, dict]:
    """(the policy of ``source`` sized for ``net``, the calibration.json beside it or {})."""
    from rdn.policy import ExitPolicy

    path = Path(source)
    path = path / "policy.pt" if path.is_dir() else path
    if not path.is_file():
        raise DeployError(f"{source}: no policy.pt (an `rdn pipeline` run folder or its policy.pt is expected)")
    state = load_torch_data(path, what="policy file")[0]
    if "mlp.2.weight" not in state or "_extra_state" not in state:
        raise DeployError(f"{path} is not an exit policy's state_dict (rdn.policy.ExitPolicy)")
    extra = state["_extra_state"]
    policy = ExitPolicy.for_network(net, mode=extra["mode"], target=extra.get("target", "correctness"),
                                    **ExitPolicy.architecture_of(state))  # fmt: skip
    own = policy.state_dict()
    differing = [f"{key}: {tuple(state[key].shape)} vs {tuple(own[key].shape)}" for key in own
                 if isinstance(own[key], Tensor) and (key not in state or state[key].shape != own[key].shape)]
    if differing or set(state) != set(own):
        raise DeployError(f"{path} is the policy of another network (its state vs this RDN's: "
                          f"{'; '.join(differing[:3]) or sorted(set(state) ^ set(own))})")  # fmt: skip
    policy.load_state_dict(state)
    calibration = path.parent / "calibration.json"
    return policy.eval(), json.loads(calibration.read_text()) if calibration.is_file() else {}


def _calibrated(policy: nn.Module, epsilon: float, source) -> float:
    """The calibrated ε equal to ``epsilon`` up to the 4 decimals reports print; DeployError otherwise."""
    calibrated = sorted(policy.lambdas)
    if isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) and math.isfinite(epsilon):
        nearest = min(calibrated, key=lambda e: abs(e - epsilon), default=None)
        if nearest is not None and abs(nearest - epsilon) <= 5e-5:
            return nearest
    raise DeployError(f"ε = {epsilon!r} was not calibrated for the policy of {source}; calibrated: "
                      f"{', '.join(f'{e:g}' for e in calibrated)}")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files (:data:`rdn.data.IMAGE_SUFFIXES`) among ``paths``, folders searched recursively, sorted."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            found.append(item)
        else:
            raise DeployError(f"{item} does not exist")
    if not found:
        raise DeployError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return found


def _decode(path: Path, spec: DataSpec) -> Tensor:
    """uint8 (C, H, W) of one image file, grey or RGB, at the spec's size as its evaluation saw it:
    a streamed image folder's runs resize the shorter side to size / 0.875 and centre crop
    (:class:`rdn.data.folder.EvalTransform`); the in-memory datasets' images are resized whole."""
    import numpy as np
    from PIL import Image  # Pillow: a dependency of matplotlib, always there with rdn

    from rdn.data.folder import EvalTransform, decode_image

    size = spec.image_size
    image = decode_image(path, "L" if spec.in_chans == 1 else "RGB")
    if spec.name == "imagefolder":
        image = EvalTransform(size).crop(image)
    elif image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8).reshape(size, size, -1)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def decode_images(files: Sequence[Path], spec: DataSpec) -> Tensor:
    """uint8 (N, C, H, W) of the image ``files`` converted to ``spec``'s channels (grey or RGB) and size.

    Decoded by Pillow (:func:`rdn.data.folder.decode_image`, the training folder dataset's decoder);
    a :class:`DeployError` when a file is not an image Pillow reads.
    """
    images = []
    for path in files:
        try:
            images.append(_decode(path, spec))
        except (OSError, ValueError) as error:  # "not an image I can read"
            raise DeployError(f"{path} cannot be decoded as an image: {error}") from error
    return torch.stack(images)


# ----------------------------------------------------------------------------------------------
# Predictions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """One image's prediction: its class (index and name), the softmax probability of that class,
    the 1-based exit that produced it and the multiply-accumulates spent on it (policy included)."""

    file: str
    label: int
    class_name: str
    probability: float
    exit: int
    macs: float


@torch.no_grad()
def predict(deployable: Deployable, files: Sequence[Path], rule: ExitRule, batch_size: int = 64,
            device: torch.device | str | None = None, *, walk: str = "staged", fold_batch_norms: bool = False,
            channels_last: bool = False) -> list[Prediction]:  # fmt: skip
    """Predictions for the image ``files`` under ``rule``, ``batch_size`` images per forward pass.

    Speed options, the same predictions: ``walk`` the early-exit engine's (:func:`rdn.inference.dynamic_forward`'s
    ``strategy``), ``fold_batch_norms`` runs :func:`rdn.surgery.fold_batch_norms`' inference copy,
    ``channels_last`` the channels_last memory format (``benchmarks/results/deploy_fashion_mnist_cpu.md``).
    """
    from rdn.inference import STRATEGIES, dynamic_forward
    from rdn.policy import exit_macs
    from rdn.surgery import fold_batch_norms as fold

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DeployError(f"batch size must be a positive int, got {batch_size!r}")
    if walk not in STRATEGIES:
        raise DeployError(f"walk must be one of {list(STRATEGIES)}, got {walk!r}")
    device = torch.device(device or "cpu")
    net, spec = deployable.net.to(device).eval(), deployable.spec
    if fold_batch_norms:
        net = fold(net)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    policy = rule.policy.to(device) if rule.policy is not None else None
    transform = BatchTransform(spec, train=False)
    costs = exit_macs(net)
    predictions = []
    for begin in range(0, len(files), batch_size):
        chunk = files[begin : begin + batch_size]
        x = transform(decode_images(chunk, spec).to(device), torch.arange(len(chunk)))
        x = x.contiguous(memory_format=memory_format)
        if rule.subnet is not None:
            logits, exits = net(x, subnet=rule.subnet), torch.full((len(chunk),), rule.subnet)
            macs = costs[exits - 1]
        else:
            output = dynamic_forward(net, policy, x, rule.lam, walk)
            logits, exits = output.logits, output.exits.cpu()
            macs = costs[exits - 1] + policy.rule_macs(exits, rule.lam)
        probability, label = torch.softmax(logits.float(), dim=1).max(dim=1)
        predictions += [Prediction(str(path), int(c), spec.classes[int(c)], float(p), int(e), float(m))
                        for path, c, p, e, m in zip(chunk, label.cpu(), probability.cpu(), exits, macs, strict=True)]
    return predictions


def write_predictions(predictions: Sequence[Prediction], path: str | os.PathLike | None = None) -> None:
    """``path`` ending in ``.csv`` or ``.json`` (written atomically), or CSV on stdout when ``None``."""
    rows = [dataclasses.asdict(p) for p in predictions]
    if path is not None and Path(path).suffix.lower() == ".json":
        write_json(path, rows)
        return
    if path is not None and Path(path).suffix.lower() != ".csv":
        raise DeployError(f"predictions file {path}: the name must end in .csv or .json")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=[field.name for field in dataclasses.fields(Prediction)])
    writer.writeheader()
    writer.writerows(rows)
    if path is None:
        sys.stdout.write(text.getvalue())
    else:
        atomic_write(path, lambda tmp: tmp.write_text(text.getvalue()))


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def export_subnet(deployable: Deployable, subnet: int, out: str | os.PathLike,
                  formats: Sequence[str] | None = None) -> dict[str, Path]:  # fmt: skip
    """Write N_``subnet`` of the deployable's RDN as stock torch modules into ``out``
    (:func:`rdn.export.write_subnet`: formats, files and ``export.json``). Returns format → path."""
    return write_subnet(deployable.net, deployable.spec, subnet, out, formats, source=str(deployable.checkpoint))
