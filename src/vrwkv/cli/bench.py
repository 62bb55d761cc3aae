"""``vrwkv bench``: VRWKV vs timm's ViT/DeiT (time, memory, FLOPs) and the Bi-WKV op micro-benchmark."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", nargs="+", default=["tiny"],
                   help="model pairs: tiny (vrwkv_tiny vs deit_tiny), small, base, v6_tiny, test (default: tiny)")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 1024, 2048], help="square resolutions")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--batch-max-size", type=int, default=512, help="batches > 1 only up to this resolution")
    p.add_argument("--train-sizes", type=int, nargs="*", default=[224], help="resolutions of the training-step timing")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--vrwkv-only-sizes", type=int, nargs="*", default=[], help="extra resolutions for VRWKV alone")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (after one warm-up)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each (size, batch, mode) pair of models this many times, alternating them; the "
                        "report takes the median over the rounds (robust to the host's load changing)")
    p.add_argument("--wkv-T", type=int, nargs="*", default=[], help="token counts of the Bi-WKV micro-benchmark")
    p.add_argument("--wkv-C", type=int, default=192)
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="also time our model compiled with torch.compile (default backend: inductor; falls back to "
                        "eager with a warning when no C++ compiler is found)")
    p.add_argument("--numba", action="store_true",
                   help="also time our model (inference, training step) and the Bi-WKV op with the fused numba scans "
                        "(vrwkv.ops.use_numba; needs numba: pip install \"vrwkv[numba]\")")
    p.add_argument("--onednn-variants", action="store_true",
                   help="also time the ViT with its Linears through oneDNN (our models' default GEMM on the CPU) and "
                        "ours with oneDNN off (F.linear): the GEMM library's share of the speed-up")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in every measurement (default: torch's default, one per core)")
    p.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="glibc MALLOC_MMAP_THRESHOLD_ for every measurement (both models): e.g. 131072 makes peak "
                        "RSS track live tensors rather than the allocator's retained heap")
    p.add_argument("--malloc-keep", action="store_true",
                   help="keep freed memory in glibc's heap in every measurement (both models): MALLOC_MMAP_THRESHOLD_"
                        "=1 GiB, MALLOC_TRIM_THRESHOLD_=1 TiB; temporaries then reuse mapped pages instead of "
                        "page-faulting fresh ones on every forward")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    p.add_argument("--out", default=None, help="output directory (default: runs/bench-<date>)")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from vrwkv.bench.runner import PAIRS, BenchConfig, run as run_bench
    from vrwkv.cli import CLIError

    unknown = [p for p in args.pairs if p not in PAIRS]
    if unknown:
        raise CLIError(f"unknown pair(s) {unknown}; choose from {sorted(PAIRS)}")
    if args.repeats < 1 or args.rounds < 1 or any(s < 16 for s in args.sizes + args.vrwkv_only_sizes + args.train_sizes):
        raise CLIError("--repeats and --rounds must be >= 1 and every size >= 16")
    if args.threads is not None and args.threads < 1:
        raise CLIError("--threads must be >= 1")
    if args.malloc_mmap_threshold is not None and args.malloc_mmap_threshold < 0:
        raise CLIError("--malloc-mmap-threshold must be >= 0 bytes")
    if args.malloc_keep and args.malloc_mmap_threshold:
        raise CLIError("--malloc-keep and --malloc-mmap-threshold are alternatives: give one")
    cfg = BenchConfig(pairs=args.pairs, sizes=args.sizes, batch_sizes=args.batch_sizes,
                      batch_max_size=args.batch_max_size, train_sizes=args.train_sizes, train_batch=args.train_batch,
                      vrwkv_only_sizes=args.vrwkv_only_sizes, repeats=args.repeats, rounds=args.rounds,
                      wkv_T=args.wkv_T, wkv_C=args.wkv_C,
                      timeout_s=args.timeout, compile_backend=args.compile, numba=args.numba, threads=args.threads,
                      malloc_mmap_threshold=args.malloc_mmap_threshold, malloc_keep=args.malloc_keep,
                      onednn_variants=args.onednn_variants)
    out = Path(args.out or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    run_bench(cfg, out)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, time_vs_resolution.png, memory_vs_resolution.png")
    return 0
