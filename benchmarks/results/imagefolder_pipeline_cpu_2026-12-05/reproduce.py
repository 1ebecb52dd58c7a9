"""Reproduce this folder's measurements: the streamed image-folder path end to end on the CPU.

    .venv/bin/python benchmarks/results/imagefolder_pipeline_cpu_2026-12-05/reproduce.py [--work DIR]

1. ``tools/make_image_folder.py`` writes two JPEG folders from Fashion-MNIST (64×64 RGB, ImageNet
   layout): 100 and 400 training images per class (1,000 / 4,000), 20 validation images per class.
2. Peak memory against the folder's size: ``rdn pretrain`` with the same schedule (20 steps of 64
   images) on each folder.
3. On the 1,000-image folder, ``rdn pipeline --data imagefolder`` (pretrain → nest → joint
   fine-tune → exit outputs → nesting order → policy and risk-controlled calibration → evaluation
   → report), then ``rdn infer`` of the validation folder with the run's calibrated early exits.

Every command runs in its own process, watched every 0.1 s through /proc: wall time, the peak
resident memory (RSS) of the main process and of its largest DataLoader worker; for the pipeline,
per step (its "[i/n] ...: running" lines split the time). Images/s: the training steps' own
throughput (``log.csv``), else images handled over the command's wall time. Writes
``results.json``, the commands' output (``log_*.txt``) and the pipeline run's ``settings.json``,
``evaluation.json``, ``calibration.json``, ``report.md`` (with its plots) and ``rdn infer``'s
``predictions_val.csv`` beside this script; README.md's tables are copied from results.json.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
PYTHON = sys.executable
SIZES = {"1k": 100, "4k": 400}  # training images per class
# 20 validation images per class: the first run's size, kept so that the rerun compares with it (that run
# was limited by fit's per-epoch evaluation keeping every batch's autograd graph, fixed since).
VAL_PER_CLASS = 20
# --crop-scale 0.35: less zoom into the centred garments of 64-pixel images than ImageNet's 0.08 (it
# did not change the short schedule's eval-mode accuracy: README.md).
COMMON = ["--data", "imagefolder", "--image-size", "64", "--crop-scale", "0.35", "--num-workers", "1", "--threads",
          "2"]  # fmt: skip
MODEL = ["--model", "mobilenet_v2", "--width-mult", "0.25"]
# Evaluation batches as large as the training ones (see VAL_PER_CLASS).
EVAL = ["--eval-batch-size", "64"]
PIPELINE = ["--k", "4", "--base-epochs", "3", "--finetune-epochs", "2", "--batch-size", "64", *EVAL, "--tolerance",
            "0.05", "--repeats", "3", "--bench-batch", "64", "--no-time-every-subnet", "--no-progress"]  # fmt: skip
LIMIT_KIB = 12 * 1024 * 1024  # a run above this is killed (the machine is shared)


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def measure(command: list[str], log: Path) -> dict:
    """Run ``command``; wall time, peak RSS (main, largest worker) overall and per pipeline step."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    samples: list[tuple[float, int, int]] = []  # (seconds, main KiB, largest worker KiB)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            workers = [_rss_kib(child) for child in _children(process.pid)]
            samples.append((time.perf_counter() - started, _rss_kib(process.pid), max(workers, default=0)))
            if samples[-1][1] > LIMIT_KIB:
                process.kill()
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    marks: list[tuple[float, str]] = []
    with open(log, "w") as out:
        out.write("$ " + shlex.join(command) + "\n")
        for line in process.stdout:
            out.write(line)
            match = re.match(r"\[\d+/\d+\] (.*): running", line)
            if match:
                marks.append((time.perf_counter() - started, match.group(1)))
    status = process.wait()
    wall = time.perf_counter() - started
    done.set()
    watcher.join()
    if status:
        raise SystemExit(f"{shlex.join(command)} failed with status {status}: see {log}")
    steps = []
    for index, (begin, title) in enumerate(marks):
        end = marks[index + 1][0] if index + 1 < len(marks) else wall
        window = [s for s in samples if begin <= s[0] < end] or [(begin, 0, 0)]
        steps.append({"step": title, "seconds": round(end - begin, 1),
                      "peak_main_mib": round(max(s[1] for s in window) / 1024, 1),
                      "peak_worker_mib": round(max(s[2] for s in window) / 1024, 1)})  # fmt: skip
    return {"command": shlex.join(command), "seconds": round(wall, 1),
            "peak_main_mib": round(max(s[1] for s in samples) / 1024, 1),
            "peak_worker_mib": round(max(s[2] for s in samples) / 1024, 1), "steps": steps}  # fmt: skip


def training_rate(run: Path) -> float:
    """Mean images/s of the training steps over the run's epochs (log.csv, evaluation excluded)."""
    with open(run / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    return round(sum(float(row["images_per_s"]) for row in rows) / len(rows), 1)


def rdn(*arguments: str) -> list[str]:
    return [PYTHON, "-m", "rdn", *arguments]


def run(work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"folders": {}, "pipeline": {}, "memory": {}}
    folders = {}
    for name, per_class in SIZES.items():
        folder = folders[name] = work / f"fmnist-jpeg-{name}-val{VAL_PER_CLASS}"
        if not (folder / "val").is_dir():
            subprocess.run([PYTHON, "-m", "tools.make_image_folder", "--out", str(folder), "--per-class",
                            str(per_class), "--val-per-class", str(VAL_PER_CLASS)], cwd=REPO, check=True)  # fmt: skip
        results["folders"][name] = {"train": per_class * 10, "val": VAL_PER_CLASS * 10,
                                    "bytes": sum(p.stat().st_size for p in folder.rglob("*.jpg"))}  # fmt: skip
    # Peak memory against the folder's size: the same schedule (14 steps of 64 images, one
    # evaluation of the same val/) on the two folders; only the number of training files differs.
    for name, folder in folders.items():
        out = work / f"memory-{name}"
        measured = measure(rdn("pretrain", *COMMON, "--data-root", str(folder), *MODEL, "--epochs", "1",
                               "--steps-per-epoch", "14", "--batch-size", "64", *EVAL, "--no-progress", "--overwrite",
                               "--out", str(out)), HERE / f"log_memory_{name}.txt")  # fmt: skip
        measured["images_per_s"] = training_rate(out)
        results["memory"][name] = measured
        _save(results)
    # The whole chain on the 1,000-image folder.
    folder, out = folders["1k"], work / "pipeline-1k"
    measured = measure(rdn("pipeline", *COMMON, "--data-root", str(folder), *MODEL, *PIPELINE, "--out", str(out)),
                       HERE / "log_pipeline_1k.txt")  # fmt: skip
    for step in measured["steps"]:
        if step["step"].startswith("pretrain"):
            step["images_per_s"] = training_rate(out / "base")
        elif step["step"].startswith("fine-tune"):
            step["images_per_s"] = training_rate(out / "finetune")
    infer = measure(rdn("infer", str(folder / "val"), "--from", str(out), "--out", str(out / "predictions.csv"),
                        "--threads", "2"), HERE / "log_infer_1k.txt")  # fmt: skip
    infer["images_per_s"] = round(VAL_PER_CLASS * 10 / infer["seconds"], 1)
    infer["val_top1"] = _top1(out / "predictions.csv")
    evaluation = json.loads((out / "evaluation.json").read_text())
    results["pipeline"]["1k"] = {"run": measured, "infer": infer, "evaluation": _evaluation(evaluation)}
    for name in ("settings.json", "evaluation.json", "calibration.json", "report.md", "tradeoff.png", "order.png"):
        shutil.copy(out / name, HERE / name)
    shutil.copy(out / "predictions.csv", HERE / "predictions_val.csv")
    _save(results)
    return results


def _save(results: dict) -> None:
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")


def _top1(predictions: Path) -> float:
    """Top-1 of ``rdn infer``'s predictions on the val folder (the true class is the file's folder)."""
    with open(predictions) as handle:
        rows = list(csv.DictReader(handle))
    return round(100 * sum(Path(row["file"]).parent.name == row["class_name"] for row in rows) / len(rows), 2)


def _evaluation(evaluation: dict) -> dict:
    static = evaluation["static"]
    control = evaluation["risk_control"]["policy"]
    return {"base_top1": round(100 * evaluation["base"]["accuracy"], 2),
            "n1_top1": round(100 * static[0]["accuracy"], 2), "nk_top1": round(100 * static[-1]["accuracy"], 2),
            "n1_mmacs": round(static[0]["macs"] / 1e6, 2), "nk_mmacs": round(static[-1]["macs"] / 1e6, 2),
            "engine_top1": round(100 * evaluation["engine"]["accuracy"], 2),
            "engine_mmacs": round(evaluation["engine"]["macs"] / 1e6, 2),
            "operating_point": control.get("guarantee"),
            "measurements": [{key: m.get(key) for key in ("name", "batch_size", "images_per_second", "peak_bytes")}
                             for m in evaluation["measurements"]]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/rdn-imagefolder-proof"),
                        help="where the folders and runs go (not committed)")
    args = parser.parse_args()
    import torch

    began = time.perf_counter()
    results = run(args.work)
    results["machine"] = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                          "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "git": subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, text=True,
                                                capture_output=True).stdout.strip(),
                          "total_s": round(time.perf_counter() - began, 1)}  # fmt: skip
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
