"""Plan the measurements, run each in a fresh subprocess, and write JSON, a Markdown table and plots.

Model benchmarks compare each VRWKV model with a timm ViT/DeiT of the same size (``PAIRS``), both at dynamic image
size, over a list of resolutions: inference seconds per image (median, min-max), training-step time, peak memory,
real FLOPs and the achieved fraction of this machine's fp32 matmul peak (measured in the same run). The Bi-WKV
micro-benchmark times the fast op (forward, forward+backward) against the float64 reference and against the
memory-bandwidth floor (k, v and y each read or written once at the measured copy bandwidth).
"""
from __future__ import annotations

import json
import platform
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# VRWKV model -> the timm ViT of the same width/depth it is compared with
PAIRS = {
    "tiny": ("vrwkv_tiny", "deit_tiny_patch16_224"),
    "small": ("vrwkv_small", "vit_small_patch16_224"),
    "base": ("vrwkv_base", "vit_base_patch16_224"),
    "v6_tiny": ("vrwkv6_tiny", "deit_tiny_patch16_224"),
    "test": ("test_vrwkv", "test_vit"),  # tiny models, for the tests of this runner
}


@dataclass
class BenchConfig:
    pairs: list[str] = field(default_factory=lambda: ["tiny"])
    sizes: list[int] = field(default_factory=lambda: [224, 512, 1024, 2048])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    batch_max_size: int = 512  # batches > 1 only up to this resolution (DeiT-T at 2048 takes ~25 s per image)
    train_sizes: list[int] = field(default_factory=lambda: [224])
    train_batch: int = 8
    vrwkv_only_sizes: list[int] = field(default_factory=list)  # beyond the paper: VRWKV alone (e.g. 4096 8192)
    repeats: int = 5
    warmup: int = 1
    # every (pair, mode, size, batch) group of model measurements this many times in a row, alternating the models
    # (ours, ref, ours, ref, ...): the report takes the median over the rounds, so a swing of the host's load during one
    # measurement moves the ratio less
    rounds: int = 1
    wkv_T: list[int] = field(default_factory=list)  # Bi-WKV micro-benchmark token counts (empty: skip)
    wkv_C: int = 192
    wkv_reference_max_T: int = 1024  # the O(T^2)/looped float64 reference is timed up to this T
    timeout_s: float = 3600.0
    compile_backend: str | None = None  # also time our model under torch.compile (inference), e.g. "inductor"
    numba: bool = False  # also time our model (inference, training step) and the Bi-WKV op with the fused numba scans
    threads: int | None = None  # torch threads in every measurement (None: torch's default)
    # glibc's MALLOC_MMAP_THRESHOLD_ (bytes) for every measurement process, the same for both models; None: the
    # environment's. Small values (e.g. 131072) make peak RSS track live tensors instead of the heap's free holes.
    malloc_mmap_threshold: int | None = None
    # keep freed memory in the heap (glibc: no mmap for blocks below 1 GiB, no trimming) in every measurement process,
    # both models: temporaries then reuse pages already mapped instead of page-faulting fresh ones on every forward
    malloc_keep: bool = False
    # also time the ViT with its Linears through oneDNN, and ours with every product through F.linear and through
    # oneDNN: the GEMM library's share of the speed-up, apart from the architecture's (ops/linear/README.md)
    onednn_variants: bool = False


def allocator_env(cfg: BenchConfig) -> dict[str, str] | None:
    """The environment variables every measurement process gets for the allocator settings of ``cfg``."""
    if cfg.malloc_keep and cfg.malloc_mmap_threshold:
        raise ValueError("malloc_keep and malloc_mmap_threshold are alternatives: set one")
    if cfg.malloc_keep:
        from vrwkv.tools.cpu_memory import KEEP_FREED_MEMORY_ENV

        return dict(KEEP_FREED_MEMORY_ENV)
    return {"MALLOC_MMAP_THRESHOLD_": str(cfg.malloc_mmap_threshold)} if cfg.malloc_mmap_threshold else None


def run_spec(spec: dict, timeout_s: float, env: dict[str, str] | None = None) -> dict:
    """Run one measurement in a fresh interpreter (``env``: extra environment variables); returns its result dict or
    ``{"error": ...}``."""
    cmd = [sys.executable, "-m", "vrwkv.bench.measure", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                             env={**os.environ, **env} if env else None)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout_s:.0f} s"}
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {out.returncode}: {tail[0]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])["result"]


def plan(cfg: BenchConfig) -> list[dict]:
    """All measurement specs of a run (machine peaks first). The two models of a pair are measured back to back for
    every (mode, size, batch), ``cfg.rounds`` times alternating: their ratio then compares measurements minutes apart
    at most, not the two ends of a long run over which the load of a shared host can drift."""
    specs: list[dict] = [{"kind": "matmul_peak", "backend": "torch"}, {"kind": "matmul_peak", "backend": "onednn"},
                         {"kind": "copy_bandwidth"}]
    for pair in cfg.pairs:
        ours, ref = PAIRS[pair]
        for size in cfg.sizes + cfg.vrwkv_only_sizes:
            for batch in cfg.batch_sizes:
                if batch > 1 and size > cfg.batch_max_size:
                    continue
                group = []
                for model in (ours, ref) if size in cfg.sizes else (ours,):
                    spec = dict(kind="model", pair=pair, model=model, size=[size, size], batch=batch,
                                mode="infer", repeats=cfg.repeats, warmup=cfg.warmup)
                    group.append(spec)
                    if cfg.compile_backend and model == ours:
                        group.append(dict(spec, compile=cfg.compile_backend, warmup=max(cfg.warmup, 1)))
                    if cfg.numba and model == ours:  # the warm-up call loads (or compiles) the kernel
                        group.append(dict(spec, numba=True, warmup=max(cfg.warmup, 1)))
                    if cfg.onednn_variants:
                        group.extend(_gemm_variants(spec, model == ours))
                specs.extend(_rounds(group, cfg.rounds))
        for size in cfg.train_sizes:
            group = []
            for model in (ours, ref):
                spec = dict(kind="model", pair=pair, model=model, size=[size, size], batch=cfg.train_batch,
                            mode="train", repeats=cfg.repeats, warmup=cfg.warmup)
                group.append(spec)
                if cfg.numba and model == ours:
                    group.append(dict(spec, numba=True, warmup=max(cfg.warmup, 1)))
                if cfg.onednn_variants:
                    group.extend(_gemm_variants(spec, model == ours))
            specs.extend(_rounds(group, cfg.rounds))
    for T in cfg.wkv_T:
        impls = (("fast", False), ("fast", True)) + ((("fused", False), ("fused", True)) if cfg.numba else ()) + (
            ("reference", False),)
        for impl, backward in impls:
            if impl == "reference" and T > cfg.wkv_reference_max_T:
                continue
            specs.append(dict(kind="wkv", impl=impl, backward=backward, B=1, T=T, C=cfg.wkv_C,
                              repeats=cfg.repeats if impl != "reference" else 1, warmup=int(impl != "reference")))
            if impl == "fused" and not backward:  # the token-major kernel (the model's inference with numba)
                specs.append(dict(specs[-1], layout="tokens"))
                # both kernels writing into a reused out= (as the model's spatial mix does): no fresh y pages
                specs.extend(dict(s, out=True) for s in specs[-2:])
    if cfg.threads:
        specs = [dict(spec, threads=cfg.threads) for spec in specs]
    return specs


def _rounds(group: list[dict], rounds: int) -> list[dict]:
    """``group`` ``rounds`` times in a row (copies): the models of a pair alternate over the rounds."""
    return [dict(spec) for _ in range(rounds) for spec in group]


def run(cfg: BenchConfig, out_dir: Path, progress=print, isolate: bool = True) -> dict:
    """Run every planned measurement and write ``results.json``, ``results.md`` and the plots into ``out_dir``.

    ``isolate=False`` runs the measurements in this process (same code, no per-measurement peak memory): for tests.
    """
    from vrwkv.bench.measure import measure

    out_dir.mkdir(parents=True, exist_ok=True)
    specs = plan(cfg)
    env = allocator_env(cfg)
    rows = []
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    for i, spec in enumerate(specs, 1):
        t0 = time.perf_counter()
        result = run_spec(spec, cfg.timeout_s, env) if isolate else measure(spec)
        rows.append({"spec": spec, "result": result})
        progress(f"[{i}/{len(specs)}] {describe(spec)}: {summary(result)} ({time.perf_counter() - t0:.0f} s)")
    report = {
        "config": asdict(cfg),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": sys.version.split()[0],
                    "torch": _version("torch"), "timm": _version("timm"), "cpu_count": _cpu_count(),
                    "cpu_model": _cpu_model(), "cpu_capability": _cpu_capability()},
        "started": started,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "rows": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    from vrwkv.bench.report import write_markdown, write_plots

    (out_dir / "results.md").write_text(write_markdown(report))
    write_plots(report, out_dir)
    return report


def describe(spec: dict) -> str:
    if spec["kind"] == "model":
        return (f"{display_name(spec)} {spec['mode']} {spec['size'][0]}x{spec['size'][1]} batch {spec['batch']}")
    if spec["kind"] == "wkv":
        layout = (" token-major" if spec.get("layout") == "tokens" else "") + (" into out=" if spec.get("out") else "")
        return f"bi_wkv {spec['impl']}{layout}{' fwd+bwd' if spec['backward'] else ' fwd'} T={spec['T']} C={spec['C']}"
    if spec["kind"] == "matmul_peak":
        return f"matmul_peak ({spec.get('backend', 'torch')})"
    return spec["kind"]


def _gemm_variants(spec: dict, ours: bool) -> list[dict]:
    """``spec`` with every Linear product through one library: ours through F.linear and through oneDNN (its default
    picks per CPU), timm's through oneDNN (its default is F.linear)."""
    return [dict(spec, onednn=flag) for flag in ((False, True) if ours else (True,))]


def display_name(spec: dict) -> str:
    """Model name, with ``+<backend>`` for a torch.compile measurement, ``+numba`` for the fused CPU scan, and
    ``+onednn`` / ``+F.linear`` where every product of the Linears was through that GEMM (without: the model's
    default, ``F.linear`` for timm's, :func:`vrwkv.ops.linear.onednn_is_faster`'s choice for ours)."""
    onednn = spec.get("onednn")
    gemm = "" if onednn is None else ("+onednn" if onednn else "+F.linear")
    return (spec["model"] + (f"+{spec['compile']}" if spec.get("compile") else "") +
            ("+numba" if spec.get("numba") else "") + gemm)


def is_ours(model: str) -> bool:
    """Whether ``model`` is one of our registered models (the others are timm's)."""
    return model.startswith(("vrwkv", "test_vrwkv"))


def summary(result: dict) -> str:
    if "error" in result:
        return f"FAILED ({result['error']})"
    if "gflops" in result:
        return f"{result['gflops']:.0f} GFLOP/s"
    if "bytes_per_s" in result:
        return f"{result['bytes_per_s'] / 1e9:.1f} GB/s"
    return f"{result['median_s'] * 1e3:.1f} ms"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # a missing optional package is reported, not fatal
        return "n/a"


def _cpu_model() -> str:
    """The CPU's model name and, on x86 Linux, whether it has AVX-512 (the same VM type name can hide different
    hosts: these benchmarks ran on a Zen 4 with AVX-512 one day and a Zen 3 without it the next)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return f"{name or 'unknown'}{', AVX-512' if 'avx512f' in flags else ', no AVX-512' if flags else ''}"


def _cpu_capability() -> str:
    """The vector instruction set PyTorch's CPU kernels dispatch to (e.g. AVX2, AVX512)."""
    import torch

    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "n/a"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
