"""One measurement in this process, described by a JSON spec; prints one JSON line with the result.

Kinds:
  * ``model``: inference (``mode="infer"``, optionally ``compile="inductor"``) or a training step (``mode="train"``:
    forward, cross-entropy, backward, AdamW step) of a registered model at one resolution and batch size: seconds per
    call (median, min, max of ``repeats`` runs after ``warmup``; wall and process CPU time), real FLOPs
    (``torch.utils.flop_counter``), peak RSS of this process, and the peak of its tensors (``tensor_peak_mb``: the
    tensors alive between calls plus the most one call allocated on top, from torch.profiler's memory events; what
    the model needs, whatever the allocator keeps).
  * ``matmul_peak``: achieved fp32 GFLOP/s of a large square matmul (the machine's practical peak).
  * ``copy_bandwidth``: achieved bytes/s of a large tensor copy (read + write).
  * ``wkv``: the Bi-WKV op (``impl``: "fast" = the default path, "fused" = the numba CPU scan, or the float64
    "reference") forward or forward+backward at one (B, T, C).

``"numba": true`` in a model spec runs our model with the fused numba CPU scan (:func:`vrwkv.ops.use_numba`);
``"onednn"`` sets :func:`vrwkv.ops.use_onednn` (true: every product through oneDNN, false: none; absent: the
default, oneDNN where it is faster than the BLAS; for timm's models, true also computes their ``nn.Linear`` modules
through it).

Run: ``python -m vrwkv.bench.measure '{"kind": "model", "model": "vrwkv_tiny", "size": [224, 224], ...}'``.
"""
from __future__ import annotations

import contextlib
import json
import resource
import statistics
import sys
import time
from typing import Any, Callable

import torch

from vrwkv.bench.runner import is_ours


def _timeit(fn: Callable[[], Any], warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    faults0 = _minor_faults()
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    # CPU time (all threads of this process) next to wall time: on a shared machine, wall time also counts the
    # time other processes held the cores; with one thread, CPU time is the work itself. Minor page faults count the
    # fresh pages the allocator had from the kernel (each one zeroed and mapped: ~1-3 us here)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats,
            "cpu_median_s": statistics.median(cpu), "cpu_min_s": min(cpu),
            "minor_faults_per_run": (_minor_faults() - faults0) / repeats}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _live_tensor_bytes() -> int:
    """Bytes of the CPU storages of every tensor Python holds (parameters, buffers, gradients, optimizer state,
    inputs, caches), each storage counted once."""
    import gc

    gc.collect()  # (tensors in unreachable cycles are not alive: collected now, not counted by chance)
    storages = {}
    for obj in gc.get_objects():
        # (type(), not isinstance: isinstance reads __class__, which some lazy module objects answer with a warning)
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # (tensor subclasses without a storage, e.g. a compiler's
                continue  # fake tensors)
    return sum(storages.values())


def _tensor_peak_mb(fn: Callable[[], Any]) -> float:
    """The tensors alive before ``fn()`` plus the peak of what it allocates on top (CPU allocations by PyTorch's
    allocator, from torch.profiler's memory events): the process's tensor memory at its fullest during a call,
    independent of how much freed memory malloc keeps mapped. Run after the timing (the profiler's own memory
    does not enter the peak RSS)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    before = _live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:  # the memory events' running totals are in the trace
        path = f"{tmp}/trace.json"
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]
    return (before + max([0, *totals])) / 2**20


def _count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():  # an inference forward: no autograd graph inflating this process's peak memory
        fn()
    return counter.get_total_flops()


def measure_model(spec: dict) -> dict:
    import timm

    import vrwkv  # noqa: F401  (registers our models)

    torch.manual_seed(0)
    h, w = spec["size"]
    batch = spec["batch"]
    kwargs = dict(spec.get("model_kwargs", {}))
    ours = is_ours(spec["model"])
    if not ours:
        kwargs.setdefault("dynamic_img_size", True)  # timm ViT/DeiT at any resolution
    eager = timm.create_model(spec["model"], img_size=(h, w), **kwargs)
    if not ours and spec.get("onednn"):  # timm's nn.Linear modules computed as ours (vrwkv.layers.Linear)
        from vrwkv.layers import Linear

        for module in eager.modules():
            if type(module) is torch.nn.Linear:
                module.__class__ = Linear
    model = eager
    if spec.get("compile"):  # the first (warm-up) call compiles; FLOPs are counted on the eager model
        from vrwkv.tools.compile import compile_model

        model = compile_model(eager, backend=spec["compile"])
    x = torch.randn(batch, 3, h, w)
    if spec["mode"] == "infer":
        model.eval()

        def step():
            with torch.inference_mode():
                model(x)

        flops = _count_flops(lambda: eager(x)) if spec.get("flops", True) else None
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        target = torch.randint(0, model.num_classes, (batch,))

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), target).backward()
            opt.step()

        flops = None
    timing = _timeit(step, spec.get("warmup", 1), spec.get("repeats", 5))
    n_params = sum(p.numel() for p in model.parameters())
    peak_rss_mb = _peak_rss_mb()  # (read before the tensor peak's profiled call)
    return {**timing, "flops": flops, "params": n_params, "peak_rss_mb": peak_rss_mb,
            "tensor_peak_mb": _tensor_peak_mb(step) if spec.get("tensor_peak", True) else None}


def measure_matmul_peak(spec: dict) -> dict:
    """fp32 GFLOP/s of an n x n product through ``torch.mm`` (``backend="torch"``: the BLAS PyTorch was built with,
    MKL on x86) or through oneDNN (``backend="onednn"``: :func:`vrwkv.ops.linear.linear`)."""
    n = spec.get("n", 2048)
    a, b = torch.randn(n, n), torch.randn(n, n)
    if spec.get("backend", "torch") == "onednn":
        from vrwkv.ops.linear import linear, onednn_enabled, onednn_linears

        if not onednn_enabled():
            raise RuntimeError("oneDNN's matmul is not available in this PyTorch (or VRWKV_ONEDNN=0)")
        bt = b.t().contiguous()  # linear(a, bt) = a @ b

        def fn():
            with onednn_linears(True):  # (oneDNN even where the default would take the BLAS)
                return linear(a, bt)
    else:
        fn = lambda: torch.mm(a, b)  # noqa: E731
    with torch.inference_mode():
        timing = _timeit(fn, warmup=2, repeats=spec.get("repeats", 5))
    return {**timing, "gflops": 2 * n**3 / timing["min_s"] / 1e9}


def measure_copy_bandwidth(spec: dict) -> dict:
    n = spec.get("numel", 64 * 2**20)
    src, dst = torch.randn(n), torch.empty(n)
    timing = _timeit(lambda: dst.copy_(src), warmup=2, repeats=spec.get("repeats", 5))
    return {**timing, "bytes_per_s": 2 * 4 * n / timing["min_s"]}


def measure_wkv(spec: dict) -> dict:
    from vrwkv.ops import bi_wkv
    from vrwkv.ops.wkv.reference import reference_bi_wkv

    B, T, C = spec["B"], spec["T"], spec["C"]
    torch.manual_seed(0)
    # k, v as the spatial mix passes them: [B, T, C] views of channel-major [C, B, T] projections (training, and
    # inference without numba), or token-major [B, T, C] (``layout="tokens"``: inference with the fused scans)
    k_storage, v_storage = torch.randn(C, B, T), torch.randn(C, B, T)
    k, v = k_storage.permute(1, 2, 0), v_storage.permute(1, 2, 0)
    if spec.get("layout", "channels") == "tokens":
        k, v = k.contiguous(), v.contiguous()
    w, u = torch.randn(C) * 3 / T, torch.randn(C) / T
    semantics = spec.get("semantics", "official")
    if spec["impl"] == "reference":
        fn = lambda: reference_bi_wkv(k, v, w, u, semantics)  # noqa: E731
    elif spec["backward"]:
        leaves = (k_storage, v_storage, w, u)
        for t in leaves:
            t.requires_grad_()
        grad = torch.randn(C, B, T).permute(1, 2, 0)  # a gradient in the layout the model's gate gives back

        def fn():
            for t in leaves:
                t.grad = None
            bi_wkv(k_storage.permute(1, 2, 0), v_storage.permute(1, 2, 0), w, u, semantics).backward(grad)
    else:
        # ``out``: y into one reused tensor of the kernel's own layout, as the model's spatial mix passes it
        out = None
        if spec.get("out"):
            out = torch.empty(B, T, C) if k.is_contiguous() else torch.empty(C, B, T).permute(1, 2, 0)

        def fn():
            with torch.inference_mode():
                bi_wkv(k, v, w, u, semantics, out=out)

    timing = _timeit(fn, spec.get("warmup", 1), spec.get("repeats", 5))
    return {**timing, "peak_rss_mb": _peak_rss_mb()}


KINDS = {
    "model": measure_model,
    "matmul_peak": measure_matmul_peak,
    "copy_bandwidth": measure_copy_bandwidth,
    "wkv": measure_wkv,
}


def _check_spec(spec: Any) -> None:
    """Raise ValueError unless ``spec`` is a dict whose ``kind`` is one of :data:`KINDS`."""
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        raise ValueError(f"a measurement spec is a JSON object whose 'kind' is one of {sorted(KINDS)}, got {spec!r}")


def measure(spec: dict) -> dict:
    """Run the measurement described by ``spec`` in this process (the fused numba scan on only where it asks)."""
    _check_spec(spec)
    from vrwkv.ops.linear import onednn_linears
    from vrwkv.ops.wkv.fused_cpu import numba_scans

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    gemm = onednn_linears(spec["onednn"]) if "onednn" in spec else contextlib.nullcontext()  # (else: the default)
    with numba_scans(bool(spec.get("numba")) or spec.get("impl") == "fused"), gemm:
        return KINDS[spec["kind"]](spec)


def main(argv: list[str]) -> int:
    usage = "usage: python -m vrwkv.bench.measure '{\"kind\": \"model\", \"model\": \"vrwkv_tiny\", ...}'"
    if len(argv) != 1:
        print(f"{usage}\n(one JSON spec; see the module's docstring)", file=sys.stderr)
        return 2
    try:
        spec = json.loads(argv[0])
        _check_spec(spec)
    except ValueError as error:  # (json.JSONDecodeError is one)
        print(f"{usage}\nbad spec {argv[0]!r}: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"spec": spec, "result": measure(spec)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
