"""How fast a trained RDN runs as people deploy it: BatchNorm folded or not, NCHW or channels_last.

    python -m benchmarks.bench_deploy --run runs/NAME [--batch 256] [--repeats 9] [--runs 3] [--threads 2]
                                      [--out benchmarks/results/deploy_<name>_cpu.md]

Loads a pipeline run's fine-tuned network (EMA weights), its policy and its certified operating
point (``calibration.json``'s risk control), takes one batch of its test split, and times, in one
interleaved measurement (:func:`rdn.inference.measure_throughputs`), static N_1, static N_K and the
early-exit engine (its three walks, :data:`rdn.inference.STRATEGIES`: staged; ``"jump"``, the samples
past N_1 stepped to N_K at once; ``"recompute"``, one static pass of the whole network for them)
for each of four forms of the same network: as trained, with its BatchNorms
folded into their convs (:func:`rdn.surgery.fold_batch_norms`), each in NCHW and in
channels_last; then, for the fastest form, what the engine's staged path costs against static
passes per batch size (``start`` = N_1 keeping the cache, one ``step`` to N_K, a step through every
exit, and static N_K from scratch). Every form's outputs are checked against the trained NCHW network's first (logits
within 1e-4, the engine's exits equal) so a fast wrong form cannot enter the table. ``--runs``
repeats the whole measurement: the table is the last run's, the ratios of every run are listed
below it.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.harness import machine_info
from rdn.inference import STRATEGIES, dynamic_forward, measure_throughputs
from rdn.policy import ExitPolicy
from rdn.surgery import fold_batch_norms

FORMS = ("trained, NCHW", "trained, channels_last", "BN folded, NCHW", "BN folded, channels_last")


def forms(net: nn.Module) -> dict[str, nn.Module]:
    """The four forms of ``net`` (eval copies)."""
    folded = fold_batch_norms(net)
    return {
        FORMS[0]: copy.deepcopy(net).eval(),
        FORMS[1]: copy.deepcopy(net).eval().to(memory_format=torch.channels_last),
        FORMS[2]: folded,
        FORMS[3]: copy.deepcopy(folded).to(memory_format=torch.channels_last),
    }


def _layout(form: str, x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if form.endswith("channels_last") else x.contiguous()


@torch.no_grad()
def compare(net: nn.Module, policy: ExitPolicy, lam: float | None, x: Tensor, repeats: int = 9) -> list[dict]:
    """One row per form: images/s of static N_1, static N_K and the engine at λ = ``lam`` on batch ``x``
    (N, C, H, W), interleaved; raises AssertionError when a form's outputs differ from the trained net's."""
    K = net.num_subnets
    reference = {s: net(x, subnet=s) for s in (1, K)}
    reference_exits = dynamic_forward(net, policy, x, lam).exits
    nets = forms(net)
    runs = {}
    for form, model in nets.items():
        batch = _layout(form, x)
        for s in (1, K):
            torch.testing.assert_close(model(batch, subnet=s), reference[s], atol=1e-4, rtol=1e-4)
        for strategy in STRATEGIES:
            assert torch.equal(dynamic_forward(model, policy, batch, lam, strategy).exits, reference_exits), form
        runs[(form, "N_1")] = lambda b, model=model, batch=batch: model(batch, subnet=1)
        runs[(form, f"N_{K}")] = lambda b, model=model, batch=batch: model(batch, subnet=K)
        for strategy in STRATEGIES:
            runs[(form, strategy)] = lambda b, model=model, batch=batch, strategy=strategy: dynamic_forward(
                model, policy, batch, lam, strategy)
    speeds = measure_throughputs(runs, x, repeats)
    baseline = speeds[(FORMS[0], f"N_{K}")]
    rows = []
    for form in nets:
        nk = speeds[(form, f"N_{K}")]
        walks = {strategy: speeds[(form, strategy)] for strategy in STRATEGIES}
        rows.append({"form": form, "n1": speeds[(form, "N_1")], "nk": nk, "walks": walks,
                     "walks_vs_nk": {strategy: speed / nk for strategy, speed in walks.items()},
                     "nk_vs_trained_nchw": nk / baseline,
                     "fastest_walk_vs_trained_nchw_nk": max(walks.values()) / baseline})  # fmt: skip
    return rows


@torch.no_grad()
def stage_costs(net: nn.Module, x: Tensor, sizes: tuple[int, ...] = (256, 64, 16), repeats: int = 9) -> list[dict]:
    """Milliseconds per batch of the staged path and of static passes, for the first ``size`` images of ``x``
    (interleaved): N_1 through ``start``, ``start`` then one ``step`` to N_K, ``start`` then a step to every
    exit, and static N_K."""
    K = net.num_subnets
    runs = {}
    for size in sizes:
        batch = x[:size]
        runs[(size, "start (N_1)")] = lambda b, batch=batch: net.start(batch)
        runs[(size, f"start + one step to N_{K}")] = lambda b, batch=batch: net.step(net.start(batch), K)
        runs[(size, "start + a step to every exit")] = lambda b, batch=batch: _every_step(net, batch)
        runs[(size, f"static N_{K}")] = lambda b, batch=batch: net(batch, subnet=K)
    speeds = measure_throughputs(runs, x, repeats)
    return [{"size": size, "path": path, "ms": 1e3 * x.shape[0] / speed} for (size, path), speed in speeds.items()]


def _every_step(net: nn.Module, batch: Tensor) -> None:
    state = net.start(batch)
    for subnet in range(2, net.num_subnets + 1):
        state = net.step(state, subnet)


def stage_markdown(rows: list[dict]) -> str:
    paths = list(dict.fromkeys(row["path"] for row in rows))
    sizes = list(dict.fromkeys(row["size"] for row in rows))
    ms = {(row["size"], row["path"]): row["ms"] for row in rows}
    lines = ["| images | " + " | ".join(f"{path} (ms)" for path in paths) + " |",
             "|---:|" + "---:|" * len(paths)]  # fmt: skip
    lines += [f"| {size} | " + " | ".join(f"{ms[(size, path)]:.1f}" for path in paths) + " |" for size in sizes]
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], K: int, batch: int, note: str) -> str:
    header = (["form", "N_1 images/s", "N_K images/s"] + [f"engine ({s}) images/s" for s in STRATEGIES]
              + [f"{s} / N_K" for s in STRATEGIES] + ["N_K / trained NCHW N_K", "fastest walk / trained NCHW N_K"])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = ([row["form"], f"{row['n1']:.0f}", f"{row['nk']:.0f}"]
                 + [f"{row['walks'][s]:.0f}" for s in STRATEGIES]
                 + [f"{row['walks_vs_nk'][s]:.2f}×" for s in STRATEGIES]
                 + [f"{row['nk_vs_trained_nchw']:.2f}×", f"{row['fastest_walk_vs_trained_nchw_nk']:.2f}×"])
        lines.append("| " + " | ".join(cells) + " |")
    return f"K = {K}, batch {batch}. {note}\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from rdn.experiments.config import ExperimentConfig
    from rdn.files import load_torch_data
    from rdn.steps import eval_batches, load_data
    from rdn.train.checkpoint import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="an rdn pipeline run folder (finished)")
    parser.add_argument("--batch", type=int, default=256, help="images per batch")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds (the median is reported)")
    parser.add_argument("--runs", type=int, default=3, help="repeat the whole measurement; the spread is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="markdown file for the table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ExperimentConfig.from_dict(json.loads((args.run / "settings.json").read_text()))
    net = load_model(args.run / "finetune" / "checkpoint.pt").eval()
    policy = ExitPolicy.for_network(net, hidden=config.policy_hidden, target=config.policy_target)
    policy.load_state_dict(load_torch_data(args.run / "policy.pt", what="policy file")[0])
    policy.eval()
    lam = json.loads((args.run / "calibration.json").read_text())["risk_control"]["policy"]["parameter"]
    data = load_data(config.data, None, config.seed)
    x, _ = next(eval_batches(data, data.test, args.batch, torch.device("cpu"), args.batch))
    started = machine_info(torch.device("cpu"))["date"]
    every = [compare(net, policy, lam, x, args.repeats) for _ in range(args.runs)]
    rows = every[-1]
    info = machine_info(torch.device("cpu"))
    note = (f"Run `{args.run.name}` ({config.model}, width {config.width_mult}, {config.data.dataset}), its "
            f"certified operating point λ = {lam:.4g}; {args.repeats} interleaved rounds, median; "
            f"{info['cpu']} ({info['cpu_cores']} cores), {info['torch_threads']} threads, torch {info['torch']}, "
            f"allocator: {info['allocator']}, {started} – {info['date']}, commit {info['git_commit']}.")  # fmt: skip
    text = markdown(rows, net.num_subnets, args.batch, note)
    spread = [f"- {row['form']}: "
              + ", ".join(f"{s} / N_K " + " / ".join(f"{run[i]['walks_vs_nk'][s]:.2f}" for run in every)
                          for s in STRATEGIES)
              + ", N_K / trained NCHW N_K " + " / ".join(f"{run[i]['nk_vs_trained_nchw']:.2f}" for run in every)
              for i, row in enumerate(rows)]  # fmt: skip
    text += f"\nEvery run ({args.runs}; the table is the last):\n\n" + "\n".join(spread) + "\n"
    fastest = fold_batch_norms(net).to(memory_format=torch.channels_last)  # FORMS[3], without the other three
    text += (f"\nThe staged path in the fastest form ({FORMS[3]}), milliseconds per batch of the first images "
             f"(median of {args.repeats} interleaved rounds):\n\n"
             + stage_markdown(stage_costs(fastest, _layout(FORMS[3], x), repeats=args.repeats)))  # fmt: skip
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
