"""Export a VRWKV / VRWKV6 classifier to ONNX or TorchScript, and check the exported graph against PyTorch.

What works with torch 2.14 (measured on the tiny test models, see tests/tools/test_export.py):

* **ONNX, TorchScript-based exporter** (``torch.onnx.export(..., dynamo=False)``, used here): VRWKV (both WKV
  semantics, causal too) and VRWKV6, with a dynamic batch axis; onnxruntime matches PyTorch to ~1e-6 relative.
  Four ops need a symbolic the exporter lacks or gets wrong; they are registered for the duration of the export only:

  - ``aten::expm1`` (official Bi-WKV semantics; no ONNX symbolic): ``Exp(x) - 1``;
  - ``aten::diag_embed`` (WKV6; no ONNX symbolic): ``Unsqueeze(x, -1) * EyeLike``;
  - ``aten::floor_divide``: the built-in symbolic truncates (it predates ``torch.floor_divide`` rounding down), so
    the traced ``-(-T // L)`` (a ceiling division in WKV6's chunking) came out one chunk short; exported here as a
    true floor division;
  - ``aten::unflatten``: the built-in symbolic computes its slice bounds from ``dim`` at run time, so ONNX shape
    inference loses the dynamic batch of the result and a later ``.shape`` read (WKV6's sub-chunk code) is folded
    into the traced batch size; exported here with constant bounds, which keeps the batch dynamic.

* **Fixed resolution only**: the WKV ops choose block lengths from ``T`` in Python, and ``w = spatial_decay / T``,
  so a graph holds for one input size. Other sizes are refused by onnxruntime (the spatial input dimensions are
  static).
* **ONNX, dynamo exporter** (``dynamo=True``): not offered here. ``torch.export`` itself traces VRWKV and VRWKV6
  (the Bi-WKV block length depends on ``T`` only); VRWKV6's dynamo ONNX export was measured to match.
* **TorchScript**: ``torch.jit.trace`` works for both (same fixed-resolution rule); ``torch.jit.script`` does not
  (``PatchEmbed.forward`` unpacks a shape list of unknown length).
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["ExportReport", "export_onnx", "export_torchscript", "onnx_symbolics"]

#: Relative tolerance (max|a - b| / max|b|) the exported graph must meet against PyTorch.
TOLERANCE = 1e-4


@dataclass
class ExportReport:
    """Where the model was written and how well the exported graph matches PyTorch.

    Attributes:
        path: the written file.
        input_shape: the example input ``(B, 3, h, w)``.
        checked: batch size -> relative error max|a - b| / max|b| of the exported graph's output (empty if not
            checked, e.g. onnxruntime missing).
    """

    path: Path
    input_shape: tuple[int, ...]
    checked: dict[int, float]

    @property
    def max_error(self) -> float:
        return max(self.checked.values(), default=float("nan"))


def _hw(img_size: int | Sequence[int]) -> tuple[int, int]:
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"img_size must be a positive int or (h, w), got {img_size!r}")
    return hw


def _example(model: nn.Module, hw: tuple[int, int], batch_size: int, seed: int = 0) -> torch.Tensor:
    param = next(model.parameters())
    model.patch_embed.feat_size(hw)  # a clear ValueError if the size does not fit the patches
    in_chans = model.patch_embed.projection.in_channels
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, in_chans, *hw, generator=gen).to(device=param.device, dtype=param.dtype)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------- ONNX symbolics
def _expm1(g, x):
    return g.op("Sub", g.op("Exp", x), g.op("Constant", value_t=torch.tensor(1.0)))


def _diag_embed(g, x, offset, dim1, dim2):
    # only the default diagonal (offset 0, last two dims) is used by our ops; anything else must not pass silently
    consts = [_const_int(v) for v in (offset, dim1, dim2)]
    if consts != [0, -2, -1]:
        raise NotImplementedError(f"diag_embed export supports offset=0, dim1=-2, dim2=-1 only, got {consts}")
    n = g.op("Shape", x, start_i=-1)  # [1] = last dim L
    zeros = g.op("ConstantOfShape", g.op("Concat", n, n, axis_i=0), value_t=torch.tensor([0.0]))  # [L, L]
    eye = g.op("CastLike", g.op("EyeLike", zeros), x)
    return g.op("Mul", g.op("Unsqueeze", x, g.op("Constant", value_t=torch.tensor([-1]))), eye)  # [..., L, L]


def _floor_divide(g, a, b):
    if _is_float(a) or _is_float(b):
        return g.op("Floor", g.op("Div", a, b))
    # integer Div truncates toward zero; subtract 1 where the signs differ and the division is inexact
    div = g.op("Div", a, b)
    zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int64))
    signs_differ = g.op("Xor", g.op("Less", a, zero), g.op("Less", b, zero))
    inexact = g.op("Not", g.op("Equal", g.op("Sub", a, g.op("Mul", div, b)), zero))
    return g.op("Sub", div, g.op("Cast", g.op("And", signs_differ, inexact), to_i=7))  # 7 = INT64


def _unflatten(g, x, dim, sizes):
    rank, d = x.type().dim(), _const_int(dim)
    if rank is None or d is None:
        raise NotImplementedError("unflatten export needs a known input rank and a constant dim")
    d %= rank

    def const(v: list[int]):
        return g.op("Constant", value_t=torch.tensor(v, dtype=torch.int64))

    shape = g.op("Shape", x)
    head = g.op("Slice", shape, const([0]), const([d]))  # constant bounds: shape inference keeps symbolic dims
    tail = g.op("Slice", shape, const([d + 1]), const([rank]))
    return g.op("Reshape", x, g.op("Concat", head, sizes, tail, axis_i=0))


def _const_int(value) -> int | None:
    node = value.node()
    if node.kind() == "onnx::Constant":
        return int(node.t("value"))
    if node.kind() == "prim::Constant":
        return int(node.output().toIValue())
    return None


def _is_float(value) -> bool:
    scalar = value.type().scalarType() if hasattr(value.type(), "scalarType") else None
    return scalar in ("Float", "Double", "Half", "BFloat16")


_SYMBOLICS = {"aten::expm1": _expm1, "aten::diag_embed": _diag_embed, "aten::floor_divide": _floor_divide,
              "aten::unflatten": _unflatten}


@contextlib.contextmanager
def onnx_symbolics(opset: int = 17) -> Iterator[None]:
    """Register the symbolics our ops need (see the module docstring) for the TorchScript-based ONNX exporter at
    ``opset`` (so they take precedence over built-ins of earlier opsets), and remove them afterwards (torch's
    built-in symbolics are left in place)."""
    for name, fn in _SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, fn, opset)
    try:
        yield
    finally:
        for name in _SYMBOLICS:
            torch.onnx.unregister_custom_op_symbolic(name, opset)


# ----------------------------------------------------------------------------------------------------- exports
@torch.no_grad()
def export_onnx(model: nn.Module, path: str | Path, img_size: int | Sequence[int], batch_size: int = 1,
                dynamic_batch: bool = True, opset: int = 17, check: bool = True) -> ExportReport:
    """Export ``model`` (images ``[B, 3, h, w]`` -> its ``forward`` output) to an ONNX file.

    Args:
        model: a VRWKV / VRWKV6 model (put in eval mode here).
        path: output ``.onnx`` file; its folder must exist.
        img_size: the input side or (h, w), fixed in the graph.
        batch_size: batch of the example input.
        dynamic_batch: make the batch axis dynamic (input ``images`` and output ``output``).
        opset: ONNX opset (>= 15 for ``CastLike``).
        check: run the graph with onnxruntime (if installed) on new random inputs and measure its error
            (``batch_size``, plus ``batch_size + 1`` for a dynamic batch).

    Returns:
        an :class:`ExportReport`.

    Raises:
        ValueError: bad size/opset, or the output folder does not exist.
        ImportError: the ``onnx`` package is missing (``pip install vrwkv[export]``).
    """
    hw = _hw(img_size)
    if opset < 15:
        raise ValueError(f"opset must be >= 15, got {opset}")
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"output directory {path.parent} does not exist")
    try:
        import onnx  # noqa: F401  (the exporter needs it; fail early with an install hint)
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'vrwkv[export]'") from None
    model.eval()
    x = _example(model, hw, batch_size)
    dynamic_axes = {"images": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    with onnx_symbolics(opset), warnings.catch_warnings():
        # shape-dependent Python (block lengths from T) is traced as constants: one graph per resolution
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["images"], output_names=["output"],
                          dynamic_axes=dynamic_axes, opset_version=opset)
    checked: dict[int, float] = {}
    if check:
        try:
            import onnxruntime as ort
        except ImportError:
            ort = None
        if ort is not None:
            options = ort.SessionOptions()
            options.log_severity_level = 4  # failures are raised below with their message; no duplicate log line
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for b in (batch_size, batch_size + 1) if dynamic_batch else (batch_size,):
                xb = _example(model, hw, b, seed=b + 1)
                try:
                    (out,) = session.run(None, {"images": xb.float().cpu().numpy()})
                except Exception as e:  # onnxruntime raises its own exception types
                    reason = str(e).strip().splitlines()[0]
                    path.unlink()  # a graph that cannot run must not be left behind as if it were usable
                    raise ValueError(f"the exported graph {path} fails at batch {b} (exported at batch {batch_size}): "
                                     f"{reason}" + (" -- the exporter baked the batch size into the graph; export "
                                                    "without a dynamic batch" if b != batch_size else "")) from None
                checked[b] = _rel_err(torch.from_numpy(out), model(xb))
    return ExportReport(path, tuple(x.shape), checked)


@torch.no_grad()
def export_torchscript(model: nn.Module, path: str | Path, img_size: int | Sequence[int], batch_size: int = 1,
                       check: bool = True) -> ExportReport:
    """Trace ``model`` with ``torch.jit.trace`` and save it (load with ``torch.jit.load``); fixed resolution.

    The batch size of the trace is not baked in; ``check`` compares the loaded module with PyTorch at ``batch_size``
    and ``batch_size + 1``.
    """
    hw = _hw(img_size)
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"output directory {path.parent} does not exist")
    model.eval()
    x = _example(model, hw, batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (x,), check_trace=False)
    traced.save(str(path))
    checked: dict[int, float] = {}
    if check:
        loaded = torch.jit.load(str(path), map_location=x.device)
        for b in (batch_size, batch_size + 1):
            xb = _example(model, hw, b, seed=b + 1)
            checked[b] = _rel_err(loaded(xb), model(xb))
    return ExportReport(path, tuple(x.shape), checked)
