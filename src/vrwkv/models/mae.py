"""Masked autoencoder with a Vision-RWKV encoder and decoder (the official ``MaskedAutoencoderVRWKV``, spec §5),
after "Masked Autoencoders Are Scalable Vision Learners", He et al., arXiv:2111.06377 (facebookresearch/mae).

The encoder runs on the visible patches only (25 % at the default mask ratio): Bi-WKV is linear in the number of
tokens and needs no attention mask, so a sparse input is just a shorter sequence. Two ways to feed it:

* ``sparse_mode="official"`` (the official code): the visible tokens stay in the random order of the masking
  shuffle, the token shift is the 1-D ``single_shift`` (token t takes token t - 1, all channels, zeros first), so a
  token's "neighbour" is an arbitrary visible patch; the decoder uses the same 1-D shift on the full raster sequence.
* ``sparse_mode="grid"`` (ours): the visible tokens are kept in raster order and Q-Shift is computed on the full
  patch grid with the masked neighbours absent (zeros): scatter the visible tokens into the H x W grid, Q-Shift,
  gather them back. Each channel quarter then really sees the left/right/upper/lower patch whenever it is visible.
  The decoder uses the ordinary Q-Shift on the full grid.

In both modes the spatial mix divides ``spatial_decay`` and ``spatial_first`` by the length of the sequence it
sees: the number of visible tokens in the encoder, all tokens in the decoder (as the official code does). Both
stacks are made of the V1 :class:`~vrwkv.models.vrwkv.Block`, so block 0 of each has ``ln0`` (also
``decoder_blocks.0.ln0``, as the official ``Block`` built with ``layer_id=0``).

State-dict names are the official ones: ``patch_embed.projection.*``, ``pos_embed``, ``blocks.{i}.*``, ``ln1.*``,
``decoder_embed.*``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.{i}.*``, ``ln2.*``, ``decoder_pred.*``.
:func:`load_mae_encoder` puts the encoder of such a checkpoint into a :class:`~vrwkv.models.vrwkv.VRWKV` classifier.

Official quirks, documented rather than copied: the official encoder adds ``pos_embed`` twice (once resized to
the input grid, once raw, so only the pre-training resolution works); that needs ``official_quirks=True`` here.
"""
from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

import torch
import torch.utils.checkpoint
from torch import nn

from vrwkv.layers import ChannelMix, PatchEmbed, SpatialMix, q_shift, resize_pos_embed
from vrwkv.models._checkpoint import _safe_globals, is_safetensors_file, pos_embed_grid, read_checkpoint
from vrwkv.models.vrwkv import VRWKV, Block

__all__ = [
    "MAE_MODELS", "SPARSE_MODES", "MaskedAutoencoderVRWKV", "VisibleTokens", "create_mae_model",
    "load_mae_encoder", "mae_encoder_state_dict", "read_mae_checkpoint", "sincos_pos_embed_2d", "visible_q_shift",
]

_logger = logging.getLogger(__name__)

SparseMode = Literal["official", "grid"]
SPARSE_MODES: tuple[str, ...] = ("official", "grid")


# ------------------------------------------------------------------------------------------ sparse token shift
class VisibleTokens(NamedTuple):
    """Where the encoder's tokens sit on the patch grid; the encoder blocks receive it in place of ``(H, W)``.

    Attributes:
        hw: the full patch grid (H, W).
        ids: ``[B, N]`` raster index (``h * W + w``) of each visible token, in sequence order.
    """

    hw: tuple[int, int]
    ids: torch.Tensor


def visible_q_shift(
    x: torch.Tensor, where: VisibleTokens, shift_pixel: int = 1, channel_gamma: float = 0.25
) -> torch.Tensor:
    """Q-Shift of a subset of the grid's tokens, with the tokens that are not in the subset treated as absent (zero).

    Args:
        x: visible tokens ``[B, N, C]``.
        where: their grid and raster positions (``where.ids`` ``[B, N]``, distinct per row).
        shift_pixel: neighbour distance.
        channel_gamma: fraction of channels per direction (<= 1/4).

    Returns:
        ``[B, N, C]``: token n gets, per channel quarter, its left/right/upper/lower grid neighbour if that is
        visible, else zeros (as at the border of the grid).
    """
    B, N, C = x.shape
    H, W = where.hw
    if where.ids.shape != (B, N):
        raise ValueError(f"visible_q_shift: ids of shape {tuple(where.ids.shape)} for tokens {tuple(x.shape)}")
    index = where.ids.unsqueeze(-1).expand(B, N, C)
    grid = x.new_zeros(B, H * W, C).scatter(1, index, x)  # [B, H*W, C], masked positions are zeros
    return q_shift(grid, (H, W), shift_pixel, channel_gamma).gather(1, index)  # [B, N, C]


def _mixer_factory(cls: type[nn.Module], shift: Callable | None, **kwargs: Any) -> Callable[..., nn.Module]:
    """``factory(dim, layer_id, device=, dtype=)`` for :class:`Block`; ``shift`` replaces the mixer's own shift."""

    def build(dim: int, layer_id: int, **dd: Any) -> nn.Module:
        mixer = cls(dim, layer_id, **kwargs, **dd)
        if shift is not None and mixer.shift is not None:
            mixer.shift = shift
        return mixer

    return build


# ------------------------------------------------------------------------------------------ position embedding
def sincos_pos_embed_2d(embed_dim: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding ``[1, H*W, D]`` (float64, raster order, no cls token).

    The first ``D/2`` channels encode the column ``w``, the last ``D/2`` the row ``h`` (MAE's ``meshgrid(grid_w,
    grid_h)``); each half is ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_i = 10000^(-i / (D/4))``.
    (timm's ``build_sincos2d_pos_embed`` puts the row first, so its values differ.)
    """
    if embed_dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    H, W = grid_hw
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))  # [D/4]
    rows, cols = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                                indexing="ij")  # [H, W] each

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega  # [H*W, D/4]
        return torch.cat([out.sin(), out.cos()], dim=1)  # [H*W, D/2]

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).unsqueeze(0)  # [1, H*W, D]


# ------------------------------------------------------------------------------------------------------- model
class MaskedAutoencoderVRWKV(nn.Module):
    """Masked autoencoder: a VRWKV encoder on the visible patches, a light VRWKV decoder that predicts the pixels.

    Steps, each a method with documented shapes (as ``models_mae.py`` of MAE): :meth:`patchify` /
    :meth:`unpatchify`, :meth:`random_masking`, :meth:`forward_encoder`, :meth:`forward_decoder`,
    :meth:`forward_loss`; :meth:`forward` chains them and returns ``(loss, pred, mask)``.

    Args:
        img_size: pre-training image size (int or (h, w)); sets the grids of both position embeddings. Other sizes
            (multiples of the patch) work: the embeddings are bicubic-resized, unless ``official_quirks``.
        patch_size: patch side p.
        in_chans: image channels.
        embed_dim / depth: encoder width and number of blocks.
        decoder_embed_dim / decoder_depth: decoder width and number of blocks.
        hidden_rate: FFN width multiplier (encoder and decoder).
        drop_path_rate / decoder_drop_path_rate: stochastic depth, ``linspace(0, rate)`` over each stack.
        init_values: layer-scale init (None: no layer scale).
        post_norm: res-post-norm blocks.
        key_norm: LayerNorm on the WKV output and on the FFN hidden activations.
        shift_pixel / channel_gamma: token-shift distance and Q-Shift channel fraction.
        init_mode: ``"fancy"``, ``"local"`` or ``"global"`` init of the decay/bonus/mix parameters.
        wkv_semantics: ``"official"`` (the official kernel's function) or ``"paper"`` Bi-WKV.
        sparse_mode: how the encoder sees the visible tokens: ``"official"`` (random order, 1-D shift) or
            ``"grid"`` (raster order, Q-Shift on the grid with masked neighbours absent); see the module docstring.
        official_quirks: add the encoder ``pos_embed`` twice, as the official code does.
        norm_pix_loss: regress per-patch normalised pixels (MAE option; the official VRWKV script leaves it off).
        device / dtype: parameter placement.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        hidden_rate: int = 4,
        drop_path_rate: float = 0.1,
        decoder_drop_path_rate: float = 0.1,
        init_values: float | None = 1e-5,
        post_norm: bool = True,
        key_norm: bool = True,
        shift_pixel: int = 1,
        channel_gamma: float = 0.25,
        init_mode: str = "fancy",
        wkv_semantics: str = "official",
        sparse_mode: SparseMode = "official",
        official_quirks: bool = False,
        norm_pix_loss: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if sparse_mode not in SPARSE_MODES:
            raise ValueError(f"sparse_mode must be one of {SPARSE_MODES}, got {sparse_mode!r}")
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_hw[0] % patch_size or img_hw[1] % patch_size:
            raise ValueError(f"img_size {img_hw} is not a multiple of patch_size {patch_size}")
        for name, dim in (("embed_dim", embed_dim), ("decoder_embed_dim", decoder_embed_dim)):
            if dim % 4:
                raise ValueError(f"{name} must be divisible by 4 (2-D sin-cos position embedding), got {dim}")
        self.patch_size, self.in_chans = patch_size, in_chans
        self.grid_size = (img_hw[0] // patch_size, img_hw[1] // patch_size)
        self.embed_dim, self.depth = embed_dim, depth
        self.sparse_mode, self.official_quirks, self.norm_pix_loss = sparse_mode, official_quirks, norm_pix_loss
        self.grad_checkpointing = False
        # the classifier kwargs that give a VRWKV the encoder's parameters and block structure (load_mae_encoder)
        self.encoder_kwargs = dict(img_size=img_hw, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                   depth=depth, hidden_rate=hidden_rate, init_values=init_values,
                                   post_norm=post_norm, key_norm=key_norm)
        num_patches = self.grid_size[0] * self.grid_size[1]

        mix = dict(shift_pixel=shift_pixel, channel_gamma=channel_gamma, init_mode=init_mode, key_norm=key_norm)
        if sparse_mode == "official":
            enc_shift_mode = dec_shift_mode = "token_shift"  # the official single_shift
            enc_shift = None
        else:
            enc_shift_mode = dec_shift_mode = "q_shift"
            enc_shift = partial(visible_q_shift, shift_pixel=shift_pixel, channel_gamma=channel_gamma)

        def stack(dim: int, n: int, rate: float, shift_mode: str, shift: Callable | None) -> nn.ModuleList:
            spatial = _mixer_factory(SpatialMix, shift, depth=n, shift_mode=shift_mode, wkv_semantics=wkv_semantics,
                                     **mix)
            channel = _mixer_factory(ChannelMix, shift, depth=n, shift_mode=shift_mode, hidden_rate=hidden_rate,
                                     **mix)
            dpr = [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
            return nn.ModuleList(Block(dim, i, spatial, channel, drop_path=dpr[i], init_values=init_values,
                                       post_norm=post_norm, **dd) for i in range(n))

        # encoder
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, **dd)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim, **dd))
        self.blocks = stack(embed_dim, depth, drop_path_rate, enc_shift_mode, enc_shift)
        self.ln1 = nn.LayerNorm(embed_dim, **dd)
        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, **dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim, **dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches, decoder_embed_dim, **dd))
        self.decoder_blocks = stack(decoder_embed_dim, decoder_depth, decoder_drop_path_rate, dec_shift_mode, None)
        self.ln2 = nn.LayerNorm(decoder_embed_dim, **dd)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans, **dd)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """MAE's init: fixed 2-D sin-cos in both (trainable) position embeddings, xavier-uniform Linears with zero
        bias and patch conv (on its flattened ``[C, in_chans*p*p]`` view), LayerNorm 1/0, mask token N(0, 0.02).
        The mixers' decay/bonus/mix parameters keep their ``init_mode`` values."""
        self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size))
        self.decoder_pos_embed.copy_(sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], self.grid_size))
        w = self.patch_embed.projection.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_mae_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Nothing: the official recipe decays every parameter."""
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # -------------------------------------------------------------------------------------------- pixels
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """Images ``[B, in_chans, H*p, W*p]`` -> patches ``[B, H*W, p*p*in_chans]`` (raster order; inside a patch
        the order is row p, column q, channel c, as MAE)."""
        p = self.patch_size
        B, C, h, w = imgs.shape
        if C != self.in_chans or h % p or w % p:
            raise ValueError(f"patchify: expected [B, {self.in_chans}, H*{p}, W*{p}] images, got {tuple(imgs.shape)}")
        H, W = h // p, w // p
        x = imgs.reshape(B, C, H, p, W, p)
        x = torch.einsum("bchpwq->bhwpqc", x)
        return x.reshape(B, H * W, p * p * C)

    def unpatchify(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Inverse of :meth:`patchify`: ``[B, H*W, p*p*in_chans]`` -> ``[B, in_chans, H*p, W*p]``.

        ``hw`` is the patch grid (default: the pre-training grid)."""
        p, C = self.patch_size, self.in_chans
        H, W = hw or self.grid_size
        B, L, D = x.shape
        if L != H * W or D != p * p * C:
            raise ValueError(f"unpatchify: expected [B, {H * W}, {p * p * C}] patches, got {tuple(x.shape)}")
        x = x.reshape(B, H, W, p, p, C)
        x = torch.einsum("bhwpqc->bchpwq", x)
        return x.reshape(B, C, H * p, W * p)

    # ------------------------------------------------------------------------------------------- masking
    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random ``int(L * (1 - mask_ratio))`` tokens of every sample (argsort of uniform noise).

        The kept tokens are in the order of the shuffle (``sparse_mode="official"``) or in raster order
        (``"grid"``).

        Args:
            x: tokens ``[B, L, C]`` in raster order.
            mask_ratio: fraction of tokens removed, in [0, 1).
            generator: RNG of the noise (default: the global one).

        Returns:
            ``x_masked [B, N, C]``, ``mask [B, L]`` (0 = kept, 1 = removed, raster order), ``ids_restore [B, L]``
            (``cat([x_masked, removed tokens])`` gathered with it is back in raster order) and ``ids_keep [B, N]``
            (raster index of each kept token).
        """
        B, L, C = x.shape
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        len_keep = int(L * (1 - mask_ratio))
        if len_keep < 1:
            raise ValueError(f"mask_ratio {mask_ratio} keeps no token of {L}")
        noise = torch.rand(B, L, device=x.device, generator=generator)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first len_keep are kept
        if self.sparse_mode == "grid":
            kept = ids_shuffle[:, :len_keep].sort(dim=1).values
            ids_shuffle = torch.cat([kept, ids_shuffle[:, len_keep:]], dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(B, len_keep, C))  # [B, N, C]
        mask = torch.ones(B, L, device=x.device, dtype=x.dtype)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # shuffle order -> raster order
        return x_masked, mask, ids_restore, ids_keep

    # ------------------------------------------------------------------------------------------- forward
    def _run(self, blk: nn.Module, x: torch.Tensor, where: Any) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(blk, x, where, use_reentrant=False)
        return blk(x, where)

    def _resized(self, pos_embed: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return resize_pos_embed(pos_embed, self.grid_size, hw, "bicubic")

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Embed, mask, and encode the visible patches.

        Args:
            imgs: ``[B, in_chans, H*p, W*p]``.
            mask_ratio: fraction of patches removed.
            generator: RNG of the masking noise.

        Returns:
            ``latent [B, N, C]`` (final-normed visible tokens, in the sequence order of ``sparse_mode``),
            ``mask [B, L]``, ``ids_restore [B, L]`` (see :meth:`random_masking`) and the patch grid ``(H, W)``.
        """
        x, hw = self.patch_embed(imgs)  # [B, L, C]
        x = x + self._resized(self.pos_embed, hw)
        if self.official_quirks:
            if hw != self.grid_size:
                raise ValueError(f"official_quirks adds the raw {self.grid_size} pos_embed a second time: the input "
                                 f"grid {hw} must equal it")
            x = x + self.pos_embed  # the official encoder adds it twice
        x, mask, ids_restore, ids_keep = self.random_masking(x, mask_ratio, generator)
        where = VisibleTokens(hw, ids_keep)  # the blocks divide w, u by N = the visible count
        for blk in self.blocks:
            x = self._run(blk, x, where)
        return self.ln1(x), mask, ids_restore, hw

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Predict every patch's pixels from the latent.

        Args:
            x: ``latent [B, N, C]`` from :meth:`forward_encoder`.
            ids_restore: ``[B, L]``.
            hw: the patch grid (H, W), ``H * W = L``.

        Returns:
            ``pred [B, L, p*p*in_chans]`` in raster order.
        """
        x = self.decoder_embed(x)  # [B, N, D]
        B, N, D = x.shape
        L = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(B, L - N, D)], dim=1)  # [B, L, D], shuffle order
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(B, L, D))  # raster order
        x = x + self._resized(self.decoder_pos_embed, hw)
        for blk in self.decoder_blocks:
            x = self._run(blk, x, hw)  # all L tokens: w, u are divided by L
        return self.decoder_pred(self.ln2(x))

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the removed patches only.

        Args:
            imgs: ``[B, in_chans, H*p, W*p]``.
            pred: ``[B, L, p*p*in_chans]``.
            mask: ``[B, L]``, 1 for removed patches.

        Returns:
            Scalar loss (float32). With ``norm_pix_loss`` the target of each patch is normalised by its own mean and
            (unbiased) variance, as MAE.
        """
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred.float() - target).square().mean(dim=-1)  # [B, L], per-patch MSE
        mask = mask.float()
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images ``[B, in_chans, H*p, W*p]`` -> ``(loss, pred [B, L, p*p*in_chans], mask [B, L])``."""
        latent, mask, ids_restore, hw = self.forward_encoder(imgs, mask_ratio, generator)
        pred = self.forward_decoder(latent, ids_restore, hw)
        return self.forward_loss(imgs, pred, mask), pred, mask

    @torch.no_grad()
    def reconstruct(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Images for a reconstruction figure, all ``[B, in_chans, h, w]`` in the input's (normalised) space.

        Returns:
            ``masked`` (removed patches zero), ``prediction`` (every patch predicted), ``reconstruction`` (visible
            patches from the input, removed ones predicted) and ``mask`` ``[B, 1, h, w]`` (1 = removed). With
            ``norm_pix_loss`` the predicted patches are de-normalised with the true patch mean and variance.
        """
        _, pred, mask = self(imgs, mask_ratio, generator)
        hw = (imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size)
        pred = pred.float()
        if self.norm_pix_loss:
            target = self.patchify(imgs).float()
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        pixel_mask = mask.float().unsqueeze(-1).expand(-1, -1, self.patch_size**2 * self.in_chans)  # [B, L, p*p*c]
        pixel_mask = self.unpatchify(pixel_mask, hw)
        imgs = imgs.float()
        prediction = self.unpatchify(pred, hw)
        return {"masked": imgs * (1 - pixel_mask), "prediction": prediction,
                "reconstruction": imgs * (1 - pixel_mask) + prediction * pixel_mask, "mask": pixel_mask[:, :1]}

    # ------------------------------------------------------------------------------------------ checkpoints
    def load_pretrained(self, checkpoint_path: str | Path) -> None:
        """Load an official MAE checkpoint (``{'model': ..., 'args': Namespace, ...}``), one of our pre-training
        run checkpoints or a plain state dict. Both position embeddings are bicubic-resized if their (square)
        grid differs from this model's.

        Raises:
            ValueError: listing missing / unexpected keys and shape mismatches if the file does not fit.
        """
        state, _ = read_mae_checkpoint(checkpoint_path)
        for name in ("pos_embed", "decoder_pos_embed"):
            pos = state.get(name)
            if pos is not None and pos.ndim == 3:
                state[name] = resize_pos_embed(pos, pos_embed_grid(pos.shape[1], None, self.grid_size),
                                               self.grid_size)
        _check_fit(state, self.state_dict(), f"{checkpoint_path} does not fit {type(self).__name__}")
        self.load_state_dict(state)
        _logger.info("loaded %s (%d tensors)", checkpoint_path, len(state))


def _init_mae_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ------------------------------------------------------------------------------------------------ checkpoints
def read_mae_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The MAE state dict of a checkpoint (``module.`` stripped), and the encoder architecture if recorded.

    Reads, without running code from the file (``torch.load(weights_only=True)``): official MAE files
    (``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``; ``args`` is an ``argparse.Namespace``, allow-listed as
    the inert attribute bag it is), our pre-training run checkpoints (their ``config["encoder"]`` records the
    architecture), plain state dicts and safetensors files.

    Raises:
        ValueError: missing or unreadable file, or no state dict in it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    if is_safetensors_file(path):
        return read_checkpoint(path).state_dict, None
    try:
        with torch.serialization.safe_globals([*_safe_globals(), argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt / unsafe files
        first = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()
        raise ValueError(f"{path}: not loadable as a weights-only checkpoint ({type(e).__name__}: "
                         f"{first[0] if first else ''})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    state = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), dict)), obj)
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: no state dict found (looked for 'model', 'state_dict' or a dict of tensors); "
                         f"top-level keys: {sorted(map(str, obj))[:10]}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    config = obj.get("config")
    encoder = config.get("encoder") if isinstance(config, dict) else None
    return dict(state), encoder if isinstance(encoder, dict) else None


def mae_encoder_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MAE keys -> VRWKV classifier keys: ``blocks.{i}.*`` -> ``layers.{i}.*``; ``patch_embed.*``, ``pos_embed`` and
    the final norm ``ln1.*`` keep their names; the decoder (``decoder_*``, ``mask_token``, ``ln2.*``) is dropped."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("blocks."):
            out["layers." + k[len("blocks."):]] = v
        elif k == "pos_embed" or k.startswith(("patch_embed.", "ln1.")):
            out[k] = v
    return out


def _check_fit(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], what: str,
               optional: tuple[str, ...] = (), hint: str = "") -> None:
    """Raise a ValueError listing missing / unexpected keys and shape mismatches (keys in ``optional`` may be
    missing)."""
    missing = [k for k in own if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    if not (missing or unexpected or mismatched):
        return
    groups = [(t, i) for t, i in (("missing keys", missing), ("unexpected keys", unexpected),
                                  ("shape mismatches", mismatched)) if i]
    # the first line is complete on its own (the CLI shows only that one)
    msg = f"{what}: " + "; ".join(f"{len(items)} {title} (e.g. {items[0]})" for title, items in groups) + hint
    for title, items in groups:
        more = f" ... (+{len(items) - 8} more)" if len(items) > 8 else ""
        msg += f"\n  {title} ({len(items)}): " + ", ".join(items[:8]) + more
    raise ValueError(msg)


def load_mae_encoder(model: VRWKV, checkpoint_path: str | Path) -> list[str]:
    """Initialise a VRWKV classifier's backbone from the encoder of an MAE checkpoint (for fine-tuning).

    Every backbone tensor (patch embed, ``pos_embed`` bicubic-resized to the classifier's grid, blocks, final norm)
    is taken from the checkpoint; the classifier head keeps its fresh init. The classifier must have the encoder's
    architecture (``embed_dim``, ``depth``, ``patch_size``, ``hidden_rate``, ``key_norm``, layer scale, and
    ``post_norm``, which is checked when the checkpoint records it). Its token shift may differ: the paper
    fine-tunes a Q-Shift classifier from the ``single_shift`` encoder.

    Returns:
        The names of the classifier tensors that were loaded.

    Raises:
        ValueError: the file holds no MAE encoder, or it does not fit the classifier (keys and shapes listed).
    """
    if not isinstance(model, VRWKV):
        raise ValueError(f"an MAE encoder initialises a VRWKV classifier, not a {type(model).__name__}")
    state, encoder = read_mae_checkpoint(checkpoint_path)
    if not any(k.startswith("blocks.") for k in state) or "decoder_embed.weight" not in state:
        raise ValueError(f"{checkpoint_path} is not an MAE checkpoint (no 'blocks.*' / 'decoder_embed.*' keys)")
    enc = mae_encoder_state_dict(state)
    hint = ""
    if encoder is not None:
        arch = {k: v for k, v in encoder.items() if k not in ("img_size", "in_chans")}
        hint = f"; build the classifier with model.kwargs matching the encoder: {arch}"
        post_norm = model.layers[0].post_norm if len(model.layers) else None
        if post_norm is not None and bool(encoder.get("post_norm")) != post_norm:
            raise ValueError(f"{checkpoint_path}: the MAE encoder has post_norm={encoder.get('post_norm')}, the "
                             f"classifier post_norm={post_norm}{hint}")
    pos = enc.get("pos_embed")
    if pos is not None and pos.ndim == 3:
        src = tuple(encoder["img_size"]) if encoder is not None else None
        src_grid = (src[0] // encoder["patch_size"], src[1] // encoder["patch_size"]) if src else None
        if src_grid is None or src_grid[0] * src_grid[1] != pos.shape[1]:
            src_grid = pos_embed_grid(pos.shape[1], None, model.grid_size)
        enc["pos_embed"] = resize_pos_embed(pos, src_grid, model.grid_size, model.interpolate_mode)
    _check_fit(enc, model.state_dict(), f"{checkpoint_path} does not fit the {type(model).__name__} classifier",
               optional=("head.",), hint=hint)
    model.load_state_dict(enc, strict=False)
    _logger.info("initialised %d backbone tensors from the MAE encoder in %s", len(enc), checkpoint_path)
    return sorted(enc)


# ---------------------------------------------------------------------------------------------------- sizes
def mae_vrwkv_base_patch16(**kwargs: Any) -> MaskedAutoencoderVRWKV:
    """The official ``mae_vrwkv_base_patch16``: encoder 768 x 12, decoder 512 x 8, post-norm, layer scale 1e-5,
    key_norm, drop path 0.1 in each stack, official sparse inputs."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, decoder_embed_dim=512, decoder_depth=8, hidden_rate=4,
                      init_values=1e-5, post_norm=True, key_norm=True, drop_path_rate=0.1,
                      decoder_drop_path_rate=0.1)
    return MaskedAutoencoderVRWKV(**dict(model_args, **kwargs))


def mae_vrwkv_tiny_patch16(**kwargs: Any) -> MaskedAutoencoderVRWKV:
    """Not official: an encoder with the VRWKV-T classifier's structure (192 x 12, pre-norm, no layer scale, no
    key_norm; ``vrwkv_tiny`` fine-tunes from it as is) and a 128 x 4 decoder; no drop path."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, decoder_embed_dim=128, decoder_depth=4, hidden_rate=4,
                      init_values=None, post_norm=False, key_norm=False, drop_path_rate=0.0,
                      decoder_drop_path_rate=0.0)
    return MaskedAutoencoderVRWKV(**dict(model_args, **kwargs))


MAE_MODELS: dict[str, Callable[..., MaskedAutoencoderVRWKV]] = {
    "mae_vrwkv_base_patch16": mae_vrwkv_base_patch16,
    "mae_vrwkv_tiny_patch16": mae_vrwkv_tiny_patch16,
}


def create_mae_model(name: str, checkpoint_path: str | Path | None = None, **kwargs: Any) -> MaskedAutoencoderVRWKV:
    """Build a masked autoencoder by name (see :data:`MAE_MODELS`), optionally loading a checkpoint.

    Raises:
        ValueError: unknown name, or a checkpoint that does not fit.
    """
    if name not in MAE_MODELS:
        raise ValueError(f"unknown MAE model {name!r}; available: {', '.join(sorted(MAE_MODELS))}")
    model = MAE_MODELS[name](**kwargs)
    if checkpoint_path is not None:
        model.load_pretrained(checkpoint_path)
    return model
