"""With autograd, a block's LayerNorms (ln1, ln2) run inside its mixers' shift-mix projections
(``Block._normed``): the same values and gradients as the norm run as its own module, one ``[B, T, C]`` less kept
for the backward per norm, and a hook on a norm or a mixer still sees it called as a module."""
import pytest
import torch

import vrwkv
from conftest import perturb_, saved_bytes
from vrwkv.models.vrwkv import Block


def _model(name: str):
    torch.manual_seed(0)
    kwargs = {"img_size": 64, "depth": 3} if name == "vrwkv_tiny" else {}
    model = vrwkv.create_model(name, num_classes=5, **kwargs)
    perturb_(model, 0.1)
    return model.train()


def _norm_as_a_module(monkeypatch):
    monkeypatch.setattr(Block, "_normed", staticmethod(lambda mixer, norm, x, hw: mixer(norm(x), hw)))


@pytest.mark.parametrize("name", ["vrwkv_tiny", "test_vrwkv6"])
def test_same_values_and_gradients_as_the_norm_module(monkeypatch, name):
    """Bit for bit: V1 (both mixers fuse their norm) and VRWKV6 (only its V1 channel mix does)."""
    model = _model(name)
    x = torch.randn(2, 3, 64, 64)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters()}

    fused_out, fused_grads = run()
    _norm_as_a_module(monkeypatch)
    out, grads = run()
    assert torch.equal(fused_out, out)
    assert fused_grads.keys() == grads.keys()
    assert all(torch.equal(fused_grads[n], grads[n]) for n in grads)


def test_keeps_one_stream_less_per_norm(monkeypatch):
    """The training graph of the V1 model keeps two ``[B, T, C]`` per block less (the outputs of ln1 and ln2)."""
    model = _model("vrwkv_tiny")
    x = torch.randn(2, 3, 64, 64)
    fused, _ = saved_bytes(lambda: model(x), model.parameters())
    _norm_as_a_module(monkeypatch)
    plain, _ = saved_bytes(lambda: model(x), model.parameters())
    stream = 2 * 16 * model.embed_dim * 4  # [B, T, C] float32
    assert plain - fused == 2 * len(model.layers) * stream


def test_a_hook_on_a_norm_or_a_mixer_sees_the_module_called():
    """A forward hook on ln2 is called; a pre-hook on the spatial mix gets ``ln1(x)`` as its input, as without the
    fusion (with hooks the norm runs as a module)."""
    model = _model("vrwkv_tiny")
    x = torch.randn(2, 3, 64, 64)
    seen = {}
    block = model.layers[2]
    handles = [model.layers[1].ln2.register_forward_hook(lambda m, a, out: seen.update(ln2=out)),
               block.register_forward_pre_hook(lambda m, a: seen.update(block=a[0])),
               block.att.register_forward_pre_hook(lambda m, a: seen.update(att=a[0]))]  # (hooks return None)
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    assert seen["ln2"].shape == (2, 16, model.embed_dim)
    assert torch.equal(seen["att"], block.ln1(seen["block"]))
