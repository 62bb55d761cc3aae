"""A/B of the fused Q-Shift-and-mix kernel (ops/shift_mix) against Q-Shift + lerp, numba on for both, interleaved
in one process (medians).

    PYTHONPATH=src python benchmarks/shift_mix_ab.py mixes [--rounds 200]
    PYTHONPATH=src python benchmarks/shift_mix_ab.py model [--px 1024] [--threads 2] [--rounds 10]

``mixes``: the three spatial-mix mixes of one block (C = 192) at T = 4096 and 16384 on one and two threads: old =
``q_shift`` once + three ``torch.lerp(out=buffer)``, new = three fused calls into the buffer. ``model``: VRWKV-T
``forward_features`` of one image under ``torch.inference_mode()``, the kernel on and off alternately (the order
alternates per round); also checks that the two outputs are equal.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import vrwkv
from vrwkv.ops import use_numba
from vrwkv.ops.shift_mix import fused_cpu, fused_q_shift_lerp, q_shift


def _interleaved(functions: dict, rounds: int) -> dict:
    times = {name: [] for name in functions}
    for f in functions.values():
        f()
    for i in range(rounds):
        for name in (list(functions) if i % 2 == 0 else list(functions)[::-1]):
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def mixes(rounds: int) -> None:
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for side in (64, 128):
            T, hw, C = side * side, (side, side), 192
            x = torch.randn(1, T, C)
            mus = [torch.rand(1, 1, C) for _ in range(3)]
            buffer = torch.empty_like(x)

            def old():
                shifted = q_shift(x, hw)
                for mu in mus:
                    torch.lerp(shifted, x, mu, out=buffer)

            def new():
                for mu in mus:
                    fused_q_shift_lerp(x, hw, mu, out=buffer)

            ms = _interleaved({"old": old, "new": new}, rounds)
            print(f"threads {threads} T {T}: old {ms['old']:.3f} ms, new {ms['new']:.3f} ms, "
                  f"new/old {ms['new'] / ms['old']:.2f}", flush=True)


def model(px: int, threads: int, rounds: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = vrwkv.create_model("vrwkv_tiny", num_classes=0).eval()
    images = torch.randn(1, 3, px, px)

    def run(enabled: bool):
        fused_cpu.enabled = enabled
        return net.forward_features(images)

    with torch.inference_mode():
        ms = _interleaved({"fused": lambda: run(True), "plain": lambda: run(False)}, rounds)
        equal = torch.equal(run(True), run(False))
    fused_cpu.enabled = True
    print(f"VRWKV-T {px} px, {threads} threads: fused {ms['fused']:.1f} ms, plain {ms['plain']:.1f} ms, "
          f"fused/plain {ms['fused'] / ms['plain']:.3f}, outputs equal: {equal}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["mixes", "model"])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--px", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    use_numba()
    if args.what == "mixes":
        mixes(args.rounds or 200)
    else:
        model(args.px, args.threads, args.rounds or 10)


if __name__ == "__main__":
    main()
