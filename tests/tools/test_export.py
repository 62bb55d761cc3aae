"""ONNX / TorchScript export of the tiny VRWKV and VRWKV6 models, run by onnxruntime / torch.jit and compared with
PyTorch (max|a - b| / max|b| <= 1e-4)."""
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

import vrwkv
from vrwkv.tools.export import TOLERANCE, export_onnx, export_torchscript, onnx_symbolics


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name, **kwargs):
    torch.manual_seed(0)
    model = vrwkv.create_model(name, **kwargs).eval()
    with torch.no_grad():  # away from the init, so every parameter matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def test_export_onnx_vrwkv_dynamic_batch(tmp_path):
    # official Bi-WKV semantics (the expm1 symbolic), MLP head, key_norm, post-norm; non-square input
    model = _model("test_vrwkv2", depth=1)
    report = export_onnx(model, tmp_path / "m.onnx", (64, 48), batch_size=2, dynamic_batch=True)
    assert set(report.checked) == {2, 3} and report.max_error < TOLERANCE
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert rel_err(_run(report.path, x), model(x)) < TOLERANCE
    with pytest.raises(Exception, match="dimensions"):  # fixed resolution: another size is refused
        _run(report.path, torch.randn(1, 3, 64, 64))


def test_export_onnx_vrwkv6(tmp_path):
    # cls token, key_norm, T = 13 tokens: not a whole number of WKV6 chunks (the floor_divide symbolic); dynamic
    # batch through WKV6's sub-chunk code (the unflatten symbolic)
    model = _model("test_vrwkv6b", depth=1)
    report = export_onnx(model, tmp_path / "m6.onnx", (64, 48), batch_size=2, dynamic_batch=True)
    assert set(report.checked) == {2, 3} and report.max_error < TOLERANCE
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert rel_err(_run(report.path, x), model(x)) < TOLERANCE


def test_onnx_floor_divide_symbolic_rounds_down(tmp_path):
    # torch's own symbolic truncates: -(-T // 4) (a ceiling division) would be one short for T = 13
    class PadToMultiple(torch.nn.Module):
        def forward(self, x):
            n = -(-x.shape[1] // 4)
            return F.pad(x, (0, n * 4 - x.shape[1]))

    with onnx_symbolics():
        torch.onnx.export(PadToMultiple(), (torch.randn(2, 13),), str(tmp_path / "p.onnx"), dynamo=False,
                          input_names=["images"], dynamic_axes={"images": {1: "T"}}, opset_version=17)
    for T in (13, 16, 17):
        x = torch.randn(2, T)
        assert torch.equal(_run(tmp_path / "p.onnx", x), PadToMultiple()(x))


def test_onnx_unflatten_symbolic_keeps_batch_dynamic(tmp_path):
    # with torch's own symbolic, the shape read after unflatten is exported as the traced batch size (5 here)
    class ZeroPadded(torch.nn.Module):
        def forward(self, x):
            q = x.unflatten(-2, (2, 2))
            return torch.cat([q.new_zeros(*q.shape[:-1], 3), q], -1)

    with onnx_symbolics():
        torch.onnx.export(ZeroPadded(), (torch.randn(5, 3, 4, 8),), str(tmp_path / "u.onnx"), dynamo=False,
                          input_names=["images"], dynamic_axes={"images": {0: "batch"}}, opset_version=17)
    for batch in (1, 2, 5):
        x = torch.randn(batch, 3, 4, 8)
        assert torch.equal(_run(tmp_path / "u.onnx", x), ZeroPadded()(x))


def test_export_torchscript(tmp_path):
    model = _model("test_vrwkv", wkv_semantics="paper", depth=1)
    report = export_torchscript(model, tmp_path / "m.pt", 64, batch_size=2)
    assert report.max_error < 1e-6
    loaded = torch.jit.load(str(report.path))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(loaded(x), model(x)) < 1e-6


def test_export_bad_arguments(tmp_path):
    model = vrwkv.create_model("test_vrwkv")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", 64, opset=13)
    with pytest.raises(ValueError, match="does not exist"):
        export_onnx(model, tmp_path / "missing" / "m.onnx", 64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        export_torchscript(model, tmp_path / "m.pt", 60)
