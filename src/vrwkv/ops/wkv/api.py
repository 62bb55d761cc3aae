"""Public Bi-WKV entry point: input checks, dtype policy, and the choice of implementation."""
from __future__ import annotations

import torch

from vrwkv.ops._dtype import check_floating_on_one_device, compute_dtype, run_in_float32
from vrwkv.ops._profiling import named_range
from vrwkv.ops.wkv.blocked import blocked_bi_wkv, blocked_supports, writes_out
from vrwkv.ops.wkv.chunked import chunked_bi_wkv
from vrwkv.ops.wkv.fused_cpu import fused_cpu_bi_wkv, numba_enabled
from vrwkv.ops.wkv.reference import KERNEL_CHUNKS, KERNEL_EPS

SEMANTICS = ("paper", "official")


def bi_wkv(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, semantics: str = "paper", *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Bidirectional WKV of Vision-RWKV: for every channel, a decayed weighted average of the values of all tokens.

    ``semantics="paper"`` (the paper formula)::

        y_t = (sum_{i != t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t) / (same sums without v)

    ``semantics="official"``: exactly the function the official CUDA kernel computes (32 token chunks whose boundary
    bookkeeping uses |t-i| instead of |t-i|-1 across chunks, a small own-chunk term, and EPS = 1e-6 in the rescaled
    denominator); use it to reproduce official checkpoints. See ``ops/wkv/README.md``.

    Pure PyTorch, O(T·C) time and memory, any device, differentiable, numerically safe for any sign and size of w and k.
    Two implementations (``ops/wkv/README.md``): block matrix products (``blocked.py``, float32/half inputs with
    ``|w|·T <= 200`` and ``|u| <= 60``, i.e. every trained model; see ``blocked_supports``) and chunked rescaled scans (``chunked.py``: float64
    inputs — the kernel's EPS term replicated exactly —, larger decays, and the causal ablation). Opt-in on the CPU:
    the block path's cases as fused scans per row, forward and backward, compiled by numba (``fused_cpu.py``,
    :func:`vrwkv.ops.use_numba`).

    Args:
        k (torch.Tensor): keys ``[B, T, C]``.
        v (torch.Tensor): values ``[B, T, C]``.
        w (torch.Tensor): per-channel decay ``[C]``, already divided by T (``spatial_decay / T``); any sign.
        u (torch.Tensor): per-channel bonus of the current token ``[C]``, already divided by T.
        semantics (str): ``"paper"`` or ``"official"``.
            Default: ``"paper"``.
        out (torch.Tensor, optional): a ``[B, T, C]`` tensor of k's dtype and device that receives y (and is
            returned); it must not share memory with the inputs. The fused CPU scans write a C-contiguous ``out``
            directly (no allocation: a fresh ``[B, T, C]`` above glibc's mmap threshold is page-faulted in on first
            write); other paths copy into it. Like ``out=`` in torch, not under autograd.

    Returns:
        torch.Tensor: ``[B, T, C]`` (``out`` if given) in the dtype of ``k``, possibly a transposed view of
        channel-major storage: pass k and v as ``x.transpose(1, 2)`` views of ``[B, C, T]`` tensors to skip the op's
        own layout change; the fused CPU scans without autograd also take contiguous ``[B, T, C]`` k, v as they are,
        and return y contiguous.
        Half-precision inputs are computed in float32.

    Examples::

        >>> k, v = torch.randn(2, 196, 192), torch.randn(2, 196, 192)
        >>> w, u = torch.randn(192) / 196, torch.randn(192) / 196
        >>> bi_wkv(k, v, w, u, semantics="official").shape
        torch.Size([2, 196, 192])
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    return _run(k, v, w, u, semantics, out)


def causal_wkv(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal (uni-directional) WKV of the original RWKV, for the paper's ablation of Bi-WKV: token t averages the
    tokens i <= t with weights ``e^{-(t-i-1) w + k_i}`` (i < t) and ``e^{u + k_t}`` (i = t).

    Same arguments, shapes, dtype policy and guarantees as :func:`bi_wkv`.
    """
    return _run(k, v, w, u, "causal", out)


def _run(k, v, w, u, semantics: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Check the inputs, choose the implementation and the compute dtype, and run it."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [B, T, C]; got k {tuple(k.shape)} and v {tuple(v.shape)}")
    C = k.shape[-1]
    if w.shape != (C,) or u.shape != (C,):
        raise ValueError(f"w and u must be [C] = [{C}]; got w {tuple(w.shape)} and u {tuple(u.shape)}")
    if k.shape[1] == 0:
        raise ValueError("WKV needs at least one token (T >= 1)")
    check_floating_on_one_device("WKV", {"k": k, "v": v, "w": w, "u": u})
    if out is not None:
        _check_out(out, k, v, w, u)
    if not _blocked_applies(k, w, u, semantics):
        impl = chunked_bi_wkv
    elif fused_cpu_applies(k):
        impl = _fused_or_blocked
    else:
        impl = blocked_bi_wkv
    # the fused scans write out themselves when it has the compute dtype (no cast back), the block path when out is
    # also laid out as its result ([C, B, T] storage)
    direct = out is not None and out.dtype == compute_dtype((k, v, w, u)) and (
        impl is _fused_or_blocked or (impl is blocked_bi_wkv and writes_out(out, k)))
    # one named range in profiles (vrwkv.bench.profile attributes the operators inside it to the WKV)
    with named_range("vrwkv::causal_wkv" if semantics == "causal" else "vrwkv::bi_wkv"):
        y = run_in_float32(impl, (k, v, w, u), semantics=semantics, **({"out": out} if direct else {}))
    if out is None or y is out:
        return y
    return out.copy_(y)


def _check_out(out: torch.Tensor, k: torch.Tensor, *inputs: torch.Tensor) -> None:
    """out= as torch's ops take it: k's shape, dtype and device, no memory shared with an input, no autograd."""
    if out.shape != k.shape or out.dtype != k.dtype or out.device != k.device:
        raise ValueError(f"out must be {tuple(k.shape)} {k.dtype} on {k.device} like k; got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (out, k, *inputs)):
        raise RuntimeError("WKV with out= does not support automatic differentiation (as torch's out= ops); run it "
                           "under torch.no_grad() or leave out=None")
    if any(_memory_overlaps(out, t) for t in (k, *inputs)):
        raise ValueError("out must not share memory with k, v, w or u (the scans read them while writing y)")


def _memory_overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges spanned by ``a`` and ``b`` intersect (disjoint pieces of one buffer do not)."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        low = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st < 0)
        high = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st > 0)
        return t.data_ptr() + low * t.element_size(), t.data_ptr() + (high + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def fused_cpu_applies(k: torch.Tensor) -> bool:
    """The fused numba scans: asked for (:func:`vrwkv.ops.use_numba`), CPU tensors, at least two tokens, no graph
    capture (numba kernels are opaque to torch.compile and tracing)."""
    if not numba_enabled() or k.device.type != "cpu" or k.shape[1] < 2:
        return False
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def _fused_or_blocked(k, v, w, u, semantics: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fused scan (into ``out`` when it can), or the block path for inputs whose exponent range the scan's
    float64 rows do not hold."""
    y = fused_cpu_bi_wkv(k, v, w, u, semantics, KERNEL_CHUNKS, KERNEL_EPS, out=out)
    return blocked_bi_wkv(k, v, w, u, semantics) if y is None else y


def _blocked_applies(k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, semantics: str) -> bool:
    """The block-matrix path: not float64 (the chunked path replicates the kernel's EPS exactly), not causal, and
    decays within the range its block lengths are exact for. The range check reads two numbers from the parameters;
    it is skipped while compiling/tracing (the graph then always takes the block path)."""
    if semantics == "causal" or torch.float64 in (k.dtype, w.dtype, u.dtype):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    with torch.no_grad():  # (one device-to-host read for both bounds: a synchronisation on GPUs)
        max_abs_w, max_abs_u = torch.stack([w.abs().amax().float(), u.abs().amax().float()]).tolist()
        return blocked_supports(k.shape[1], semantics, max_abs_w, max_abs_u)
