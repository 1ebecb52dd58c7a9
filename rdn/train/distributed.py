"""Process group set-up for ``torchrun`` (DDP) and the collectives the loop needs.

``torchrun --nproc-per-node N -m rdn finetune ...`` sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; :func:`setup_distributed` reads them and joins the group (NCCL on
GPUs, gloo on CPU). Without them everything runs in one process and the collectives are no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "all_reduce_sum", "average_buffers", "setup_distributed", "teardown_distributed"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, training on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def setup_distributed(device: str | torch.device | None = None, backend: str | None = None) -> DistContext:
    """Join the process group torchrun describes (if any) and pick this process's device.

    Args:
        device: ``cpu``, ``cuda`` (this process's GPU ``cuda:LOCAL_RANK``) or ``None`` (CUDA when available).
        backend: ``nccl`` / ``gloo``; ``None``: NCCL for CUDA, gloo for CPU.
    """
    world_size, rank, local_rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = torch.device(device) if device is not None else None
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but torch sees no CUDA GPU; use --device cpu")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"device must be cpu or cuda, got {device}")
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, device)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Sum of ``values`` over all processes (in place; the tensor itself when single-process)."""
    if context.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


@torch.no_grad()
def average_buffers(module: torch.nn.Module, context: DistContext) -> None:
    """Replace every floating-point buffer of ``module`` (BatchNorm's running statistics) by its mean over
    the processes, in place. DDP keeps the parameters equal but each process updates its running
    statistics from its own share of the batch, so without this the processes would evaluate (and
    rank 0 would save) different models; integer buffers (counters) are equal already."""
    if not context.distributed:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(context.world_size)
