"""MaskedAutoencoderVRWKV: pixels <-> patches, masking invariants, the masked-patch loss, both sparse-input modes,
official checkpoint keys, and the encoder -> classifier hand-over. Tiny models (16 tokens, 4 visible)."""
import argparse

import numpy as np
import pytest
import torch

from conftest import DEVICE, perturb_, rel_err
from vrwkv.layers import q_shift, resize_pos_embed
from vrwkv.models import VRWKV
from vrwkv.models.mae import (MaskedAutoencoderVRWKV, VisibleTokens, create_mae_model, load_mae_encoder,
                              sincos_pos_embed_2d, visible_q_shift)
from vrwkv.ops import bi_wkv

MODES = ["official", "grid"]
# the official block structure (key_norm, res-post-norm, layer scale), at test size
OFFICIAL = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, decoder_embed_dim=16, decoder_depth=2,
                key_norm=True, post_norm=True, init_values=1e-5, drop_path_rate=0.1, decoder_drop_path_rate=0.1)


def _perturbed(**kwargs) -> MaskedAutoencoderVRWKV:
    """A model whose parameters are all non-trivial (init has unit norms, zero biases, tiny layer scales)."""
    torch.manual_seed(0)
    model = MaskedAutoencoderVRWKV(**{**OFFICIAL, **kwargs}).to(DEVICE)
    perturb_(model, 0.1)
    return model.eval()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


# ------------------------------------------------------------------------------------------------ pixels
def test_patchify_orders_patches_raster_and_pixels_p_q_c_and_unpatchify_inverts_it():
    model = MaskedAutoencoderVRWKV(img_size=(8, 12), patch_size=4, in_chans=2, embed_dim=8, depth=1,
                                   decoder_embed_dim=8, decoder_depth=1)
    imgs = torch.randn(2, 2, 8, 12)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 6, 32)
    h, w = 1, 2  # patch (row 1, column 2) is token 1 * 3 + 2
    expected = imgs[:, :, 4:8, 8:12].permute(0, 2, 3, 1).reshape(2, -1)  # [B, p, q, c] flattened
    assert torch.equal(patches[:, h * 3 + w], expected)
    assert torch.equal(model.unpatchify(patches, (2, 3)), imgs)
    with pytest.raises(ValueError, match="patchify"):
        model.patchify(torch.randn(1, 3, 8, 12))


def test_sincos_pos_embed_is_maes_formula():
    D, S = 16, 5
    # MAE's util/pos_embed.py, restated: meshgrid(grid_w, grid_h) -> the first half of the channels encodes w
    def embed_1d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(S, dtype=np.float64), np.arange(S, dtype=np.float64)), 0)
    expected = np.concatenate([embed_1d(D // 2, grid[0]), embed_1d(D // 2, grid[1])], axis=1)
    ours = sincos_pos_embed_2d(D, (S, S))
    assert ours.shape == (1, S * S, D) and np.abs(ours[0].numpy() - expected).max() < 1e-12
    rect = sincos_pos_embed_2d(D, (2, 3))[0]  # token t = h * 3 + w: column in the first half, row in the second
    assert torch.equal(rect[4, : D // 2], ours[0, 1, : D // 2]) and torch.equal(rect[4, D // 2 :], ours[0, S, D // 2 :])


# ------------------------------------------------------------------------------------------------ masking
@pytest.mark.parametrize("mode", MODES)
def test_random_masking_invariants(mode):
    model = MaskedAutoencoderVRWKV(**{**OFFICIAL, "sparse_mode": mode}).to(DEVICE)
    x = torch.randn(5, 16, 3, device=DEVICE)
    x_masked, mask, ids_restore, ids_keep = model.random_masking(x, 0.75, _gen(1))
    assert x_masked.shape == (5, 4, 3) and ids_keep.shape == (5, 4)
    assert torch.equal(mask.sum(1), torch.full((5,), 12.0, device=DEVICE))
    assert torch.equal(x_masked, x[torch.arange(5)[:, None], ids_keep])  # the kept tokens, from their positions
    assert (mask.gather(1, ids_keep) == 0).all()
    # ids_restore undoes the shuffle: [kept tokens, removed tokens] gathered with it is x again
    removed = torch.stack([x[b, mask[b].bool()] for b in range(5)])  # [B, 12, 3] in raster order
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    removed_in_shuffle_order = torch.stack([x[b, ids_shuffle[b, 4:]] for b in range(5)])
    assert torch.equal(torch.sort(removed_in_shuffle_order, 1).values, torch.sort(removed, 1).values)
    full = torch.cat([x_masked, removed_in_shuffle_order], 1).gather(1, ids_restore[..., None].expand(-1, -1, 3))
    assert torch.equal(full, x)
    ordered = (ids_keep.diff(dim=1) > 0).all(dim=1)
    if mode == "grid":
        assert ordered.all()  # raster order
    else:
        assert not ordered.all()  # the official order is the random shuffle
    # the global RNG gives fresh masks, a seeded generator the same ones
    assert torch.equal(model.random_masking(x, 0.75, _gen(1))[1], mask)
    assert not torch.equal(model.random_masking(x, 0.75)[1], model.random_masking(x, 0.75)[1])


@pytest.mark.parametrize("ratio", [1.0, -0.1, 0.99])
def test_masking_rejects_ratios_that_keep_nothing_or_are_invalid(ratio):
    model = MaskedAutoencoderVRWKV(**OFFICIAL)
    with pytest.raises(ValueError, match="mask_ratio"):
        model(torch.randn(1, 3, 16, 16), mask_ratio=ratio)


# ------------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_is_the_per_patch_mse_on_masked_patches_only(norm_pix_loss):
    model = _perturbed(norm_pix_loss=norm_pix_loss)
    imgs = torch.randn(3, 3, 16, 16, device=DEVICE)
    loss, pred, mask = model(imgs, 0.75, _gen(2))
    target = model.patchify(imgs).double()
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((pred.double() - target) ** 2).mean(-1)
    assert abs(loss.item() - (per_patch[mask.bool()].mean()).item()) < 1e-5 * loss.item()
    # changing the prediction of visible patches does not change the loss; of a masked patch it does
    visible = ~mask.bool()
    changed = pred.detach().clone()
    changed[visible] += 10.0
    assert model.forward_loss(imgs, changed, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    changed[mask.bool().nonzero()[0].tolist()] += 10.0
    assert model.forward_loss(imgs, changed, mask).item() > loss.item() + 1.0


# ------------------------------------------------------------------------------------------------ sparse inputs
@pytest.mark.parametrize("mode", MODES)
def test_both_sparse_modes_train_every_parameter(mode):
    model = _perturbed(sparse_mode=mode).train()
    loss, pred, mask = model(torch.randn(2, 3, 16, 16, device=DEVICE))
    assert pred.shape == (2, 16, 48) and mask.shape == (2, 16) and torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad
    # gradient checkpointing recomputes the blocks: same loss and gradients
    model.eval()
    imgs = torch.randn(2, 3, 16, 16, device=DEVICE)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        model(imgs, 0.75, _gen(3))[0].backward()
        grads.append(model.blocks[0].att.key.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def _reference_visible_shift(x, ids, hw, g):
    """Loops: each channel quarter takes its left / right / upper / lower grid neighbour if visible, else 0."""
    B, N, C = x.shape
    H, W = hw
    out = torch.zeros_like(x)
    for b in range(B):
        where = {int(ids[b, n]): n for n in range(N)}
        for n in range(N):
            h, w = divmod(int(ids[b, n]), W)
            for q, (dh, dw) in enumerate([(0, -1), (0, 1), (-1, 0), (1, 0)]):
                hh, ww = h + dh, w + dw
                if 0 <= hh < H and 0 <= ww < W and hh * W + ww in where:
                    out[b, n, q * g:(q + 1) * g] = x[b, where[hh * W + ww], q * g:(q + 1) * g]
            out[b, n, 4 * g:] = x[b, n, 4 * g:]
    return out


def test_visible_q_shift_matches_a_loop_reference_and_is_q_shift_on_a_full_grid():
    torch.manual_seed(0)
    H, W, C = 3, 5, 10  # odd grid, C not divisible by 4 (two unshifted channels)
    x = torch.randn(2, 7, C, dtype=torch.float64)
    ids = torch.stack([torch.randperm(H * W)[:7] for _ in range(2)])  # any order, as in the official sequences
    out = visible_q_shift(x, VisibleTokens((H, W), ids))
    assert torch.equal(out, _reference_visible_shift(x, ids, (H, W), 2))
    full = torch.randn(2, H * W, C, dtype=torch.float64)
    raster = torch.arange(H * W).expand(2, -1)
    assert torch.equal(visible_q_shift(full, VisibleTokens((H, W), raster)), q_shift(full, (H, W)))
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: visible_q_shift(t, VisibleTokens((H, W), ids)), (x,))


@pytest.mark.parametrize("mode", MODES)
def test_encoder_block_uses_its_shift_and_the_visible_count_for_w_and_u(mode):
    """The first spatial mix of the encoder on 4 visible tokens, recomputed from the spec: official = token t takes
    token t - 1 of the sequence, grid = Q-Shift on the grid with absent neighbours; w, u divided by N = 4."""
    model = _perturbed(sparse_mode=mode).double()
    att = model.blocks[0].att
    x = torch.randn(2, 4, 32, dtype=torch.float64, device=DEVICE)
    ids = torch.tensor([[9, 0, 5, 6], [15, 3, 14, 1]], device=DEVICE)
    if mode == "official":
        xx = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
    else:
        xx = _reference_visible_shift(x, ids, (4, 4), 8)
    mix = lambda mu: x * mu + xx * (1 - mu)  # noqa: E731
    k, v = att.key(mix(att.spatial_mix_k)), att.value(mix(att.spatial_mix_v))
    y = bi_wkv(k, v, att.spatial_decay / 4, att.spatial_first / 4, semantics="official")
    expected = att.output(torch.sigmoid(att.receptance(mix(att.spatial_mix_r))) * att.key_norm(y))
    assert rel_err(att(x, VisibleTokens((4, 4), ids)), expected) < 1e-12


def test_grid_mode_without_masking_is_the_vrwkv_classifier_on_the_full_image(tmp_path):
    """With every patch visible the grid-mode encoder is exactly a Q-Shift VRWKV; this also checks the key mapping."""
    model = _perturbed(sparse_mode="grid")
    path = tmp_path / "mae.pth"
    torch.save({"model": model.state_dict()}, path)
    clf = VRWKV(num_classes=3, **model.encoder_kwargs).to(DEVICE).eval()
    load_mae_encoder(clf, path)
    imgs = torch.randn(2, 3, 16, 16, device=DEVICE)
    latent, mask, _, _ = model.forward_encoder(imgs, 0.0)
    assert mask.sum() == 0
    assert rel_err(latent, clf.forward_features(imgs)) < 1e-6


def test_official_quirks_add_the_pos_embed_twice():
    imgs = torch.randn(2, 3, 16, 16, device=DEVICE)
    quirky = _perturbed(official_quirks=True)
    plain = _perturbed()
    with torch.no_grad():
        plain.pos_embed.mul_(2)
    twice, doubled = quirky.forward_encoder(imgs, 0.5, _gen(0))[0], plain.forward_encoder(imgs, 0.5, _gen(0))[0]
    assert rel_err(twice, doubled) < 1e-5  # x + p + p vs x + 2p: rounding only
    assert rel_err(twice, _perturbed().forward_encoder(imgs, 0.5, _gen(0))[0]) > 1e-2  # once is different
    assert plain(torch.randn(1, 3, 24, 16, device=DEVICE))[1].shape == (1, 24, 48)  # other sizes: resized
    with pytest.raises(ValueError, match="official_quirks"):
        quirky(torch.randn(1, 3, 24, 16, device=DEVICE))


# ------------------------------------------------------------------------------------------------ checkpoints
def _official_keys(prefix: str, depth: int, C: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """Block keys of spec §1.2 with key_norm and layer scale (what the official MAE blocks have), written out."""
    keys = {}
    for i in range(depth):
        b = f"{prefix}.{i}."
        keys.update({b + "gamma1": (C,), b + "gamma2": (C,)})
        for n in ("ln1", "ln2") + (("ln0",) if i == 0 else ()):
            keys.update({b + n + ".weight": (C,), b + n + ".bias": (C,)})
        keys.update({b + "att.spatial_decay": (C,), b + "att.spatial_first": (C,)})
        keys.update({b + f"att.spatial_mix_{x}": (1, 1, C) for x in "kvr"})
        keys.update({b + f"att.{x}.weight": (C, C) for x in ("key", "value", "receptance", "output")})
        keys.update({b + "att.key_norm.weight": (C,), b + "att.key_norm.bias": (C,)})
        keys.update({b + "ffn.spatial_mix_k": (1, 1, C), b + "ffn.spatial_mix_r": (1, 1, C)})
        keys.update({b + "ffn.key.weight": (hidden, C), b + "ffn.key_norm.weight": (hidden,),
                     b + "ffn.key_norm.bias": (hidden,), b + "ffn.receptance.weight": (C, C),
                     b + "ffn.value.weight": (C, hidden)})
    return keys


def _official_mae_file(path, C=32, D=16, depth=2, dec_depth=2, grid=4, p=4):
    """An official-layout MAE checkpoint written from the spec's key list (§5), not from our model."""
    shapes = {"patch_embed.projection.weight": (C, 3, p, p), "patch_embed.projection.bias": (C,),
              "pos_embed": (1, grid * grid, C), "ln1.weight": (C,), "ln1.bias": (C,),
              "decoder_embed.weight": (D, C), "decoder_embed.bias": (D,), "mask_token": (1, 1, D),
              "decoder_pos_embed": (1, grid * grid, D), "ln2.weight": (D,), "ln2.bias": (D,),
              "decoder_pred.weight": (p * p * 3, D), "decoder_pred.bias": (p * p * 3,)}
    shapes.update(_official_keys("blocks", depth, C, 4 * C))
    shapes.update(_official_keys("decoder_blocks", dec_depth, D, 4 * D))
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    torch.save({"model": state, "optimizer": {"state": {}}, "epoch": 799, "scaler": {"scale": 65536.0},
                "args": argparse.Namespace(model="mae_vrwkv_base_patch16", mask_ratio=0.75, blr=1.5e-4)}, path)
    return state


def test_official_mae_checkpoint_loads_with_weights_only(tmp_path):
    path = tmp_path / "checkpoint-799.pth"
    state = _official_mae_file(path)
    with pytest.raises(Exception):  # the pickled argparse.Namespace needs the allow-list our loader adds
        torch.load(path, weights_only=True)
    model = create_mae_model("mae_vrwkv_base_patch16", checkpoint_path=path, **OFFICIAL)
    ours = model.state_dict()
    assert set(ours) == set(state)
    for k, v in state.items():
        assert torch.equal(ours[k], v), k
    bigger = create_mae_model("mae_vrwkv_base_patch16", checkpoint_path=path, **{**OFFICIAL, "img_size": 24})
    assert torch.equal(bigger.pos_embed, resize_pos_embed(state["pos_embed"], (4, 4), (6, 6)))
    with pytest.raises(ValueError, match="does not fit.*missing keys"):
        create_mae_model("mae_vrwkv_base_patch16", checkpoint_path=path, **{**OFFICIAL, "depth": 3})


def test_encoder_of_an_official_checkpoint_initialises_a_classifier(tmp_path):
    path = tmp_path / "mae.pth"
    state = _official_mae_file(path)
    torch.manual_seed(0)
    clf = VRWKV(img_size=24, patch_size=4, embed_dim=32, depth=2, num_classes=5, key_norm=True, post_norm=True,
                init_values=1e-5)  # another resolution: pos_embed is resized
    head = clf.head.weight.clone()
    loaded = load_mae_encoder(clf, path)
    own = clf.state_dict()
    assert len(loaded) == len(own) - 2 and torch.equal(clf.head.weight, head)
    for k, v in state.items():
        if k.startswith("blocks."):
            assert torch.equal(own["layers." + k[len("blocks."):]], v), k
    for k in ("patch_embed.projection.weight", "patch_embed.projection.bias", "ln1.weight", "ln1.bias"):
        assert torch.equal(own[k], state[k]), k
    assert torch.equal(own["pos_embed"], resize_pos_embed(state["pos_embed"], (4, 4), (6, 6)))
    with pytest.raises(ValueError, match=r"does not fit the VRWKV classifier: 8 unexpected keys .e.g. layers.0.att"):
        load_mae_encoder(VRWKV(img_size=16, patch_size=4, embed_dim=32, depth=2, num_classes=5, post_norm=True,
                               init_values=1e-5), path)
    not_mae = tmp_path / "clf.pth"
    torch.save({"model": clf.state_dict()}, not_mae)
    with pytest.raises(ValueError, match="not an MAE checkpoint"):
        load_mae_encoder(clf, not_mae)


def test_sizes_and_bad_arguments():
    import vrwkv

    base = create_mae_model("mae_vrwkv_base_patch16", device="meta")
    n_enc = sum(p.numel() for n, p in base.named_parameters() if not n.startswith(("decoder", "mask", "ln2")))
    assert len(base.blocks) == 12 and len(base.decoder_blocks) == 8 and base.decoder_pred.out_features == 768
    backbone = vrwkv.create_model("vrwkv_base", key_norm=True, num_classes=0, device="meta")
    assert n_enc == sum(p.numel() for p in backbone.parameters())  # exactly the VRWKV-B (+ key_norm) backbone
    with pytest.raises(ValueError, match="unknown MAE model"):
        create_mae_model("mae_vit_base")
    with pytest.raises(ValueError, match="sparse_mode"):
        MaskedAutoencoderVRWKV(sparse_mode="sorted")
    with pytest.raises(ValueError, match="divisible by 4"):
        MaskedAutoencoderVRWKV(embed_dim=30, depth=1)
