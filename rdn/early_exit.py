"""An RDN with its calibrated early-exit rule, as one object: calibrate, run, save, load, export.

::

    model = EarlyExitModel.calibrate(net, calibration_loader, tolerance=0.005)   # δ, at confidence 0.9
    logits, exits = model(images)            # real early exit: each image stops at its own N_s
    model.save("model.rdn.pt")               # network + policy + calibration + preprocessing, one file
    model = EarlyExitModel.load("model.rdn.pt")
    model.export("exported/", subnet=2)      # a static sub-network as stock torch modules

:meth:`EarlyExitModel.calibrate` collects every exit's outputs on the data it is given (labels are
never read: unlabelled images work), trains the exit policy to predict agreement with N_K
(:class:`~rdn.policy.ExitPolicy`, ``target="agreement"``) and certifies the most aggressive λ whose
disagreement rate with N_K is at most ``tolerance`` with probability ≥ ``confidence``
(:func:`rdn.calibration.calibrate_consistency`, Learn-then-Test). The policy and the certification
must not see the same images (the guarantee would not hold), so without ``policy_data`` the
calibration images are split in two at random: half train the policy, half calibrate it.

The file :meth:`EarlyExitModel.save` writes is data only (tensors, numbers, strings): it is read back
with PyTorch's weights-only unpickler (:func:`rdn.files.load_torch_data`), so loading a model file
from elsewhere executes nothing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from rdn.calibration import RiskControl, calibrate_consistency
from rdn.data import DataSpec
from rdn.files import atomic_write, load_torch_data
from rdn.inference import dynamic_forward
from rdn.policy import ExitOutputs, ExitPolicy, collect_exit_outputs, exit_macs, fit_policy

__all__ = ["FORMAT", "FORMAT_VERSION", "EarlyExit", "EarlyExitModel"]

# What the first keys of a saved model say, so that another file given by mistake is named as such.
FORMAT = "rdn.EarlyExitModel"
FORMAT_VERSION = 1


class EarlyExit(NamedTuple):
    """Output of :class:`EarlyExitModel`: ``logits`` (N, classes), row i from N_{exits[i]}; ``exits``
    (N,) int64, 1-based."""

    logits: Tensor
    exits: Tensor


def _split_outputs(outputs: ExitOutputs, seed: int) -> tuple[ExitOutputs, ExitOutputs]:
    """Two disjoint random halves of ``outputs`` (policy training, calibration)."""
    order = torch.randperm(outputs.num_samples, generator=torch.Generator().manual_seed(seed))
    halves = order[: outputs.num_samples // 2], order[outputs.num_samples // 2 :]

    def take(rows: Tensor) -> ExitOutputs:
        return ExitOutputs(**{name: None if value is None else value[rows]
                              for name, value in dataclasses.asdict(outputs).items()})  # fmt: skip

    return take(halves[0]), take(halves[1])


class EarlyExitModel(nn.Module):
    """An RDN, its exit policy and the certified λ (module docstring).

    Args:
        net: a :class:`~rdn.surgery.RussianDollNet`.
        policy: its :class:`~rdn.policy.ExitPolicy`.
        risk: the calibration's outcome (:class:`~rdn.calibration.RiskControl`); its ``parameter``
            is the λ the model runs at (``None``: every image runs N_K, as one static pass).
        spec: the input the network expects (channels, size, normalisation, class names), if known;
            :meth:`save` keeps it so that a deployment knows how to preprocess images.

    ``strategy`` (an attribute, ``"staged"`` by default, not saved: how to run, not what the model is)
    picks the engine's walk (:func:`rdn.inference.dynamic_forward`): ``"jump"`` takes the same exits
    with one step from N_1 to N_K for the images that go on, faster where each stop's fixed cost
    outweighs the later groups it saves (on this project's CPU, every network measured:
    ``benchmarks/results/deploy_fashion_mnist_cpu.md``); ``"recompute"`` runs one static pass of the
    whole network for them instead of the step, faster again where that step costs more than the
    pass (``benchmarks/results/deploy_allocators_fashion_mnist_cpu.md``).
    """

    strategy: str = "staged"

    def __init__(self, net: nn.Module, policy: ExitPolicy, risk: RiskControl, spec: DataSpec | None = None) -> None:
        super().__init__()
        if risk.rule != "policy":
            raise ValueError(f"risk must be a calibration of the policy's λ (rule 'policy'), got rule {risk.rule!r}")
        policy.check_network(net)
        self.net = net.eval()
        self.policy = policy.eval()
        self.risk = risk
        self.spec = spec

    @property
    def lam(self) -> float | None:
        """The certified λ (``None``: always N_K)."""
        return self.risk.parameter

    @property
    def guarantee(self) -> str:
        """What the calibration certifies, in words."""
        return self.risk.guarantee

    @classmethod
    def calibrate(
        cls,
        net: nn.Module,
        calibration_data: Iterable,
        *,
        tolerance: float = 0.005,
        confidence: float = 0.9,
        policy_data: Iterable | None = None,
        policy_epochs: int = 10,
        hidden: int = 16,
        members: int = 3,
        mode: str = "sequential",
        exits: Sequence[int] | None = None,
        spec: DataSpec | None = None,
        device: torch.device | str | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> EarlyExitModel:
        """Train the policy and certify λ on held-out images (module docstring).

        Args:
            net: a trained :class:`~rdn.surgery.RussianDollNet`.
            calibration_data: (images, anything) batches — e.g. a DataLoader — exchangeable with the
                images the model will see and not used to train ``net``. Their second element is
                not read (unlabelled data: pass any tensor). At least
                :func:`~rdn.calibration.minimum_samples` images are needed for any early exit to be
                certified (about 460 at the defaults; thousands certify more).
            tolerance: δ, the tolerated fraction of images predicted differently from N_K (which
                bounds the accuracy drop against N_K), in [0, 1).
            confidence: 1 − α, the probability over the calibration draw that the bound holds.
            policy_data: batches to train the policy on (its exits' agreement with N_K; unlabelled is
                fine, and the training split may be used). Default: a random half of
                ``calibration_data``, the other half certifies λ.
            policy_epochs, hidden, members, mode: the policy's training epochs, width, ensemble size
                and decision mode (:class:`~rdn.policy.ExitPolicy`).
            exits: the 1-based exits the policy may take (must include K); default all.
            spec: the network's input spec, saved with the model.
            device: where to run the network; default where the batches are.
            seed: the policy's initialisation, shuffling and the calibration split.
        """
        calibration = collect_exit_outputs(net, calibration_data, device, progress)
        if policy_data is None:
            training, calibration = _split_outputs(calibration, seed)
        else:
            training = collect_exit_outputs(net, policy_data, device, progress)
        torch.manual_seed(seed)
        policy = ExitPolicy.for_network(net, hidden=hidden, mode=mode, target="agreement", members=members)
        if exits is not None:
            policy.restrict_exits(exits)
        fit_policy(policy, training, epochs=policy_epochs, seed=seed, progress=progress)
        policy = policy.to(next(net.parameters()).device)
        risk = calibrate_consistency(policy, calibration, tolerance, 1.0 - confidence, macs=exit_macs(net))
        return cls(net, policy, risk, spec)

    @torch.no_grad()
    def forward(self, images: Tensor) -> EarlyExit:
        """(N, C, H, W) normalised images → :class:`EarlyExit` (logits, 1-based exits)."""
        output = dynamic_forward(self.net, self.policy, images, self.lam, self.strategy)
        return EarlyExit(output.logits, output.exits)

    # ------------------------------------------------------------------------------------------
    # One file
    # ------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything :meth:`load` needs, as tensors and plain values."""
        from rdn.train.checkpoint import model_config_of

        policy = self.policy
        risk = dataclasses.asdict(self.risk)
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model_config": model_config_of(self.net),
            "model": {name: value.cpu() for name, value in self.net.state_dict().items()},
            "policy_config": {"feature_width": policy.feature_width, "mode": policy.mode, "target": policy.target,
                              **ExitPolicy.architecture_of(policy.state_dict())},  # fmt: skip
            "policy": {name: value.cpu() if isinstance(value, Tensor) else value
                       for name, value in policy.state_dict().items()},  # fmt: skip
            "risk": risk,
            "spec": None if self.spec is None else dataclasses.asdict(self.spec),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to ``path`` as one file, atomically (a crash never leaves half a file)."""
        state = self.state()
        return atomic_write(path, lambda temporary: torch.save(state, temporary))

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu",
             model: nn.Module | None = None) -> EarlyExitModel:  # fmt: skip
        """The model :meth:`save` wrote; ValueError when ``path`` is another kind of file.

        ``model``: a dense model of the network's architecture (weights unused), needed when the RDN
        was nested from a model that ``rdn.models.create`` does not build (your own); the RDN's
        structure is rebuilt on it from the record saved in the file.
        """
        from rdn.surgery import RussianDollNet
        from rdn.train.checkpoint import build_model

        state, _ = load_torch_data(path, map_location, what="early-exit model file")
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{path} is not an early-exit model file ({FORMAT}, written by EarlyExitModel.save)")
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} is an early-exit model file of format version {state.get('version')}; this "
                             f"version of rdn reads version {FORMAT_VERSION}")  # fmt: skip
        config = state["model_config"]
        if model is not None and config.get("kind") == "rdn":
            net = RussianDollNet.from_config(config["rdn_config"], model)
        elif config.get("kind") == "rdn" and not config["rdn_config"].get("base"):
            raise ValueError(f"{path} holds an RDN nested from a model rdn.models cannot build: pass model= (a dense "
                             "model of the same architecture; its weights are not used)")  # fmt: skip
        else:
            net = build_model(config)
        net.load_state_dict(state["model"])
        config = state["policy_config"]
        # Files written before ensembles hold one MLP and no "members".
        policy = ExitPolicy(config["feature_width"], state["policy"]["savings"], config["hidden"], config["mode"],
                            config["target"], config.get("members", 1))  # fmt: skip
        policy.load_state_dict(state["policy"])
        spec = state["spec"]
        if spec is not None:
            spec = DataSpec(**{key: tuple(value) if isinstance(value, list) else value for key, value in spec.items()})
        return cls(net.to(map_location), policy.to(map_location), RiskControl(**state["risk"]), spec)

    def export(self, out: str | os.PathLike, subnet: int | None = None,
               formats: Sequence[str] | None = None) -> dict[str, Path]:  # fmt: skip
        """Write the static sub-network N_``subnet`` (default N_K) as stock torch modules into ``out``
        (:func:`rdn.export.write_subnet`: TorchScript, ExportedProgram, ONNX, state dict; needs
        ``spec``). The early-exit engine itself is data-dependent control flow that runs with rdn."""
        from rdn.export import write_subnet

        if self.spec is None:
            raise ValueError("export needs the input spec (EarlyExitModel(..., spec=...)) for the example input")
        subnet = self.net.num_subnets if subnet is None else subnet
        return write_subnet(self.net, self.spec, subnet, out, formats, source="EarlyExitModel")
