"""Plumbing of the kernel benchmark suite: the entry point end to end on tiny CPU shapes, the
correctness gate, the timer, the analytical model and the shape tables of the GPU plans.

Timings here are meaningless (one-call samples); only the code paths and the files are checked.
Everything is written into pytest's tmp dir, never into benchmarks/results.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import roofline
from benchmarks.bench_nested_conv import (
    BLOCK_SPARSE,
    Implementation,
    check_implementation,
    expected_result,
    implementations,
    main,
    make_operands,
)
from benchmarks.harness import TimingConfig, measure, relative_error
from benchmarks.report import CSV_COLUMNS, SPEEDUP_COLUMN, markdown, read_csv
from benchmarks.report import main as report_main
from benchmarks.shapes import (
    PLAN_NAMES,
    Case,
    LayerShape,
    deduplicate,
    efficientnet_lite0,
    gpu_layers,
    mobilenet_v2,
    mobilenext,
    plan,
    resnet_style_3x3,
    resnext50_32x4d,
)
from rdn_kernels import available_backends
from rdn_kernels.backends import cudnn_conv_allows_tf32

CPU = torch.device("cpu")


def _read_csv(path):
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        return reader.fieldnames, list(reader)


def _case_rows(markdown: str) -> list[str]:
    """The rows of the markdown's case table (they start with a shape label)."""
    return [line for line in markdown.splitlines() if re.match(r"\| (\dx\d|linear) ", line)]


@pytest.fixture
def one_thread():
    """Run the entry point single-threaded, as ``--threads 1`` asks, and give the threads back after.

    On a busy machine, tiny multi-threaded convolutions wait on descheduled threads for whole
    scheduler slices; one thread keeps the test fast.
    """
    threads = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(threads)


def test_entry_point_writes_csv_markdown_and_plot(tmp_path, one_thread):
    paths = main(["--device", "cpu", "--plan", "tiny", "--timing", "tiny", "--k", "4",
                  "--out", str(tmp_path), "--name", "plumbing", *one_thread])
    assert torch.get_num_threads() == 1

    assert {path.name for path in paths.values()} == {"plumbing_cpu.csv", "plumbing_cpu.md", "plumbing_cpu.png"}
    assert all(path.parent == tmp_path for path in paths.values())
    columns, rows = _read_csv(paths["csv"])
    assert tuple(columns) == CSV_COLUMNS
    cases = plan("tiny").cases()
    cases = [case for case in cases if case.num_groups == 4]
    assert {(r["shape"], r["mode"], r["stage"]) for r in rows} == {
        (c.layer.label, c.mode, "" if c.stage is None else str(c.stage)) for c in cases
    }
    ours = set(available_backends(CPU))
    assert {r["implementation"] for r in rows if r["role"] == "ours"} == ours
    assert {r["implementation"] for r in rows if r["role"] == "baseline"} == {"masked dense", "per-stage loop",
                                                                               BLOCK_SPARSE}
    # Every correct implementation passed the float64 check and was timed; grouped runs only where K | C, D.
    for row in rows:
        if row["role"] != "reference":
            assert row["status"] == "ok", row
            assert float(row["max_rel_error"]) < 1e-4
        if row["implementation"] == "grouped":
            divisible = int(row["in_channels"]) % 4 == 0 and int(row["out_channels"]) % 4 == 0
            assert row["status"] == ("ok" if divisible else "n/a: K=4 does not divide C and D")
        if row["status"] == "ok":
            assert float(row["median_ms"]) > 0
            assert float(row["ratio_to_flop_ideal"]) == pytest.approx(
                float(row["median_ms"]) / float(row["flop_ideal_ms"]), rel=1e-4)
    assert {r["device"] for r in rows} == {"cpu"} and all(r["torch"] == torch.__version__ for r in rows)

    text = paths["markdown"].read_text()
    table_header = next(line for line in text.splitlines() if line.startswith("| shape |"))
    for column in (*ours, "masked dense", "per-stage loop", BLOCK_SPARSE, "dense", "grouped", "FLOP-ideal ms",
                   SPEEDUP_COLUMN):
        assert f"| {column} |" in table_header
    table_rows = _case_rows(text)
    assert len(table_rows) == len(cases)
    for mode in ("forward", "stage", "backward"):
        assert f"| {mode} | float32 | best of ours | best baseline | " in text
        for backend in ours:
            assert f"| {mode} | float32 | {backend} | per-stage loop | " in text
    for key in ("cpu", "cpu_cores", "torch", "triton", "git_commit", "date"):
        assert f"\n- {key}: " in text, key
    assert "\n- torch_threads: 1\n" in text

    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The CSV reads back into the same report (how the parts of a split GPU run are merged).
    merged = report_main([str(paths["csv"]), "--out", str(tmp_path / "merged"), "--name", "merged"])
    merged_rows = _case_rows(merged["markdown"].read_text())
    assert [row.split(" | ")[:5] for row in merged_rows] == [row.split(" | ")[:5] for row in table_rows]


def test_a_run_cut_short_keeps_the_rows_it_measured(tmp_path, one_thread, monkeypatch):
    """The CSV is rewritten after every group of cases sharing tensors, so a run stopped by a time
    limit (gpu-check's steps) leaves what it measured, and `benchmarks.report` renders it."""
    import benchmarks.bench_nested_conv as bench

    finished = []
    real_run_case = bench.run_case

    def run_case_then_stop(case, *args, **kwargs):
        if finished and case.layer.label != finished[0]:
            raise KeyboardInterrupt  # the time limit, as the second layer starts
        finished.append(case.layer.label)
        return real_run_case(case, *args, **kwargs)

    monkeypatch.setattr(bench, "run_case", run_case_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(["--plan", "tiny", "--timing", "tiny", "--k", "2", "--modes", "forward", "--backends", "torch",
              "--out", str(tmp_path), "--name", "cut", *one_thread])
    rows, _ = read_csv(tmp_path / "cut_cpu.csv")
    assert rows and {row["shape"] for row in rows} == {finished[0]}
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "cut_cpu.md").exists()
    rendered = report_main([str(tmp_path / "cut_cpu.csv"), "--out", str(tmp_path), "--name", "cut_rendered"])
    assert rendered["markdown"].read_text().count(f"| {finished[0]} |") >= 1


def test_markdown_shows_roofline_columns_when_the_gpu_is_known(tmp_path, one_thread):
    paths = main(["--plan", "tiny", "--timing", "tiny", "--k", "2", "--modes", "forward", "--backends", "torch",
                  "--out", str(tmp_path), *one_thread])
    rows, info = read_csv(paths["csv"])
    for row in rows:  # as a run on an H100 would fill them
        row |= {"roofline_ms": 0.5, "roofline_bound": "memory"}
    table = markdown(rows, info)
    header = next(line for line in table.splitlines() if line.startswith("| shape |"))
    assert header.endswith(f"| roofline ms | best ours × roofline | {SPEEDUP_COLUMN} |")
    first_case = [r for r in rows if r["shape"] == rows[0]["shape"] and r["K"] == rows[0]["K"]]
    best = min(r["median_ms"] for r in first_case if r["role"] == "ours")
    assert f"| 0.5000 (memory) | {best / 0.5:.2f}× |" in _case_rows(table)[0]


def test_check_flags_wrong_and_unsupported_implementations():
    case = Case(LayerShape(8, 6, 3, 3, sources=("t",)), batch=2, num_groups=3, dtype=torch.float32, mode="forward")
    ops = make_operands(case, CPU, torch.contiguous_format)
    expected = expected_result(case, ops.to(torch.float64))
    by_name = {impl.name: impl for impl in implementations(case, ops, available_backends(CPU))}
    assert check_implementation(by_name["masked dense"], expected, torch.float32)[0] == "ok"
    # The dense conv reads the blocks above the diagonal: as a nested conv it is wrong.
    dense_as_ours = Implementation("dense", "ours", by_name["dense"].run, lambda y: (y,))
    status, error = check_implementation(dense_as_ours, expected, torch.float32)
    assert status == "wrong" and error > 0.01

    def unsupported():
        raise TypeError("no kernel for this dtype")

    status, error = check_implementation(Implementation("x", "ours", unsupported, tuple), expected, torch.float32)
    assert status == "error: TypeError: no kernel for this dtype" and error is None
    # A baseline is plain PyTorch: its failure is a bug of the benchmark and must not be swallowed.
    with pytest.raises(TypeError, match="no kernel"):
        check_implementation(Implementation("x", "baseline", unsupported, tuple), expected, torch.float32)


def test_backward_check_sees_unmasked_weight_gradient():
    case = Case(LayerShape(6, 6, 2, 2, sources=("t",)), batch=2, num_groups=3, dtype=torch.float32, mode="backward")
    ops = make_operands(case, CPU, torch.contiguous_format)
    expected = expected_result(case, ops.to(torch.float64))
    grad_input, grad_weight = expected
    assert grad_input.shape == ops.input.shape and grad_weight.shape == ops.weight.shape
    assert torch.all(grad_weight[ops.mask == 0] == 0)
    by_name = {impl.name: impl for impl in implementations(case, ops, available_backends(CPU))}
    for name in ("masked dense", "per-stage loop", BLOCK_SPARSE, *available_backends(CPU)):
        assert check_implementation(by_name[name], expected, torch.float32)[0] == "ok", name
    dense_as_ours = Implementation("dense", "ours", by_name["dense"].run, tuple)
    assert check_implementation(dense_as_ours, expected, torch.float32)[0] == "wrong"


def test_relative_error():
    expected = (torch.tensor([1.0, -2.0]), torch.tensor([4.0]))
    assert relative_error((torch.tensor([1.0, -2.0]), torch.tensor([4.0])), expected) == 0
    assert relative_error((torch.tensor([1.0, -1.0]), torch.tensor([4.0])), expected) == pytest.approx(0.5)
    assert relative_error((torch.zeros(3), torch.tensor([4.0])), expected) == float("inf")


def test_cpu_timer_reports_medians_of_interleaved_samples():
    config = TimingConfig(warmup_s=0.0, rounds=3, min_sample_s=0.0)
    timings = measure({"sleep 2 ms": lambda: time.sleep(0.002), "nothing": lambda: None}, CPU, config)
    assert set(timings) == {"sleep 2 ms", "nothing"}
    slept = timings["sleep 2 ms"]
    assert 2.0 <= slept.median_ms < 200 and slept.q25_ms <= slept.median_ms <= slept.q75_ms
    assert timings["nothing"].median_ms < slept.median_ms
    with pytest.raises(ValueError, match="device"):
        measure({"x": lambda: None}, torch.device("meta"), config)
    with pytest.raises(ValueError, match="rounds"):
        TimingConfig(rounds=0)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("layer", [
    LayerShape(12, 20, 5, 4, sources=("t",)),  # block size gcd(3, 5) = 1: CSR
    LayerShape(16, 24, 3, 3, sources=("t",)),  # blocks of 2 (in_splits 4, out_splits 6 at K = 4): BSR
    LayerShape(8, 12, 6, 5, kernel=3, stride=2, padding=1, sources=("t",)),  # through F.unfold / F.fold
    LayerShape(12, 8, is_linear=True, sources=("t",)),
], ids=["csr", "bsr", "3x3-s2", "linear"])
@pytest.mark.parametrize("mode", ["forward", "stage", "backward"])
def test_block_sparse_peer_is_checked_like_every_baseline(layer, mode, memory_format):
    case = Case(layer, batch=2, num_groups=4, dtype=torch.float32, mode=mode, stage=2 if mode == "stage" else None)
    ops = make_operands(case, CPU, memory_format)
    expected = expected_result(case, ops.to(torch.float64))
    peer = next(impl for impl in implementations(case, ops, []) if impl.name == BLOCK_SPARSE)
    assert peer.role == "baseline"
    status, error = check_implementation(peer, expected, torch.float32)
    assert status == "ok" and error < 1e-5
    if mode != "backward" and not layer.is_linear:  # the output keeps the layer's memory format
        output = peer.run()
        assert output.is_contiguous(memory_format=memory_format)


def test_a_failing_block_sparse_peer_is_reported_not_raised():
    case = Case(LayerShape(8, 8, 2, 2, sources=("t",)), batch=2, num_groups=2, dtype=torch.float32, mode="forward")
    ops = make_operands(case, CPU, torch.contiguous_format)
    expected = expected_result(case, ops.to(torch.float64))

    def unsupported():
        raise RuntimeError("no sparse kernel for this dtype")

    peer = Implementation(BLOCK_SPARSE, "baseline", unsupported, tuple, fallible=True)
    status, error = check_implementation(peer, expected, torch.float32)
    assert status == "error: RuntimeError: no sparse kernel for this dtype" and error is None


def test_custom_shape_from_the_command_line(tmp_path, one_thread):
    paths = main(["--shape", "10,14,5,6,3", "--k", "2", "--batch", "3", "--modes", "forward,stage", "--channels-last",
                  "--timing", "tiny", "--out", str(tmp_path), "--name", "custom", *one_thread])
    rows, info = read_csv(paths["csv"])
    assert {(r["in_channels"], r["out_channels"], r["height"], r["width"], r["kernel"], r["stride"], r["padding"])
            for r in rows} == {(10, 14, 5, 6, 3, 1, 1)}
    assert {r["batch"] for r in rows} == {3} and {r["K"] for r in rows} == {2}
    assert {r["sources"] for r in rows} == {"custom --shape 10,14,5,6,3"}
    assert all(r["status"] == "ok" for r in rows if r["role"] != "reference")
    assert "--shape 10,14,5,6,3" in paths["markdown"].read_text()
    strided = main(["--shape", "8,8,9,9,1,2", "--k", "2", "--batch", "1", "--modes", "forward", "--timing", "tiny",
                    "--out", str(tmp_path), "--name", "strided", *one_thread])
    assert {r["stride"] for r in read_csv(strided["csv"])[0]} == {2}


@pytest.mark.parametrize("text", ["10,14,5,6", "10,14,5,6,0", "a,b,c,d,e", "1,2,3,4,5,6,7"])
def test_custom_shape_is_validated(text, capsys):
    with pytest.raises(SystemExit):
        main(["--shape", text])
    assert "--shape" in capsys.readouterr().err


def test_the_installed_command_runs_outside_the_checkout(tmp_path):
    """``rdn-bench-kernels`` (pyproject's console script) works from any directory, no PYTHONPATH:
    the benchmark is part of the installed distribution (``pip install -e .`` / ``make install``)."""
    command = Path(sys.executable).parent / "rdn-bench-kernels"
    assert command.exists(), "rdn-bench-kernels is not installed: run `pip install --no-build-isolation -e .`"
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["OMP_NUM_THREADS"] = "1"
    completed = subprocess.run([str(command), "--shape", "8,12,4,4,1", "--k", "2", "--batch", "1", "--modes",
                                "forward", "--timing", "tiny", "--threads", "1", "--out", "results"],
                               cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert (tmp_path / "results" / "nested_conv_cpu.md").exists()
    assert "1x1 8→12 @4" in (tmp_path / "results" / "nested_conv_cpu.md").read_text()


def test_cli_rejects_unknown_modes(capsys):
    with pytest.raises(SystemExit):
        main(["--modes", "forward,sideways"])
    assert "sideways" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Analytical model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_groups", [4, 7])
@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_useful_fraction_of_full_triangle_with_equal_splits(num_groups, mode):
    layer = LayerShape(3 * num_groups, 5 * num_groups, 4, 4, kernel=3, padding=1, sources=("t",))
    case = Case(layer, batch=2, num_groups=num_groups, dtype=torch.float32, mode=mode)
    assert roofline.useful_fraction(case) == pytest.approx((num_groups + 1) / (2 * num_groups), rel=1e-12)
    # The stages add up to the whole layer.
    stages = [Case(layer, 2, num_groups, torch.float32, "stage", s) for s in range(num_groups)]
    assert sum(roofline.useful_flops(s) for s in stages) * (3 if mode == "backward" else 1) == roofline.useful_flops(
        case)


def test_minimal_bytes_and_roofline_by_hand():
    # C = D = 8 in two groups of 4, 1×1 at 4×4, batch 2: useful MACs per pixel 4·4 + 4·8 = 48.
    layer = LayerShape(8, 8, 4, 4, sources=("t",))
    forward = Case(layer, batch=2, num_groups=2, dtype=torch.float32, mode="forward")
    pixels = 2 * 4 * 4
    assert roofline.useful_flops(forward) == 2 * pixels * 48
    assert roofline.dense_flops(forward) == 2 * pixels * 64
    input_elements, output_elements = 2 * 8 * 16, 2 * 8 * 16
    assert roofline.minimal_bytes(forward) == 4 * (input_elements + 48 + output_elements)
    first_stage = Case(layer, 2, 2, torch.float32, "stage", 0)  # reads input group 0 only
    assert roofline.minimal_bytes(first_stage) == 4 * (2 * 4 * 16 + 16 + 2 * 4 * 16)
    backward = Case(layer, 2, 2, torch.bfloat16, "backward")
    assert roofline.minimal_bytes(backward) == 2 * (3 * input_elements + 3 * 48 + 2 * output_elements)

    # channels_last: same bytes where every 64-byte line a run touches is whole (forward, 8 fp32
    # channels = 32 bytes per pixel: two pixels fill a line) ...
    assert roofline.minimal_bytes(forward, channels_last=True) == roofline.minimal_bytes(forward)
    # ... a stage writing channels 4..8 of each pixel's 8 touches every output line but fills none:
    # each line read and written (2 × 32 px × 32 B), the input's first 4 channels likewise touch
    # every line (read once: 32 px × 32 B).
    second_stage = Case(layer, 2, 2, torch.float32, "stage", 1)
    assert roofline.minimal_bytes(second_stage, channels_last=True) == 32 * 32 + 4 * 32 + 2 * 32 * 32
    assert roofline.minimal_bytes(first_stage, channels_last=True) == 32 * 32 + 4 * 16 + 2 * 32 * 32

    expected_ms = max(2 * pixels * 48 / 66.9e12, 4 * (input_elements + 48 + output_elements) / 3.35e12) * 1e3
    assert roofline.roofline_ms(forward, roofline.H100_SXM, "fp32") == pytest.approx(expected_ms)
    assert roofline.roofline_bound(forward, roofline.H100_SXM, "fp32") == "memory"
    assert roofline.flop_ideal_ms(forward, dense_ms=2.0) == pytest.approx(2.0 * 48 / 64)


def test_gpu_peaks_table():
    assert roofline.gpu_peaks("NVIDIA H100 80GB HBM3") is roofline.H100_SXM
    assert roofline.gpu_peaks("NVIDIA H100 PCIe") is roofline.H100_PCIE
    assert roofline.gpu_peaks("NVIDIA H200") is roofline.H200_SXM
    assert roofline.gpu_peaks("NVIDIA A100-SXM4-80GB") is None
    for gpu in (roofline.H100_SXM, roofline.H100_PCIE, roofline.H200_SXM):
        # Hopper: dense TF32 is half of dense BF16/FP16, and both far above the CUDA-core FP32.
        assert gpu.tf32_tflops == pytest.approx(gpu.tensor16_tflops / 2, rel=1e-3)
        assert gpu.fp32_tflops < gpu.tf32_tflops
    # H200 = H100 SXM compute with faster memory.
    assert roofline.H200_SXM.tensor16_tflops == roofline.H100_SXM.tensor16_tflops
    assert roofline.H200_SXM.bandwidth_tb_s > roofline.H100_SXM.bandwidth_tb_s
    with pytest.raises(ValueError, match="math_unit"):
        roofline.H100_SXM.tflops("int8")


def test_math_unit_follows_pytorch_defaults():
    assert roofline.math_unit(torch.bfloat16, is_linear=False) == "tensor16"
    assert roofline.math_unit(torch.float16, is_linear=True) == "tensor16"
    conv_tf32 = cudnn_conv_allows_tf32()
    assert roofline.math_unit(torch.float32, is_linear=False) == ("tf32" if conv_tf32 else "fp32")


def test_roofline_table_lists_every_plan_row():
    table = roofline.roofline_table("tiny")
    bench_plan = plan("tiny")
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| shape")]
    assert len(rows) == len(bench_plan.layers) * len(bench_plan.batches) * len(bench_plan.group_counts)
    assert "H100 SXM bf16 µs" in table and "H200 SXM fp32 µs" in table


# ----------------------------------------------------------------------------------------------
# Shape tables
# ----------------------------------------------------------------------------------------------


def test_mobilenet_v2_pointwise_shapes():
    layers = deduplicate(mobilenet_v2(1.0))
    convs = [layer for layer in layers if not layer.is_linear]
    assert len(convs) == 19  # 18 distinct expansion / projection shapes + the last 1×1 conv
    labels = {layer.label for layer in layers}
    for label in ("1x1 32→16 @112", "1x1 16→96 @112", "1x1 96→24 @56", "1x1 960→320 @7", "1x1 320→1280 @7",
                  "linear 1280→1000"):
        assert label in labels
    assert all(layer.kernel == 1 and layer.stride == 1 for layer in convs)
    assert {layer.height for layer in convs} == {112, 56, 28, 14, 7}
    wide = {layer.label for layer in mobilenet_v2(1.4)}
    assert "1x1 448→1792 @7" in wide and "linear 1792→1000" in wide


def test_other_model_tables():
    resnext = {layer.label for layer in resnext50_32x4d()}
    assert {"1x1 64→128 @56", "1x1 s2 1024→2048 @14", "1x1 2048→1024 @7", "linear 2048→1000"} <= resnext
    assert {"1x1 32→16 @112", "1x1 960→208 @7", "1x1 208→1280 @7"} <= {layer.label for layer in mobilenext()}
    assert {"1x1 16→96 @112", "1x1 1152→320 @7", "1x1 320→1280 @7"} <= {layer.label for layer in efficientnet_lite0()}
    three = resnet_style_3x3(1.0)
    assert all(layer.kernel == 3 and layer.padding == 1 and layer.sources[0].startswith("resnet-style-3x3@")
               for layer in three)


def test_gpu_layers_are_deduplicated_and_nestable():
    layers = gpu_layers()
    keys = [layer.geometry_key for layer in layers]
    assert len(keys) == len(set(keys))
    models = {model for layer in layers for model in layer.models}
    assert models == {"mobilenet_v2_1.0", "mobilenet_v2_1.4", "mobilenext_1.0", "resnext50_32x4d",
                      "efficientnet_lite0", "resnet-style-3x3@mobilenet_v2_1.0"}
    assert all(min(layer.in_channels, layer.out_channels) >= 7 for layer in layers)  # K = 7: no empty group
    assert len(deduplicate(mobilenet_v2(1.0) + mobilenext())) < len(mobilenet_v2(1.0)) + len(mobilenext())


def test_plans_and_uneven_splits():
    for name in PLAN_NAMES:
        assert plan(name).cases(), name
    quick = plan("gpu-quick")
    assert set(quick.batches) == {128, 1} and torch.bfloat16 in quick.dtypes
    assert {case.stage for case in quick.cases(["stage"])} == {0, 3}  # the first and the last stage, K = 4
    assert len(quick.cases()) <= 96  # sized for gpu-check's 240 s a layout (shapes._GPU_QUICK)
    case = Case(LayerShape(16, 10, 2, 2, sources=("t",)), batch=1, num_groups=7, dtype=torch.float32, mode="forward")
    assert case.layout.in_splits == (3, 3, 2, 2, 2, 2, 2)
    assert case.layout.out_splits == (2, 2, 2, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="mode"):
        Case(case.layer, 1, 4, torch.float32, "sideways")
    with pytest.raises(ValueError, match="stage"):
        Case(case.layer, 1, 4, torch.float32, "stage")


@pytest.mark.cuda
def test_entry_point_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    paths = main(["--device", "cuda", "--plan", "tiny", "--timing", "tiny", "--k", "4", "--dtypes", "fp32,bf16",
                  "--out", str(tmp_path)])
    _, rows = _read_csv(paths["csv"])
    assert all(row["status"] == "ok" for row in rows
               if row["role"] == "baseline" and row["implementation"] != BLOCK_SPARSE)
    # torch.sparse's GPU paths (Triton's bsr_dense_mm, cuSPARSE) are beta: a failure is reported, not raised.
    assert all(row["status"] == "ok" or row["status"].startswith(("error", "n/a"))
               for row in rows if row["implementation"] == BLOCK_SPARSE)
    assert all(row["status"] in ("ok",) or row["status"].startswith("error") for row in rows if row["role"] == "ours")


def test_data_path_benchmark_plumbing(tmp_path):
    """bench_data's pieces on a tiny JPEG folder: the folder, its subsets, the loader throughput."""
    from benchmarks import bench_data

    folder = bench_data.build_folder(tmp_path / "jpeg", image_size=16, limit=60)
    train = sorted((folder / "train").rglob("*.jpg"))
    assert len(train) == 54 and len(list((folder / "val").rglob("*.jpg"))) == 6
    subset = bench_data.subset_folder(folder, tmp_path / "subset", 20)
    assert len(list((subset / "train").rglob("*.jpg"))) == 20 and (subset / "val").is_dir()
    assert bench_data.loader_throughput(subset, image_size=16, batch=4, workers=0) > 0


def test_both_layout_tables_and_their_summary(tmp_path, one_thread):
    """benchmarks.cpu_tables: the benchmark in NCHW and channels_last, then the cross-layout summary
    (FLOP-ideal from the faster dense layout, memory floor, fastest of each layout)."""
    from benchmarks import cpu_tables

    path = cpu_tables.main(["--plan", "tiny", "--timing", "tiny", "--threads", "1", "--out", str(tmp_path),
                            "--name", "layouts"])
    assert path == tmp_path / "layouts_layouts_cpu.md"
    for layout in ("nchw", "channels_last"):
        rows, _ = read_csv(tmp_path / f"layouts_{layout}_cpu.csv")
        assert {r["implementation"] for r in rows} >= {"cpp", "masked dense", BLOCK_SPARSE, "dense"}
    text = path.read_text()
    assert "copy bandwidth" in text and "python -m benchmarks.cpu_tables" in text and "- torch_threads: 1" in text
    summary_rows = [line for line in text.splitlines() if re.match(r"\| (forward|stage|backward) \| (nchw|chan)", line)]
    assert {tuple(line.split(" | ")[:2]) for line in summary_rows} == {
        (f"| {mode}", layout) for mode in ("forward", "stage", "backward") for layout in ("nchw", "channels_last")}
    # K = 4; forward, the first and the last stage, backward
    assert len(_case_rows(text)) == 4 * len(plan("tiny").layers)
    # --summary-only re-renders the summary from those CSVs without running the benchmark again.
    path.unlink()
    again = cpu_tables.main(["--summary-only", "--threads", "1", "--out", str(tmp_path), "--name", "layouts"])
    columns = [row.split(" | ")[:4] for row in _case_rows(text)]  # shape, mode, cpp ms (the floor is re-measured)
    assert [row.split(" | ")[:4] for row in _case_rows(again.read_text())] == columns


def test_thread_clock_counts_cpu_time_not_sleep(one_thread):
    torch.set_num_threads(1)
    config = TimingConfig(warmup_s=0.0, rounds=3, min_sample_s=0.0, clock="thread")

    def spin():
        end = time.thread_time() + 0.002
        while time.thread_time() < end:
            pass

    timings = measure({"sleep 5 ms": lambda: time.sleep(0.005), "spin 2 ms": spin}, CPU, config)
    assert timings["sleep 5 ms"].median_ms < 1.0 <= timings["spin 2 ms"].median_ms
    with pytest.raises(ValueError, match="clock"):
        TimingConfig(clock="sundial")
    torch.set_num_threads(2)
    with pytest.raises(ValueError, match="one torch thread"):
        measure({"x": lambda: None}, CPU, config)
    with pytest.raises(SystemExit, match="--threads 1"):
        main(["--clock", "thread", "--threads", "2", "--plan", "tiny"])
