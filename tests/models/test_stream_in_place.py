"""Without autograd the blocks write the token stream into their input when the caller gives it up
(``Block.forward(..., consume_input=True)``: ``ln0`` in block 0, the first residual sum): the same results, one
``[B, T, C]`` less at the forward's tensor peak, and never a write into a tensor that someone else holds (a hook's
kept output, an intermediate, the VRWKV6 cls token of ``forward_backbone``)."""
import pytest
import timm
import torch

import vrwkv
from conftest import perturb_
from vrwkv.models.vrwkv import VRWKV
from vrwkv.ops.wkv.fused_cpu import numba_scans


def _model(name: str = "vrwkv_tiny", **kwargs):
    torch.manual_seed(0)
    model = vrwkv.create_model(name, **{"img_size": 64, "depth": 3, "num_classes": 5, **kwargs})
    perturb_(model, 0.1)  # random mixes, decays, norms and layer scales: every value matters
    return model.eval()


def _without_consuming(model, monkeypatch):
    """The model's blocks called as before this change: every block input stays untouched."""
    original = VRWKV._block
    monkeypatch.setattr(model, "_block", lambda blk, x, hw, consume_input=False: original(model, blk, x, hw, False))


@pytest.mark.parametrize("fused", [False, True])
def test_block_writes_into_a_given_up_input_only(fused):
    model = _model()
    with torch.no_grad():
        tokens, hw = model._embed(torch.randn(2, 3, 64, 64))  # (token-major: the layout ln0 can be written over)
    for blk in model.layers:
        with torch.no_grad(), numba_scans(fused):
            kept = tokens.clone()
            expected = blk(tokens, hw)
            assert torch.equal(tokens, kept)  # not given up: untouched
            result = blk(tokens, hw, consume_input=True)
        assert torch.equal(result, expected)
        assert result.data_ptr() == tokens.data_ptr()  # the stream stays in the input's storage
        with torch.enable_grad():  # with autograd nothing is written in place
            given = expected.clone()
            assert torch.equal(blk(given, hw, consume_input=True), blk(expected, hw))
            assert torch.equal(given, expected)
        tokens = result


@pytest.mark.parametrize("fused", [False, True])
def test_forward_peak_is_one_stream_lower(monkeypatch, fused):
    """The forward's tensor peak (torch.profiler's memory events) with the stream written in place is at least one
    ``[B, T, C]`` below the one with every block input kept until the block returns."""
    from vrwkv.bench.measure import _tensor_peak_mb

    model = _model()
    x = torch.randn(8, 3, 64, 64)
    stream_mb = 8 * 16 * model.embed_dim * 4 / 2**20
    with numba_scans(fused), torch.inference_mode():
        model(x)
        in_place = _tensor_peak_mb(lambda: model(x))
        _without_consuming(model, monkeypatch)
        model(x)
        kept = _tensor_peak_mb(lambda: model(x))
    assert in_place <= kept - 0.99 * stream_mb


@pytest.mark.parametrize("fused", [False, True])
def test_hooks_and_intermediates_keep_what_they_got(monkeypatch, fused):
    """Forward hooks that keep block outputs (no copy), and ``forward_intermediates`` in NLC without norm (the
    block outputs themselves): the next block must not write into them."""
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    with numba_scans(fused), torch.inference_mode():
        tokens, hw = model._embed(x)
        expected = []  # every block's output, each block called on its own (its input untouched)
        for blk in model.layers:
            tokens = blk(tokens, hw)
            expected.append(tokens.clone())
        features = model.forward_features(x)
        kept = []
        handles = [blk.register_forward_hook(lambda m, args, out: kept.append(out)) for blk in model.layers]
        try:
            hooked = model.forward_features(x)
        finally:
            for h in handles:
                h.remove()
    assert torch.equal(hooked, features)
    # (equal to rounding: inside the forward's workspace the FFN may take fewer rows per chunk than blocks called
    # alone, ChannelMix._inference_in_token_chunks; a block writing into a kept output would change it entirely)
    assert len(kept) == 3
    for a, b in zip(kept, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with numba_scans(fused), torch.inference_mode():
        _, again = model.forward_intermediates(x, output_fmt="NLC")
    for a, b in zip(again, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_forward_backbone_keeps_the_cls_token_views():
    """VRWKV6 ``forward_backbone`` with ``output_cls_token`` returns ``x[:, -1]`` (a view of the block's output):
    the next block keeps its hands off it."""
    torch.manual_seed(0)
    model = timm.create_model("test_vrwkv6b", out_indices=(0, 1, 2), output_cls_token=True)
    perturb_(model, 0.05)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tokens, hw = model._embed(x)
        expected = []
        for blk in model.layers:
            tokens = blk(tokens, hw)
            expected.append(tokens[:, -1].clone())
    with torch.inference_mode():
        outs = model.forward_backbone(x)
    assert all(torch.equal(cls, e) for (_, cls), e in zip(outs[:2], expected[:2]))


def test_inference_stream_is_token_major_in_the_autograd_path_dtype():
    """Without autograd the embedding writes the stream token-major (so that block 0 can normalise it in place), in
    the dtype the autograd path gives it: float32 under bfloat16 autocast (the patch conv's output is bfloat16)."""
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained, _ = model._embed(x)
        with torch.no_grad():
            inferred, _ = model._embed(x)
    assert inferred.dtype == trained.dtype == torch.float32 and inferred.is_contiguous()
    assert torch.equal(inferred, trained.detach())


def test_ln1_output_is_freed_before_the_wkv(monkeypatch):
    """Without autograd ln1 runs inside the spatial mix's projections (``Block._normed``): on the default path, whose
    block Bi-WKV has the forward's largest temporaries, the peak is one ``[B, T, C]`` lower than with ln1's output
    held by the block's call through the spatial mix."""
    from vrwkv.bench.measure import _tensor_peak_mb
    from vrwkv.models.vrwkv import Block

    model = _model(img_size=128)
    x = torch.randn(1, 3, 128, 128)
    stream_mb = 64 * model.embed_dim * 4 / 2**20
    with numba_scans(False), torch.inference_mode():
        model(x)
        fused = _tensor_peak_mb(lambda: model(x))
        monkeypatch.setattr(Block, "_normed", staticmethod(lambda mixer, norm, x, hw: mixer(norm(x), hw)))
        model(x)
        held = _tensor_peak_mb(lambda: model(x))
    assert fused <= held - 0.99 * stream_mb
