"""Where a model's time goes: one profiled forward (or training step) with torch.profiler, every operator's own time
summed into categories (matmuls, Bi-WKV, Q-Shift mixes, LayerNorm, ...), per token and as a share of the call.

This is the breakdown behind ``benchmarks/NOTES.md``; ``vrwkv profile`` prints it. Attribution: an operator run
inside the Bi-WKV (``vrwkv::bi_wkv``, the fused kernels, their backward nodes) counts as Bi-WKV whatever it is (the
block path's ``bmm`` included); otherwise its name decides. The matmuls' achieved GFLOP/s is the call's FLOPs
(``torch.utils.flop_counter``: matmuls and convolutions) over the time of the matmul and convolution operators (the
block path's Bi-WKV products, ~3 % of VRWKV-T's FLOPs, are in the FLOPs but their time is the Bi-WKV's).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

#: Categories in display order, and the operator names (substrings, lower case) that fall into each.
CATEGORY_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("matmul", ("_linear_pointwise", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
                "aten::linear", "aten::addmv", "aten::mv")),
    ("convolution", ("convolution",)),
    ("attention and softmax", ("scaled_dot_product", "softmax", "flash_attention")),
    ("Q-Shift and mixes", ("q_shift", "lerp", "shift_mix")),
    ("LayerNorm", ("layer_norm",)),
    ("activations", ("sigmoid", "relu", "clamp", "pow", "square", "gelu", "threshold")),
    ("copies and layout", ("copy_", "aten::cat", "aten::stack", "clone", "contiguous", "aten::flip", "aten::roll",
                           "aten::pad", "constant_pad", "index", "gather", "scatter")),
    ("elementwise", ("aten::add", "aten::mul", "aten::sub", "aten::div", "aten::exp", "aten::neg", "aten::where",
                     "aten::fill_", "aten::zero_", "aten::sum", "aten::mean", "aten::amax", "aten::addcmul",
                     "aten::reciprocal")),
)
#: Scopes whose operators all count as the Bi-WKV (names, lower case substrings).
WKV_SCOPES = ("vrwkv::bi_wkv", "vrwkv::causal_wkv", "vrwkv::fused_bi_wkv", "biwkv", "bi_wkv")
WKV = "Bi-WKV"
OTHER = "other operators"
UNTRACKED = "outside operators (Python, dispatch gaps)"


@dataclass
class Breakdown:
    """Seconds per category for one call of ``tokens`` tokens (batch included), its wall time and FLOPs."""
    model: str
    mode: str
    size: tuple[int, int]
    batch: int
    tokens: int
    wall_s: float
    flops: int | None
    seconds: dict[str, float] = field(default_factory=dict)
    top_ops: list[tuple[str, float, int]] = field(default_factory=list)  # (name, seconds, calls)
    matmul_peak_gflops: float | None = None

    @property
    def matmul_gflops(self) -> float | None:
        t = self.seconds.get("matmul", 0.0) + self.seconds.get("convolution", 0.0)
        return self.flops / t / 1e9 if self.flops and t > 0 else None


def category_of(name: str, scopes: list[str]) -> str:
    """The category of an operator named ``name`` run inside the (outer) events ``scopes``."""
    lowered = [s.lower() for s in (name, *scopes)]
    if any(w in s for s in lowered for w in WKV_SCOPES):
        return WKV
    op = lowered[0]
    for category, names in CATEGORY_RULES:
        if any(n in op for n in names):
            return category
    return OTHER


def _own_times(prof) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """Seconds per category and per operator name (self time: each moment counted once, in its innermost
    operator) on the calling thread."""
    by_category: dict[str, float] = {}
    by_op: dict[str, list] = {}
    main_thread = None
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        if main_thread is None and e.cpu_parent is None:
            main_thread = e.thread
        if e.thread != main_thread:  # (autograd's or a helper thread's events would count twice in wall time)
            continue
        scopes, parent = [], e.cpu_parent
        while parent is not None:
            scopes.append(parent.name)
            parent = parent.cpu_parent
        seconds = e.self_cpu_time_total / 1e6
        category = category_of(e.name, scopes)
        by_category[category] = by_category.get(category, 0.0) + seconds
        entry = by_op.setdefault(e.name, [0.0, 0])
        entry[0] += seconds
        entry[1] += 1
    top = sorted(((name, s, n) for name, (s, n) in by_op.items()), key=lambda item: -item[1])
    return by_category, top


def profile_model(model: torch.nn.Module, name: str, size: tuple[int, int], batch: int = 1, mode: str = "infer",
                  warmup: int = 2, measure_peak: bool = True) -> Breakdown:
    """Profile one inference forward (``mode="infer"``) or training step (forward, cross-entropy, backward, SGD
    step) of ``model`` on a random batch, after ``warmup`` unprofiled calls.

    Returns a :class:`Breakdown`; ``matmul_peak_gflops`` is this machine's 2048³ fp32 product through oneDNN (or
    ``torch.mm`` without it), measured here, unless ``measure_peak`` is False.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    if mode not in ("infer", "train"):
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    param = next(model.parameters())
    x = torch.randn(batch, 3, *size, device=param.device, dtype=param.dtype)
    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode():
                model(x)
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        target = torch.zeros(batch, dtype=torch.long, device=x.device)

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), target).backward()
            opt.step()

    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0  # the profiled call's own time: the shares of one call add up to it
    seconds, top = _own_times(prof)
    tracked = sum(seconds.values())
    seconds[UNTRACKED] = max(wall - tracked, 0.0)
    counter = FlopCounterMode(display=False)  # the call's real FLOPs (a training step's backward products too)
    with counter:
        step()
    tokens = batch * _tokens(model, size)
    peak = _matmul_peak() if measure_peak else None
    return Breakdown(name, mode, tuple(size), batch, tokens, wall, counter.get_total_flops(), seconds, top, peak)


def _tokens(model: torch.nn.Module, size: tuple[int, int]) -> int:
    """Patch tokens of one image (ours and timm's ViTs have ``patch_embed.patch_size``)."""
    patch = model.patch_embed.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return (size[0] // ph) * (size[1] // pw)


def _matmul_peak() -> float:
    """The machine's peak as ``vrwkv bench`` takes it: the faster of its 2048³ products through ``torch.mm`` and
    through oneDNN (:func:`vrwkv.bench.measure.measure_matmul_peak`)."""
    from vrwkv.bench.measure import measure_matmul_peak
    from vrwkv.ops.linear import onednn_enabled

    backends = ("torch", "onednn") if onednn_enabled() else ("torch",)
    return max(measure_matmul_peak({"backend": b, "repeats": 3})["gflops"] for b in backends)


def format_breakdown(b: Breakdown, top: int = 12) -> str:
    """Markdown: the categories (µs per token, share of the call) and the operators taking the most time."""
    us = 1e6 / b.tokens
    lines = [f"{b.model}, {b.mode}, {b.size[0]}x{b.size[1]} px, batch {b.batch}: {b.wall_s:.4g} s per call, "
             f"{b.wall_s * us:.1f} µs per token ({b.tokens} tokens)."]
    if b.flops:
        achieved = b.flops / b.wall_s / 1e9
        line = f"{b.flops / 1e9:.3g} GFLOP (matmuls and convolutions): {achieved:.0f} GFLOP/s overall"
        if b.matmul_gflops:
            line += f", {b.matmul_gflops:.0f} GFLOP/s in the matmul and convolution operators"
        if b.matmul_peak_gflops:
            line += (f"; this machine's matmul peak {b.matmul_peak_gflops:.0f} GFLOP/s "
                     f"({100 * achieved / b.matmul_peak_gflops:.0f} % overall")
            if b.matmul_gflops:
                line += f", {100 * b.matmul_gflops / b.matmul_peak_gflops:.0f} % in the matmuls"
            line += ")"
        lines.append(line + ".")
    by_name = [category for category, _ in CATEGORY_RULES]
    order = [by_name[0], WKV, *by_name[1:], OTHER, UNTRACKED]  # the Bi-WKV right after the matmuls
    lines += ["", "| category | µs / token | share |", "|---|---|---|"]
    for category in order:
        s = b.seconds.get(category, 0.0)
        if s > 0:
            lines.append(f"| {category} | {s * us:.2f} | {100 * s / b.wall_s:.1f} % |")
    lines += ["", "| operator | µs / token | calls |", "|---|---|---|"]
    for name, s, calls in b.top_ops[:top]:
        lines.append(f"| {name} | {s * us:.2f} | {calls} |")
    return "\n".join(lines) + "\n"
