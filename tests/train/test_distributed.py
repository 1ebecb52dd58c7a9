"""DDP: two gloo processes on the CPU train exactly what one process does with the same global batch."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from rdn.train import TrainConfig, fit, setup_distributed, teardown_distributed
from tests.train.helpers import synthetic, tiny_rdn

CONFIG = TrainConfig(epochs=2, batch_size=16, lr=0.2, warmup_epochs=0.5, ema_decay=0.9, progress=False,
                     eval_batch_size=64, steps_per_epoch=4)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train(context=None, out=None) -> tuple[torch.nn.Module, list[float], list[dict], list[int]]:
    """Returns the model, the loss of every step, the epoch rows and the batch size of every training forward."""
    model = tiny_rdn(seed=0)  # the same seeded model in every process
    losses, batches = [], []
    model.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]) if m.training else None)
    record = [lambda info: losses.append(info.loss)]
    result = fit(model, synthetic(), CONFIG, context=context, out=out, callbacks=record)
    return model, losses, result.history, batches


def _worker(rank: int, world_size: int, port: int, folder: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
    torch.set_num_threads(1)
    context = setup_distributed("cpu")
    try:
        model, losses, history, batches = _train(context, out=os.path.join(folder, "run"))
        torch.save({"state": model.state_dict(), "losses": losses, "history": history, "batches": batches},
                   os.path.join(folder, f"rank{rank}.pt"))  # fmt: skip
        # Both processes are done before either tears the group down: a full `make test` once saw
        # rank 1 abort in gloo ("terminate called without an active exception") at the teardown.
        torch.distributed.barrier()
    finally:
        teardown_distributed()


def test_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key  # DDP keeps the replicas identical
    model, losses, history, batches = _train()
    assert len(losses) == len(ranks[0]["losses"]) == 8
    assert batches == [16] * 8 and ranks[0]["batches"] == ranks[1]["batches"] == [8] * 8  # each rank half the batch
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    # Evaluation is split over the ranks and summed: the same accuracies as one process.
    for column in ("test_top1_1", "test_top5_3", "ema_test_top1_2"):
        assert ranks[0]["history"][-1][column] == history[-1][column]
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and (tmp_path / "run" / "log.csv").is_file()
