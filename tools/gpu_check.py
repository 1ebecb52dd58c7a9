"""Every GPU check in one command, for the rare, short loan of a GPU machine (``make gpu-check``).

    python -m tools.gpu_check [--out DIR] [--budget-s 480]     # on a machine with a CUDA GPU
    python -m tools.gpu_check --dry-run --out DIR              # the same plumbing on the CPU (tests)

Steps, each logged with its duration and outcome into ``DIR/README.md`` (default:
``benchmarks/results/gpu_check_<gpu name>/``), each with its own time limit so one that hangs
cannot take the others' time:

1. ``build``: the extension with its CUDA kernels for this GPU's architecture, all cores.
2. ``self-check``: ``rdn_kernels``' first-use self-check (every problem, forward and backward)
   of ``triton`` and ``cuda`` in fp32, bf16 and fp16: the verdict ``backend="auto"`` will reach.
3. ``tests``: ``pytest -m cuda`` (kernels against the reference on the device, the staged
   path, training steps).
4. ``kernels``: the reduced kernel benchmark (``benchmarks.bench_nested_conv --plan gpu-quick``:
   full forward, one incremental stage, forward + backward; bf16 and fp32; batch 128 and 1;
   ours against cuDNN dense, masked dense, the per-stage loop, block-sparse BSR (Triton's
   ``bsr_dense_mm`` where its block rules allow, cuSPARSE otherwise) and grouped conv, with the
   roofline), in both memory layouts.
5. ``training``: the joint training step against the base model's (``benchmarks.bench_training``).

``--dry-run`` runs the same steps on the CPU with tiny settings and skips the build, so that
``make test`` proves the plumbing without a GPU. Expected duration on an H100 (estimated, never
measured): 1–2 minutes of build, 1–2 of self-check, 2–3 of tests, 2–4 per benchmark layout.
``--budget-s`` (default 480) stops starting steps once spent, and each step has its own limit, so
one call ends within about 8 minutes; what did not fit is marked "not run". ``--steps`` runs some
steps only, to split the check over two calls of a short loan, e.g.
``--steps build,self-check,tests`` then ``--steps build,kernels-nchw,kernels-channels-last,training``
(the second build is incremental when the build folder is still there). The summary is rewritten
after every step, and the benchmark CSVs after every group of cases, so a call cut short keeps
what it measured (``python -m benchmarks.report <csv> --name <stem>`` renders a partial CSV).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tools import REPO_ROOT, RESULTS_DIR

__all__ = ["Step", "main", "plan_steps"]


@dataclass(frozen=True)
class Step:
    """One command of the check, with the seconds it may take."""

    name: str
    command: tuple[str, ...]
    limit_s: int
    environment: tuple[tuple[str, str], ...] = ()


def _python(*arguments: str) -> tuple[str, ...]:
    return (sys.executable, *arguments)


def plan_steps(out: Path, dry_run: bool) -> list[Step]:
    """The commands of the check, in order (``dry_run``: CPU, tiny settings, no build)."""
    self_check = (
        "import sys, torch; from rdn_kernels import available_backends; "
        "from rdn_kernels.backends import supported_dtypes; "
        "from rdn_kernels.nested_conv.self_check import self_check; "
        "device = torch.device(sys.argv[1]); failed = 0\n"
        "if device.type == 'cuda' and 'cuda' not in available_backends(device):\n"
        "    failed += 1; print('cuda: FAIL the extension has no CUDA kernels (see build.log)', flush=True)\n"
        "for backend in [b for b in available_backends(device) if b != 'torch'] or ['torch']:\n"
        "    for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
        "        if dtype not in (supported_dtypes(backend) or (dtype,)):\n"
        "            continue\n"
        "        try:\n"
        "            self_check(backend, device, dtype); print(f'{backend} {dtype}: pass', flush=True)\n"
        "        except Exception as error:\n"
        "            failed += 1; print(f'{backend} {dtype}: FAIL {error}', flush=True)\n"
        "sys.exit(1 if failed else 0)"
    )
    device = "cpu" if dry_run else "cuda"
    kernels = ["-m", "benchmarks.bench_nested_conv", "--device", device, "--out", str(out)]
    kernels += ["--plan", "tiny", "--timing", "tiny", "--dtypes", "fp32"] if dry_run else [
        "--plan", "gpu-quick", "--timing", "quick"]  # fmt: skip
    training = ["-m", "benchmarks.bench_training", "--device", device, "--quick", "--out", str(out)]
    if dry_run:
        training += ["--width-mult", "0.1", "--batch", "4", "--k", "2", "--copy-fractions", "0.5"]
    steps = []
    if not dry_run:
        steps.append(Step("build", _python("setup.py", "--quiet", "build_ext", "--inplace"), 300,
                          (("FORCE_CUDA", "1"), ("MAX_JOBS", str(os.cpu_count() or 4)))))  # fmt: skip
    steps += [
        Step("self-check", _python("-c", self_check, device), 240),
        # Not -x: the run is rare and short, and one failing test must not hide what the others say.
        Step("tests", _python("-m", "pytest", "-q", "-p", "no:cacheprovider",
                              *(["--collect-only", "-m", "cuda"] if dry_run else ["-m", "cuda"])), 300),  # fmt: skip
        Step("kernels-nchw", _python(*kernels, "--name", "gpu_check_nchw"), 240),
        Step("kernels-channels-last", _python(*kernels, "--channels-last", "--name", "gpu_check_nhwc"), 240),
        Step("training", _python(*training), 180),
    ]
    if dry_run:
        # One thread per step: the dry run shares the CPU with the test run that started it, and
        # oversubscribed OpenMP threads spin (a 5 s step took minutes beside another job).
        steps = [dataclasses.replace(step, environment=(*step.environment, ("OMP_NUM_THREADS", "1")))
                 for step in steps]  # fmt: skip
    return steps


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu dry run"


def run(out: Path, dry_run: bool, budget_s: float, only: Sequence[str] | None = None) -> list[dict]:
    """Run every step (or the steps named in ``only``) into ``out`` (logs ``out/<step>.log``);
    returns one record per step run. ``out/README.md`` is rewritten after every step."""
    out.mkdir(parents=True, exist_ok=True)
    steps = plan_steps(out, dry_run)
    if only is not None:
        unknown = sorted(set(only) - {step.name for step in steps})
        if not only:
            raise ValueError(f"no steps given; the steps are {[step.name for step in steps]}")
        if unknown:
            raise ValueError(f"unknown steps {unknown}; the steps are {[step.name for step in steps]}")
        steps = [step for step in steps if step.name in only]
    started, records = time.perf_counter(), []
    for step in steps:
        left = budget_s - (time.perf_counter() - started)
        if left < 10:
            records.append({"step": step.name, "status": "not run (budget spent)", "seconds": 0.0})
            _write_summary(out, records, dry_run, time.perf_counter() - started)
            continue
        log = out / f"{re.sub(r'[^a-z0-9]+', '_', step.name.lower())}.log"
        environment = {**os.environ, **dict(step.environment)}
        if not dry_run and "TORCH_CUDA_ARCH_LIST" not in environment:
            import torch

            major, minor = torch.cuda.get_device_capability()
            environment["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}+PTX"
        print(f"[gpu-check] {step.name} (limit {min(step.limit_s, left):.0f} s) ...", flush=True)
        begin = time.perf_counter()
        with open(log, "w") as handle:
            try:
                completed = subprocess.run(step.command, cwd=REPO_ROOT, env=environment, stdout=handle,
                                           stderr=subprocess.STDOUT, timeout=min(step.limit_s, left))  # fmt: skip
                status = "pass" if completed.returncode == 0 else f"FAIL (exit {completed.returncode})"
            except subprocess.TimeoutExpired:
                status = f"TIMEOUT after {min(step.limit_s, left):.0f} s"
        seconds = time.perf_counter() - begin
        records.append({"step": step.name, "status": status, "seconds": round(seconds, 1), "log": log.name})
        print(f"[gpu-check] {step.name}: {status} in {seconds:.0f} s", flush=True)
        _write_summary(out, records, dry_run, time.perf_counter() - started)
    return records


def _write_summary(out: Path, records: list[dict], dry_run: bool, total_s: float) -> None:
    import torch

    lines = [
        f"# GPU check: {_gpu_name()}",
        "",
        f"`python -m tools.gpu_check{' --dry-run' if dry_run else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"torch {torch.__version__}, total {total_s:.0f} s. Each step's output is in its log; the kernel "
        "tables are `nested_conv_*.md` / `.csv`, the training step `training_cost_*.md`.",
        "",
        "| step | status | seconds | log |",
        "|---|---|---:|---|",
        *(f"| {r['step']} | {r['status']} | {r['seconds']} | {r.get('log', '')} |" for r in records),
        "",
        "A kernels step stopped by its limit leaves the CSV of the cases it finished; render it with "
        "`python -m benchmarks.report <csv> --out <dir> --name <stem>`.",
        "",
    ]  # fmt: skip
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: benchmarks/results/gpu_check_<gpu name>)")
    parser.add_argument("--dry-run", action="store_true", help="the plumbing on the CPU: tiny settings, no build")
    parser.add_argument("--budget-s", type=float, default=480, help="stop starting steps after this many seconds")
    parser.add_argument("--steps", type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
                        help="comma-separated steps to run (default: all): build, self-check, tests, kernels-nchw, "
                             "kernels-channels-last, training")
    args = parser.parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: this torch sees no CUDA GPU (use --dry-run to test the plumbing)", file=sys.stderr)
            return 2
    out = args.out or RESULTS_DIR / ("gpu_check_" + re.sub(r"[^a-z0-9]+", "_", _gpu_name().lower()).strip("_"))
    try:
        records = run(out, args.dry_run, args.budget_s, args.steps)
    except ValueError as error:
        print(f"gpu-check: {error}", file=sys.stderr)
        return 2
    print(f"[gpu-check] summary: {out / 'README.md'}")
    return 0 if all(record["status"] == "pass" for record in records) else 1


if __name__ == "__main__":
    sys.exit(main())
