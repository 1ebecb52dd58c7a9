"""DDP over a streamed image folder: two gloo processes (what ``torchrun --nproc-per-node 2 -m rdn ...
--data imagefolder`` starts) each decode their own half of every global batch from disk, keep identical
replicas, and split the evaluation; the run folder is written once."""

from __future__ import annotations

import json
import os

import torch
import torch.multiprocessing as mp

from rdn.models import create
from rdn.steps import DataConfig, load_data, train
from rdn.train import TrainConfig, model_config_of
from tests.test_cli_image_folder import write_jpeg_folder
from tests.train.test_distributed import _free_port

CONFIG = TrainConfig(epochs=1, batch_size=8, lr=0.1, warmup_epochs=0.0, progress=False, eval_batch_size=4,
                     steps_per_epoch=3, seed=0)  # fmt: skip
DATA = DataConfig(dataset="imagefolder", image_size=16, num_workers=0)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights in every process
    return create("mobilenet_v2", num_classes=3, input_size=16, in_chans=3, width_mult=0.1)


def _worker(rank: int, world_size: int, port: int, folder: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
    torch.set_num_threads(1)
    data = load_data(DATA, os.path.join(folder, "images"), seed=0)
    model, batches = _model(), []
    model.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]) if m.training else None)
    result = train(model, data, CONFIG, os.path.join(folder, "run"), model_config=model_config_of(model),
                   device="cpu")  # fmt: skip
    torch.save({"state": result.model.state_dict(), "batches": batches, "history": result.history},
               os.path.join(folder, f"rank{rank}.pt"))  # fmt: skip


def test_two_processes_train_one_model_from_a_folder(tmp_path):
    write_jpeg_folder(tmp_path / "images", train=12, val=2)  # 36 images, a few held out to calibrate
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key  # DDP keeps the replicas identical
    assert ranks[0]["batches"] == ranks[1]["batches"] == [4] * 3  # each process decodes half the global batch
    # evaluation is split over the processes and summed: both report the same accuracy of the 6 val images
    assert ranks[0]["history"][-1]["test_top1_1"] == ranks[1]["history"][-1]["test_top1_1"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())  # written by the main process only
    assert summary["steps"] == 3 and summary["data_spec"]["name"] == "imagefolder"
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
