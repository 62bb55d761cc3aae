"""The benchmark runner on a tiny configuration (the real benchmark is not a unit test: see README)."""
import json

import pytest
import torch
from PIL import Image

from vrwkv.bench.measure import measure
from vrwkv.bench.runner import BenchConfig, plan, run, run_spec
from vrwkv.cli import main


def test_plan_pairs_models_and_skips_large_batches():
    cfg = BenchConfig(pairs=["tiny"], sizes=[224, 1024], batch_sizes=[1, 8], batch_max_size=512, train_sizes=[224],
                      vrwkv_only_sizes=[4096], wkv_T=[196, 4096], wkv_reference_max_T=1024)
    specs = plan(cfg)
    infer = [(s["model"], s["size"][0], s["batch"]) for s in specs if s["kind"] == "model" and s["mode"] == "infer"]
    assert ("vrwkv_tiny", 1024, 1) in infer and ("deit_tiny_patch16_224", 1024, 1) in infer
    assert ("vrwkv_tiny", 1024, 8) not in infer and ("vrwkv_tiny", 224, 8) in infer
    assert ("vrwkv_tiny", 4096, 1) in infer and ("deit_tiny_patch16_224", 4096, 1) not in infer
    wkv = [(s["impl"], s["T"]) for s in specs if s["kind"] == "wkv"]
    assert ("reference", 196) in wkv and ("reference", 4096) not in wkv and ("fast", 4096) in wkv
    assert specs[0]["kind"] == "matmul_peak"
    fused = [(s.get("layout", "channels"), bool(s.get("out"))) for s in plan(BenchConfig(pairs=["tiny"], wkv_T=[196],
                                                                                         numba=True))
             if s["kind"] == "wkv" and s["impl"] == "fused" and not s["backward"]]
    assert sorted(fused) == [("channels", False), ("channels", True), ("tokens", False), ("tokens", True)]
    models = [(s["model"], s["mode"], s["size"][0], s["batch"]) for s in specs if s["kind"] == "model"]
    for i, (model, mode, size, batch) in enumerate(models):  # each DeiT measurement right after its VRWKV twin
        if model == "deit_tiny_patch16_224":
            assert models[i - 1] == ("vrwkv_tiny", mode, size, batch)
    assert all("threads" not in s for s in specs)
    assert {s["threads"] for s in plan(BenchConfig(pairs=["tiny"], threads=1))} == {1}  # --threads reaches every one


def test_each_measurement_runs_in_its_own_process():
    spec = dict(kind="model", pair="test", model="test_vrwkv", size=[32, 32], batch=1, mode="infer", repeats=1)
    result = run_spec(spec, timeout_s=600)
    assert result["median_s"] > 0 and result["flops"] > 0 and result["peak_rss_mb"] > 50  # a whole interpreter
    assert 0 < result["cpu_min_s"] <= result["cpu_median_s"]  # CPU time of the process, next to wall time
    # the tensor peak holds at least the parameters and stays below the whole process's RSS
    assert result["params"] * 4 / 2**20 < result["tensor_peak_mb"] < result["peak_rss_mb"]
    assert "error" in run_spec(dict(spec, model="no_such_model"), timeout_s=600)


def test_tensor_peak_sees_temporaries_freed_inside_the_call():
    from vrwkv.bench.measure import _live_tensor_bytes, _tensor_peak_mb

    kept = torch.ones(2**20)  # 4 MiB alive before and after the call
    before = _live_tensor_bytes() / 2**20
    assert before >= 4

    def step():
        a = torch.ones(10 * 2**20)  # 40 MiB, then 40 more while it is alive, then both freed
        b = a * 2
        return float(b[0])

    peak = _tensor_peak_mb(step)
    assert before + 79 < peak < before + 85
    assert _tensor_peak_mb(lambda: None) < before + 1  # nothing allocated: the tensors alive before
    del kept


@pytest.mark.parametrize("layout", ["channels", "tokens"])
def test_wkv_op_into_a_reused_out(layout):
    """The op benchmark's out= variant runs the fused kernels into one tensor of their own layout."""
    result = measure(dict(kind="wkv", impl="fused", backward=False, out=True, layout=layout, B=1, T=40, C=32,
                          repeats=2, warmup=1))
    assert result["median_s"] > 0 and "error" not in result


def test_bench_runs_end_to_end_on_tiny_models(tmp_path):
    # in-process (isolate=False): the same measurement code without one interpreter start per measurement
    cfg = BenchConfig(pairs=["test"], sizes=[32, 64], batch_sizes=[1, 2], batch_max_size=32, train_sizes=[32],
                      train_batch=2, repeats=2, wkv_T=[40], wkv_C=32, timeout_s=600)
    report = run(cfg, tmp_path, progress=lambda msg: None, isolate=False)
    assert not [r for r in report["rows"] if "error" in r["result"]]
    saved = json.loads((tmp_path / "results.json").read_text())
    infer = [r for r in saved["rows"] if r["spec"]["kind"] == "model" and r["spec"]["mode"] == "infer"]
    assert len(infer) == 2 * 3  # two models x (32 batch 1, 32 batch 2, 64 batch 1)
    for r in infer:
        assert r["result"]["median_s"] > 0 and r["result"]["flops"] > 0 and r["result"]["peak_rss_mb"] > 0
    # FLOPs grow with the resolution: 4x the tokens
    flops = {(r["spec"]["model"], r["spec"]["size"][0], r["spec"]["batch"]): r["result"]["flops"] for r in infer
             if not r["spec"].get("compile")}
    assert flops[("test_vrwkv", 64, 1)] > 3 * flops[("test_vrwkv", 32, 1)]
    md = (tmp_path / "results.md").read_text()
    assert "test_vrwkv" in md and "speed-up vs ViT (CPU)" in md and "× floor" in md and "tensor peak (MB)" in md
    machine = saved["machine"]  # which CPU ran it (hosts of the same name differ), and the run's start and end
    assert machine["cpu_model"] and machine["cpu_capability"] and saved["started"] <= saved["date"]
    assert f"Benchmark from {saved['started']} to {saved['date']}" in md
    for png in ("time_vs_resolution.png", "memory_vs_resolution.png"):
        with Image.open(tmp_path / png) as im:
            assert im.size[0] > 100


def test_compiled_model_is_planned_and_measured():
    cfg = BenchConfig(pairs=["test"], sizes=[32], batch_sizes=[1], train_sizes=[], compile_backend="inductor")
    planned = [s for s in plan(cfg) if s.get("compile")]
    assert [(s["model"], s["compile"]) for s in planned] == [("test_vrwkv", "inductor")]  # ours only, inference
    # the "eager" backend runs the torch.compile path (dynamo tracing) without a C++ build, to keep the test fast
    spec = dict(planned[0], compile="eager", repeats=1, warmup=1)
    result = measure(spec)
    assert result["median_s"] > 0 and result["flops"] > 0


def test_bench_cli_rejects_bad_arguments(capsys):
    assert main(["bench", "--pairs", "huge"]) == 2
    assert "unknown pair" in capsys.readouterr().err
    assert main(["bench", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_allocator_setting_reaches_the_measurement_and_the_report(capsys):
    """--malloc-mmap-threshold: set in every measurement process (merged into its environment) and stated in the
    report; negative values are rejected."""
    spec = dict(kind="model", pair="test", model="test_vrwkv", size=[32, 32], batch=1, mode="infer", repeats=1)
    result = run_spec(spec, timeout_s=600, env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert result["median_s"] > 0
    from vrwkv.bench.report import write_markdown

    report = {"config": {"malloc_mmap_threshold": 131072}, "rows": [], "date": "d",
              "machine": {"platform": "p", "cpu_count": 2, "torch": "t", "timm": "t"}}
    assert "MALLOC_MMAP_THRESHOLD_=131072" in write_markdown(report)
    assert main(["bench", "--malloc-mmap-threshold", "-1"]) == 2
    assert "--malloc-mmap-threshold" in capsys.readouterr().err


def test_malloc_keep_reaches_the_measurement_and_stops_the_page_faults(capsys):
    """--malloc-keep: glibc keeps freed memory in the heap in every measurement process, which the page-fault count
    shows: the op's backward temporaries at T = 65,536 (100 MB: its forward runs channel groups of a few MB) are
    above glibc's largest mmap threshold (32 MB), so by default each call maps (and faults in) fresh pages, with the
    setting they come back from the heap."""
    from vrwkv.bench.report import write_markdown
    from vrwkv.bench.runner import allocator_env
    from vrwkv.tools.cpu_memory import KEEP_FREED_MEMORY_ENV

    assert allocator_env(BenchConfig(malloc_keep=True)) == KEEP_FREED_MEMORY_ENV
    spec = dict(kind="wkv", impl="fast", backward=True, B=1, T=65536, C=192, repeats=2, warmup=2)
    default = run_spec(spec, timeout_s=600)
    kept = run_spec(spec, timeout_s=600, env=KEEP_FREED_MEMORY_ENV)
    assert default["minor_faults_per_run"] > 10_000  # >= one 50 MB block of 4 KiB pages per call
    assert kept["minor_faults_per_run"] < default["minor_faults_per_run"] / 5  # (a few K: other threads' arenas)
    report = {"config": {"malloc_keep": True}, "rows": [], "date": "d",
              "machine": {"platform": "p", "cpu_count": 2, "torch": "t", "timm": "t"}}
    assert "MALLOC_TRIM_THRESHOLD_=" in write_markdown(report)
    assert main(["bench", "--malloc-keep", "--malloc-mmap-threshold", "131072"]) == 2
    assert "alternatives" in capsys.readouterr().err


def test_fused_cpu_scan_is_planned_and_measured(tmp_path):
    """--numba: our model and the op also with the fused numba scan; the report names them and states the op's
    distance to the bandwidth floor; the setting does not leak into later in-process measurements."""
    from vrwkv.ops.wkv.fused_cpu import numba_enabled

    cfg = BenchConfig(pairs=["test"], sizes=[32], batch_sizes=[1], train_sizes=[32], train_batch=2, wkv_T=[40],
                      wkv_C=32, repeats=1, numba=True)
    assert [(s["model"], s["mode"]) for s in plan(cfg) if s.get("numba")] == [("test_vrwkv", "infer"),
                                                                              ("test_vrwkv", "train")]
    report = run(cfg, tmp_path, progress=lambda msg: None, isolate=False)
    assert not [r for r in report["rows"] if "error" in r["result"]] and not numba_enabled()
    md = (tmp_path / "results.md").read_text()
    assert "test_vrwkv+numba" in md
    fused_row = [line for line in md.splitlines() if line.startswith("| fused | fwd | 40 |")]
    assert len(fused_row) == 1 and "—" not in fused_row[0]  # its bandwidth floor and × floor are filled in
    assert len([line for line in md.splitlines() if line.startswith("| fused | fwd+bwd | 40 |")]) == 1
    token_major = [line for line in md.splitlines() if line.startswith("| fused (token-major) | fwd | 40 |")]
    assert len(token_major) == 1 and "—" not in token_major[0]  # the layout of inference with the fused scans


def test_onednn_variants_are_planned_named_and_compared():
    """--onednn-variants: the ViT with oneDNN Linears next to it, ours with every product through F.linear and
    through oneDNN; both machine peaks measured."""
    from vrwkv.bench.report import model_rows, write_markdown
    from vrwkv.bench.runner import display_name

    cfg = BenchConfig(pairs=["test"], sizes=[32], batch_sizes=[1], train_sizes=[], repeats=1, onednn_variants=True)
    specs = plan(cfg)
    assert [s.get("backend") for s in specs if s["kind"] == "matmul_peak"] == ["torch", "onednn"]
    names = [display_name(s) for s in specs if s["kind"] == "model"]
    assert names == ["test_vrwkv", "test_vrwkv+F.linear", "test_vrwkv+onednn", "test_vit", "test_vit+onednn"]
    rows = [{"spec": s, "result": measure(dict(s, n=256) if s["kind"] == "matmul_peak" else s)} for s in specs]
    assert all(r["result"]["gflops"] > 0 for r in rows if r["spec"]["kind"] == "matmul_peak")
    report = {"config": {}, "machine": {"platform": "p", "cpu_count": 2, "torch": "t", "timm": "t"}, "date": "d",
              "rows": rows}
    by_name = {r["model"]: r for r in model_rows(report)}
    assert by_name["test_vrwkv"]["speedup_vs_ref_onednn"] > 0 and by_name["test_vrwkv+F.linear"]["speedup_vs_ref"] > 0
    assert by_name["test_vrwkv+onednn"]["speedup_vs_ref_onednn"] > 0
    md = write_markdown(report)
    assert "torch " in md and "onednn " in md and "test_vit+onednn" in md


def test_rounds_alternate_the_models_of_a_pair_and_the_report_takes_their_median(capsys):
    from vrwkv.bench.report import model_rows, write_markdown

    cfg = BenchConfig(pairs=["tiny"], sizes=[224], batch_sizes=[1], train_sizes=[224], numba=True, rounds=3)
    order = [(s["model"], s.get("numba", False), s["mode"]) for s in plan(cfg) if s["kind"] == "model"]
    infer = [("vrwkv_tiny", False, "infer"), ("vrwkv_tiny", True, "infer"), ("deit_tiny_patch16_224", False, "infer")]
    train = [(m, n, "train") for m, n, _ in infer]
    assert order == infer * 3 + train * 3  # ours, ours+numba, ref; again; again

    def result(median, faults=10.0):
        return {"median_s": median, "min_s": median * 0.9, "max_s": median * 1.1, "cpu_median_s": 2 * median,
                "minor_faults_per_run": faults, "flops": 2e9, "params": 6, "peak_rss_mb": 800 + 10 * median}

    ours = dict(kind="model", pair="tiny", model="vrwkv_tiny", size=[224, 224], batch=1, mode="infer", repeats=5)
    ref = dict(ours, model="deit_tiny_patch16_224")
    rows = [{"spec": ours, "result": result(0.5)}, {"spec": ref, "result": result(2.0)},
            {"spec": ours, "result": result(0.9, faults=30.0)}, {"spec": ref, "result": result(2.1)},
            {"spec": ours, "result": {"error": "killed"}}, {"spec": ref, "result": result(1.6)}]
    report = {"config": {"rounds": 3}, "machine": {"platform": "p", "cpu_count": 2, "torch": "t", "timm": "t"},
              "date": "d", "rows": [{"spec": {"kind": "matmul_peak"}, "result": {"gflops": 100.0}}, *rows]}
    by_model = {r["model"]: r for r in model_rows(report)}
    mine, theirs = by_model["vrwkv_tiny"], by_model["deit_tiny_patch16_224"]
    assert mine["rounds"] == 2 and theirs["rounds"] == 3  # the failed round is left out
    assert mine["per_image_s"] == 0.7 and theirs["per_image_s"] == 2.0  # medians of the rounds' medians
    assert mine["min_s"] == 0.45 and abs(mine["max_s"] - 0.99) < 1e-12 and mine["faults_per_run"] == 20.0
    assert mine["peak_rss_mb"] == 809.0  # the largest round
    assert abs(mine["speedup_vs_ref"] - 2.0 / 0.7) < 1e-12
    assert "ran 3 times, alternating" in write_markdown(report)
    assert main(["bench", "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["not json"], ['{"kind": "nothing"}'], ["[1, 2]"], ['{"kind": "wkv"}', "x"]])
def test_measure_entry_point_refuses_bad_arguments_with_usage(argv, capsys):
    from vrwkv.bench.measure import main

    assert main(argv) == 2
    assert "usage: python -m vrwkv.bench.measure" in capsys.readouterr().err
