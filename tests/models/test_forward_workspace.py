"""The model's forward shares its blocks' inference temporaries (layers.workspace): the same results as blocks run
without it, hooks never see a shared buffer overwritten, and threads running one model at once do not interfere."""
import contextlib
import threading

import pytest
import torch

import vrwkv
from vrwkv.layers import channel_mix, spatial_mix
from vrwkv.models import vrwkv as vrwkv_model
from vrwkv.ops.linear import onednn_linears
from vrwkv.ops.wkv.fused_cpu import numba_scans


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = vrwkv.create_model("vrwkv_tiny", img_size=64, depth=3, num_classes=5).eval()
    with torch.no_grad():
        for p in model.parameters():  # random mixes, decays and layer weights: every buffer's content matters
            p.add_(torch.randn_like(p) * 0.1)
    return model


#: The inference paths: the default one below and above the token size from which it shares buffers (its
#: channel-major spatial mix, the block Bi-WKV writing y into the mix buffer), and the fused numba kernels.
PATHS = ["default", "default-shared", "fused"]


def _on_path(monkeypatch, path: str) -> bool:
    """Set up ``path``; returns whether the fused kernels are on."""
    if path == "default-shared":
        monkeypatch.setattr(vrwkv_model, "WORKSPACE_MIN_TOKEN_BYTES", 0)
    return path == "fused"


def _blocks_without_workspace(model, x):
    """The final-normed tokens and the last block's output, each block called on its own."""
    tokens, hw = model._embed(x)
    for blk in model.layers:
        tokens = blk(tokens, hw)
    return model.ln1(tokens), tokens


@pytest.mark.parametrize("chunk", [7, None])
@pytest.mark.parametrize("path", PATHS)
def test_forward_equals_the_blocks_run_without_the_workspace(monkeypatch, path, chunk):
    """Chunks of 7 tokens (the last one short; the FFN's hidden, mix, value and gate rows reused across chunks and
    blocks in the buffer the spatial mix's buffer and k, v, r products sized) or one chunk, batch 2, float32 (the
    buffers' path) and float64; on every path."""
    fused = _on_path(monkeypatch, path)
    if chunk:
        monkeypatch.setattr(channel_mix, "INFERENCE_CHUNK_TOKENS", chunk)
    for dtype in (torch.float32, torch.float64):
        model = _model().to(dtype)
        x = torch.randn(2, 3, 64, 64, dtype=dtype)
        with numba_scans(fused), torch.inference_mode():
            shared = model.forward_features(x)
            alone, last = _blocks_without_workspace(model, x)
            maps = model.forward_backbone(x)
            _, intermediates = model.forward_intermediates(x, indices=[0, 2], output_fmt="NLC")
        if path != "default" and chunk is None:
            # the FFN takes fewer rows per chunk to fit its value and gate rows in the buffer the spatial mix sized
            # (products of other row counts may round differently): equal to rounding
            for a, b in ((shared, alone), (maps[-1], model._to_map(alone, (4, 4))), (intermediates[-1], last)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            continue
        assert torch.equal(shared, alone)
        assert torch.equal(maps[-1], model._to_map(alone, (4, 4)))
        assert torch.equal(intermediates[-1], last)


@pytest.mark.parametrize("hooked", ["value", "output"])
@pytest.mark.parametrize("chunk", [7, None])
@pytest.mark.parametrize("path", PATHS)
def test_hooks_keep_what_they_saw(monkeypatch, path, chunk, hooked):
    """Forward hooks on the channel mix's value Linear or the spatial mix's output Linear keep their inputs (the
    squared ReLU, the gate): with hooks the layers do not put them in shared buffers, so what each block's hook kept
    is still that block's activation. Chunks of 7 tokens, or one chunk."""
    fused = _on_path(monkeypatch, path)
    if chunk:
        monkeypatch.setattr(channel_mix, "INFERENCE_CHUNK_TOKENS", chunk)
    model = _model()
    kept, copies = [], []

    def keep(module, inputs, output):
        kept.append(inputs[0])
        copies.append(inputs[0].clone())

    for blk in model.layers:
        (blk.ffn.value if hooked == "value" else blk.att.output).register_forward_hook(keep)
    with numba_scans(fused), torch.inference_mode():
        model(torch.randn(2, 3, 64, 64))
    if hooked == "value":  # 3 blocks x the chunks of the 32 tokens
        assert len(kept) == 3 * (5 if chunk else 1)
    else:  # the gate, where the output runs as a module (token-major, with the fused kernels)
        assert len(kept) == (3 if fused else 0)
    for tensor, copy in zip(kept, copies):
        assert torch.equal(tensor, copy)


@pytest.mark.parametrize("onednn", [False, None])
@pytest.mark.parametrize("chunk", [64, None])
def test_peak_memory_does_not_grow(monkeypatch, chunk, onednn):
    """The forward's peak of live tensors with the shared block buffer is at most the one with every temporary
    allocated (no workspace). FFN chunks of 64 of the 128 tokens, as at 1024 px (2,048 of 4,096): the spatial mix's
    buffer and k, v, r products size it, and the FFN's value and gate rows must go in too; one chunk: the FFN's
    hidden activations size it. Products through ``torch.mm`` (which write into buffers) and through this CPU's
    choice (oneDNN's products make their own outputs on AMD CPUs with AVX-512: no block buffer then)."""
    from vrwkv.bench.measure import _tensor_peak_mb

    if chunk:
        monkeypatch.setattr(channel_mix, "INFERENCE_CHUNK_TOKENS", chunk)
    model = _model()
    x = torch.randn(8, 3, 64, 64)
    with numba_scans(True), onednn_linears(onednn), torch.inference_mode():
        model(x)
        shared = _tensor_peak_mb(lambda: model(x))
        model._workspace = contextlib.nullcontext  # every temporary its own tensor
        alone = _tensor_peak_mb(lambda: model(x))
    assert shared <= alone


@pytest.mark.parametrize("fused", [False, True])
def test_two_threads_running_one_model_get_their_own_buffers(fused):
    model = _model()
    inputs = [torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with numba_scans(fused), torch.inference_mode():
        expected = [model(x) for x in inputs]
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def run(i):
        try:
            with torch.inference_mode():  # (the numba switch is process-wide: set once, around both threads)
                barrier.wait()
                for _ in range(5):
                    results.setdefault(i, []).append(model(inputs[i]))
        except Exception as e:  # (reported below: an exception in a thread does not fail the test by itself)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    with numba_scans(fused):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    for i in range(2):
        for out in results[i]:
            assert torch.equal(out, expected[i])


@pytest.mark.parametrize("path", ["default", "default-shared"])
def test_default_path_shares_buffers_from_its_token_size(monkeypatch, path):
    """On the default path the blocks share their spatial mix's buffers (mix, k, v, r, with the block Bi-WKV's y
    written into the mix buffer) from ``WORKSPACE_MIN_TOKEN_BYTES`` on (here: 0); below it every temporary is its own
    tensor (at small sizes a buffer kept across blocks raised the peak), and the Bi-WKV makes its own y."""
    _on_path(monkeypatch, path)
    taken, outs = [], []
    real_scratch, real_bi_wkv = spatial_mix.scratch, spatial_mix.bi_wkv

    def spy_scratch(role, shape, like):
        taken.append(role)
        return real_scratch(role, shape, like)

    def spy_bi_wkv(*args, out=None, **kwargs):
        y = real_bi_wkv(*args, out=out, **kwargs)
        outs.append(out is not None and y is out)
        return y

    monkeypatch.setattr(spatial_mix, "scratch", spy_scratch)
    monkeypatch.setattr(spatial_mix, "bi_wkv", spy_bi_wkv)
    model = _model()
    with numba_scans(False), onednn_linears(False), torch.inference_mode():
        model(torch.randn(2, 3, 64, 64))
    shared = path == "default-shared"
    assert taken == (["block.largest"] * 3 if shared else [])
    assert outs == [shared] * 3
