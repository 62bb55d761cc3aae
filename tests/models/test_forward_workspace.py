"""The model's forward shares its blocks' inference temporaries (layers.workspace): the same results as blocks run
without it, hooks never see a shared buffer overwritten, and threads running one model at once do not interfere."""
import contextlib
import threading

import pytest
import torch

import vrwkv
from vrwkv.layers import channel_mix
from vrwkv.ops.linear import onednn_linears
from vrwkv.ops.wkv.fused_cpu import numba_scans


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = vrwkv.create_model("vrwkv_tiny", img_size=64, depth=3, num_classes=5).eval()
    with torch.no_grad():
        for p in model.parameters():  # random mixes, decays and layer weights: every buffer's content matters
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _blocks_without_workspace(model, x):
    """The final-normed tokens and the last block's output, each block called on its own."""
    tokens, hw = model._embed(x)
    for blk in model.layers:
        tokens = blk(tokens, hw)
    return model.ln1(tokens), tokens


@pytest.mark.parametrize("chunk", [7, None])
@pytest.mark.parametrize("fused", [False, True])
def test_forward_equals_the_blocks_run_without_the_workspace(monkeypatch, fused, chunk):
    """Chunks of 7 tokens (the last one short; the FFN's hidden, mix, value and gate rows reused across chunks and
    blocks in the buffer the spatial mix's buffer and k, v, r products sized) or one chunk, batch 2, float32 (the buffers' path)
    and float64; with the fused numba kernels (spatial mix buffer) and without."""
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
        assert torch.equal(shared, alone)
        assert torch.equal(maps[-1], model._to_map(alone, (4, 4)))
        assert torch.equal(intermediates[-1], last)


@pytest.mark.parametrize("hooked", ["value", "output"])
@pytest.mark.parametrize("chunk", [7, None])
@pytest.mark.parametrize("fused", [False, True])
def test_hooks_keep_what_they_saw(monkeypatch, fused, chunk, hooked):
    """Forward hooks on the channel mix's value Linear or the spatial mix's output Linear keep their inputs (the
    squared ReLU, the gate): with hooks the layers do not put them in shared buffers, so what each block's hook kept
    is still that block's activation. Chunks of 7 tokens, or one chunk."""
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
