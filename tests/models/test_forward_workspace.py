"""The model's forward shares its blocks' inference temporaries (layers.workspace): the same results as blocks run
without it, hooks never see a shared buffer overwritten, and threads running one model at once do not interfere."""
import threading

import pytest
import torch

import vrwkv
from vrwkv.layers import channel_mix
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


@pytest.mark.parametrize("fused", [False, True])
def test_forward_equals_the_blocks_run_without_the_workspace(monkeypatch, fused):
    """Chunks of 7 tokens (the last one short; the hidden and mix buffers reused across chunks and blocks), batch 2,
    float32 (the buffers' path) and float64; with the fused numba kernels (spatial mix buffer) and without."""
    monkeypatch.setattr(channel_mix, "INFERENCE_CHUNK_TOKENS", 7)
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


def test_hooks_keep_what_they_saw(monkeypatch):
    """A forward hook on the channel mix's value Linear keeps its input (the squared ReLU): with hooks the layer
    does not put it in a shared buffer, so what each block's hook kept is still that block's activation."""
    monkeypatch.setattr(channel_mix, "INFERENCE_CHUNK_TOKENS", 7)
    model = _model()
    kept, copies = [], []

    def keep(module, inputs, output):
        kept.append(inputs[0])
        copies.append(inputs[0].clone())

    for blk in model.layers:
        blk.ffn.value.register_forward_hook(keep)
    with torch.inference_mode():
        model(torch.randn(2, 3, 64, 64))
    assert len(kept) == 3 * 5  # 3 blocks x 5 chunks of the 32 tokens
    for tensor, copy in zip(kept, copies):
        assert torch.equal(tensor, copy)


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
            with numba_scans(fused), torch.inference_mode():
                barrier.wait()
                for _ in range(5):
                    results.setdefault(i, []).append(model(inputs[i]))
        except Exception as e:  # (reported below: an exception in a thread does not fail the test by itself)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        for out in results[i]:
            assert torch.equal(out, expected[i])
