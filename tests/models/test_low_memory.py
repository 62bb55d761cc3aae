"""Low-memory inference (VRWKV.set_low_memory): the same features as the normal forward, token chunk by token chunk
and channel group by channel group, on the tiny test variants."""
import pytest
import timm
import torch

import vrwkv  # noqa: F401  (registers the models with timm)
from conftest import DEVICE, perturb_, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).to(DEVICE).eval()
    perturb_(model, 0.05)
    return model


@pytest.mark.parametrize(
    "name,kwargs,size,batch",
    [
        ("test_vrwkv", {}, (112, 80), 1),  # pre-norm; 7 x 5 grid; batch 1: projections written into the buffers
        ("test_vrwkv2", {}, (80, 64), 2),  # post-norm, layer scale, key_norm
        ("test_vrwkv", {"shift_mode": "token_shift", "shift_pixel": 2, "dynamic_img_pad": True}, (107, 80), 2),
        ("test_vrwkv", {"shift_pixel": 2, "wkv_semantics": "paper"}, (112, 80), 1),
    ],
)
def test_low_memory_features_equal_the_normal_path(name, kwargs, size, batch):
    """float64: chunks of one row (5 tokens; WKV one channel at a time), of two rows plus a remainder, and one chunk
    for everything."""
    model = _perturbed(name, **kwargs).double()
    x = torch.randn(batch, 3, *size, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        ref = model.forward_features(x)
        for chunk_tokens in (1, 11, 10_000):
            model.set_low_memory(chunk_tokens=chunk_tokens)
            assert rel_err(model.forward_features(x), ref) < 1e-13
            model.set_low_memory(False)


def test_low_memory_float32_logits_and_autograd_fallback():
    model = _perturbed("test_vrwkv2", num_classes=5)
    x = torch.randn(1, 3, 96, 64, device=DEVICE)
    with torch.inference_mode():
        ref = model(x)
    model.set_low_memory(chunk_tokens=8)
    with torch.inference_mode():
        assert rel_err(model(x), ref) < 1e-5
    out = model(x)  # autograd enabled: the normal path, differentiable
    assert out.requires_grad and rel_err(out, ref) < 1e-6


def test_low_memory_bad_use_raises():
    model = _perturbed("test_vrwkv")
    with pytest.raises(ValueError, match="chunk_tokens"):
        model.set_low_memory(chunk_tokens=0)
    model.set_low_memory(chunk_tokens=16)
    with torch.no_grad(), pytest.raises(ValueError, match="eval"):
        model.train()(torch.randn(1, 3, 64, 64, device=DEVICE))
    with pytest.raises(ValueError, match="SpatialMix"):
        timm.create_model("test_vrwkv6").set_low_memory()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the fused numba kernels run on CPU tensors")
def test_low_memory_with_the_fused_kernels_takes_whole_units(fused_cpu_scan, monkeypatch):
    """With the numba kernels the WKV channel groups are whole 16-channel units, one per thread (a group of a few
    channels left the kernel's vector lanes part-empty, copied columns, and one thread idle): features equal the
    normal path's in float64 with chunks of one row."""
    from vrwkv.layers import SpatialMix
    from vrwkv.ops.wkv.fused_cpu import TOKEN_UNIT

    model = _perturbed("test_vrwkv").double()
    widths = []
    wkv = SpatialMix.wkv

    def recording_wkv(self, k, v, num_tokens, channels=slice(None), out=None):
        widths.append(k.shape[-1])
        return wkv(self, k, v, num_tokens, channels, out)

    x = torch.randn(1, 3, 112, 80, dtype=torch.float64)
    with torch.no_grad():
        ref = model.forward_features(x)
        monkeypatch.setattr(SpatialMix, "wkv", recording_wkv)
        model.set_low_memory(chunk_tokens=1)
        assert rel_err(model.forward_features(x), ref) < 1e-13
    C = model.embed_dim
    group = min(C, TOKEN_UNIT * torch.get_num_threads())
    calls = -(-C // group)  # per block
    assert len(widths) == calls * len(model.layers)
    assert widths[:calls] == [group] * (calls - 1) + [C - (calls - 1) * group]
