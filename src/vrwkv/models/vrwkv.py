"""Vision-RWKV (V1): "Vision-RWKV: Efficient and Scalable Visual Perception with RWKV-Like Architectures",
Duan et al., arXiv:2403.02308. Official code: https://github.com/OpenGVLab/Vision-RWKV (re-implemented from
the spec in shared/spec/official-vrwkv.md; state-dict names are the official backbone's, so official checkpoints
load after stripping ``backbone.``).

Contents, in timm's order: ``Block``, ``VRWKV`` (backbone + pooled classifier, timm model API),
``checkpoint_filter_fn``, pretrained cfgs, the builder, and the registered sizes ``vrwkv_tiny|small|base|large``
plus the tiny ``test_vrwkv*`` variants used by the tests.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from torch import nn

from vrwkv.layers import ChannelMix, Linear, PatchEmbed, SpatialMix, resize_pos_embed
from vrwkv.layers.linear import calls_hooks
from vrwkv.layers.workspace import inference_workspace
from vrwkv.ops.wkv.fused_cpu import numba_enabled
from vrwkv.models._checkpoint import convert_state_dict, pos_embed_grid, read_checkpoint
from vrwkv.models._registry import register_model
from vrwkv.models.low_memory import check_low_memory_support, low_memory_forward_features

__all__ = ["Block", "VRWKV", "checkpoint_filter_fn"]

_logger = logging.getLogger(__name__)


class Block(nn.Module):
    """One VRWKV block: spatial mix (Bi-WKV attention) and channel mix (FFN), each in a residual branch.

    Pre-norm: ``x + DP(g1 * att(ln1(x)))``; res-post-norm (``post_norm=True``): ``x + DP(g1 * ln1(att(x)))``
    (the norm acts on the branch output). Block 0 also normalises the incoming stream with ``ln0``.

    Args:
        dim: channels C.
        layer_id: index of the block (block 0 gets ``ln0``).
        spatial_mix_layer: ``factory(dim, layer_id, device=, dtype=) -> nn.Module`` with ``forward(x, hw)``;
            e.g. ``partial(SpatialMix, depth=12, key_norm=True)``. VRWKV6 passes its own mixer here.
        channel_mix_layer: same for the FFN.
        drop_path: DropPath rate of both branches.
        init_values: layer-scale init (``gamma1``, ``gamma2``); None for no layer scale.
        post_norm: res-post-norm instead of pre-norm.
        norm_layer: norm factory (LayerNorm, eps 1e-5 as the official code).
    """

    def __init__(
        self,
        dim: int,
        layer_id: int,
        spatial_mix_layer: Callable[..., nn.Module],
        channel_mix_layer: Callable[..., nn.Module],
        drop_path: float = 0.0,
        init_values: float | None = None,
        post_norm: bool = False,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.layer_id = layer_id
        self.post_norm = post_norm
        self.ln1 = norm_layer(dim, **dd)
        self.ln2 = norm_layer(dim, **dd)
        self.ln0 = norm_layer(dim, **dd) if layer_id == 0 else None
        self.att = spatial_mix_layer(dim, layer_id, **dd)
        self.ffn = channel_mix_layer(dim, layer_id, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if init_values is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(init_values), **dd))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(init_values), **dd))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: torch.Tensor, hw: tuple[int, int], *, consume_input: bool = False) -> torch.Tensor:
        """Args: x ``[B, T, C]`` tokens, hw the patch grid (H, W). Returns ``[B, T, C]``.

        ``consume_input``: the caller gives ``x`` up (it will not read it again and nothing else holds it). Without
        autograd the block then writes the stream into ``x`` (``ln0`` in block 0, the first residual sum) instead of
        into new tensors: else the input, which the caller holds until the block returns, is alive next to the stream
        through the block, one ``[B, T, C]`` more at the forward's tensor peak (``benchmarks/NOTES.md``, session 15).
        """
        if self.ln0 is not None:
            x = self._ln0(x, consume_input)
        if self.post_norm:
            x = self.residual(x, self.ln1(self.att(x, hw)), self.gamma1, own_x=consume_input)
            return self.residual(x, self.ln2(self.ffn(x, hw)), self.gamma2, own_x=True)
        x = self.residual(x, self._normed(self.att, self.ln1, x, hw), self.gamma1, own_x=consume_input,  # (no name
                          own_branch=not calls_hooks(self.att))  # keeps the branch alive through the FFN)
        if self._ffn_adds_in_place():  # (x is this block's tensor now)
            return self.ffn.add_to(x, x, hw, self.gamma2, norm=self.ln2)  # (ln2(x) freed before the products)
        return self.residual(x, self._normed(self.ffn, self.ln2, x, hw), self.gamma2, own_x=True)

    @staticmethod
    def _normed(mixer: nn.Module, norm: nn.Module, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """``mixer(norm(x), hw)``. Where the mixer takes the norm (``fuses_input_norm``) and no hook can tell, the
        norm runs inside the mixer's shift-mix projections: with autograd these keep x for the backward and not
        ``norm(x)`` too (one ``[B, T, C]`` less per norm in the training graph); without, ``norm(x)`` is freed once
        projected instead of being held by this call (``benchmarks/NOTES.md``, session 15)."""
        if (getattr(mixer, "fuses_input_norm", False) and type(norm) is nn.LayerNorm
                and norm.normalized_shape == (x.shape[-1],) and not calls_hooks(norm) and not calls_hooks(mixer)
                and not (torch.jit.is_tracing() or torch.jit.is_scripting())):  # (export: the norm as a module)
            return mixer(x, hw, norm=norm)
        return mixer(norm(x), hw)

    def _ln0(self, x: torch.Tensor, consume_input: bool) -> torch.Tensor:
        """``ln0(x)``; written over ``x`` (rows at a time, the same values) when the caller gives ``x`` up and no
        autograd, graph capture or hook can see the difference."""
        in_place = (consume_input and not torch.is_grad_enabled() and type(self.ln0) is nn.LayerNorm
                    and not calls_hooks(self.ln0) and x.is_contiguous()
                    and (torch.is_inference_mode_enabled() or not torch.is_inference(x))  # (else no in-place writes)
                    and not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()))
        if not in_place:
            return self.ln0(x)
        rows = x.view(-1, x.shape[-1])  # [B·T, C]
        for start in range(0, rows.shape[0], LN0_ROWS_IN_PLACE):
            chunk = rows[start:start + LN0_ROWS_IN_PLACE]
            chunk.copy_(self.ln0(chunk))
        return x

    def _ffn_adds_in_place(self) -> bool:
        """Inference with the V1 channel mix, called without hooks: it adds its output rows into the residual stream
        chunk by chunk (:meth:`ChannelMix.add_to`), the same arithmetic as the second :meth:`residual`."""
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return False
        if self.training and not isinstance(self.drop_path, nn.Identity):
            return False
        return type(self.ffn).forward is ChannelMix.forward and not calls_hooks(self.ffn)

    def residual(
        self, x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor | None, own_x: bool = False,
        own_branch: bool = False,
    ) -> torch.Tensor:
        """``x + drop_path(gamma * branch)`` in one pass (``torch.addcmul``). Without autograd the sum is written into
        ``x`` if ``own_x`` (``x`` is a tensor of this block, not its input), else into ``branch`` if ``own_branch``
        (no hook may hold it) and it has x's shape and dtype: no new ``[B, T, C]`` tensor, i.e. at high resolution
        fewer fresh pages from the kernel per block (``benchmarks/NOTES.md``)."""
        if self.training and not isinstance(self.drop_path, nn.Identity):
            return x + self.drop_path(_scale(branch, gamma))
        in_place_ok = not torch.is_grad_enabled() and not torch.jit.is_tracing()  # (ONNX export drops such writes)
        if in_place_ok and x.dtype == torch.result_type(x, branch):
            if own_x:
                return x.add_(branch) if gamma is None else x.addcmul_(branch, gamma)
            if own_branch and branch.shape == x.shape and branch.dtype == x.dtype and not _same_storage(x, branch):
                return torch.add(x, branch, out=branch) if gamma is None else torch.addcmul(x, branch, gamma, out=branch)
        return x + branch if gamma is None else torch.addcmul(x, branch, gamma)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _holds_storage_of(output: Any, x: torch.Tensor) -> bool:
    """Whether ``output`` (a tensor, or a list/tuple of them) is or holds a view of ``x``'s storage."""
    if isinstance(output, torch.Tensor):
        return _same_storage(output, x)
    return isinstance(output, (list, tuple)) and any(_holds_storage_of(o, x) for o in output)


def _scale(x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    return x if gamma is None else x * gamma


def _make_head(
    in_dim: int, hidden_dim: int | None, num_classes: int, device: Any = None, dtype: Any = None
) -> nn.Module:
    """Linear classifier, or VRWKV-L's ``Linear(C, hidden) -> Tanh -> Linear(hidden, classes)`` (keys head.0/2)."""
    dd = {"device": device, "dtype": dtype}
    in_last = hidden_dim or in_dim
    last = Linear(in_last, num_classes, **dd) if num_classes > 0 else nn.Identity()
    if hidden_dim is None:
        return last
    return nn.Sequential(Linear(in_dim, hidden_dim, **dd), nn.Tanh(), last)


def _init_linear_and_norm(module: nn.Module) -> None:
    """The mmcls classifier ``init_cfg``: trunc-normal(0.02, bounds +-2) Linears with zero bias; LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


#: Rows per step of block 0's in-place ``ln0`` (:meth:`Block._ln0`): its temporary is one step's output (1.5 MB).
LN0_ROWS_IN_PLACE = 2048
#: The token tensor's size from which the default path's blocks share their inference buffers
#: (:meth:`VRWKV._workspace`): VRWKV-T's [B, T, C] is 3 MB at 1024 px batch 1, 1.2 MB at 224 px batch 8.
WORKSPACE_MIN_TOKEN_BYTES = 2 * 2**20


class VRWKV(nn.Module):
    """Vision-RWKV backbone with a pooled classifier, following timm's model API.

    State-dict names are the official backbone's (``pos_embed``, ``patch_embed.projection.*``, ``layers.{i}.*``,
    final norm ``ln1.*``) plus ``head.*`` (a Linear, or ``head.0``/``head.2`` for the MLP head of VRWKV-L).

    Args:
        img_size: image size that sets the ``pos_embed`` grid (int or (h, w)); any other multiple of the patch size
            works at run time (``pos_embed`` is bicubic-resized on every forward, as in the official code).
        patch_size: patch side.
        in_chans: image channels.
        num_classes: classifier outputs (0: no classifier, ``forward`` returns pooled features).
        global_pool: ``"avg"`` (mean over tokens) or ``""`` (no pooling, the head acts on every token).
        embed_dim: channels C.
        depth: number of blocks.
        hidden_rate: FFN width multiplier.
        drop_rate: dropout after adding ``pos_embed`` (the official ``drop_rate``).
        head_drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, ``linspace(0, drop_path_rate, depth)`` over the blocks.
        init_values: layer-scale init (None: no layer scale).
        post_norm: res-post-norm blocks.
        key_norm: LayerNorm on the WKV output and on the FFN hidden activations.
        shift_mode: ``"q_shift"`` (official), ``"token_shift"`` (1-D RWKV shift, ablation) or ``"none"``.
        shift_pixel: shift distance (0 disables the shift).
        channel_gamma: fraction of channels per Q-Shift direction (<= 1/4).
        wkv_mode: ``"bidirectional"`` or ``"causal"`` (uni-directional RWKV attention, ablation).
        wkv_semantics: ``"official"`` (the official CUDA kernel's function; reproduces the released checkpoints)
            or ``"paper"`` (the paper's Bi-WKV formula).
        init_mode: ``"fancy"`` (official), ``"local"`` or ``"global"`` init of decay/bonus/mix parameters.
        final_norm: LayerNorm ``ln1`` after the last block.
        out_indices: blocks whose outputs :meth:`forward_backbone` returns (official multi-level output;
            negative counts from the end).
        with_cp: gradient checkpointing of every block (same as ``set_grad_checkpointing()``).
        head_hidden_size: hidden width of an MLP head (3072 for VRWKV-L), None for a Linear head.
        dynamic_img_pad: zero-pad inputs whose sides are not multiples of the patch (official 'corner' padding);
            if False they raise a ValueError.
        interpolate_mode: ``pos_embed`` resize mode.
        spatial_mix_layer: override the attention mixer, ``factory(dim, layer_id, device=, dtype=)``.
        channel_mix_layer: override the FFN mixer.
        device: parameter device (e.g. ``"meta"`` to count parameters without allocating).
        dtype: parameter dtype.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: Literal["avg", ""] = "avg",
        embed_dim: int = 256,
        depth: int = 12,
        hidden_rate: int = 4,
        drop_rate: float = 0.0,
        head_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        post_norm: bool = False,
        key_norm: bool = False,
        shift_mode: str = "q_shift",
        shift_pixel: int = 1,
        channel_gamma: float = 0.25,
        wkv_mode: str = "bidirectional",
        wkv_semantics: str = "official",
        init_mode: str = "fancy",
        final_norm: bool = True,
        out_indices: int | Sequence[int] = -1,
        with_cp: bool = False,
        head_hidden_size: int | None = None,
        dynamic_img_pad: bool = False,
        interpolate_mode: str = "bicubic",
        spatial_mix_layer: Callable[..., nn.Module] | None = None,
        channel_mix_layer: Callable[..., nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_hw[0] % patch_size or img_hw[1] % patch_size:
            raise ValueError(f"img_size {img_hw} is not a multiple of patch_size {patch_size}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.head_hidden_size = head_hidden_size or embed_dim
        self.num_prefix_tokens = 0
        self.num_suffix_tokens = 0  # tokens after the patch tokens (VRWKV6's optional cls token goes last)
        self.depth = depth
        self.patch_size = patch_size
        self.grid_size = (img_hw[0] // patch_size, img_hw[1] // patch_size)
        self.interpolate_mode = interpolate_mode
        self.grad_checkpointing = with_cp
        self.low_memory_chunk_tokens: int | None = None  # see set_low_memory
        out_indices = [out_indices] if isinstance(out_indices, int) else list(out_indices)
        self.out_indices = feature_take_indices(depth, out_indices)[0]  # non-negative block indices

        if spatial_mix_layer is None:
            spatial_mix_layer = partial(
                SpatialMix, depth=depth, shift_mode=shift_mode, shift_pixel=shift_pixel,
                channel_gamma=channel_gamma, init_mode=init_mode, key_norm=key_norm, wkv_mode=wkv_mode,
                wkv_semantics=wkv_semantics,
            )  # fmt: skip
        if channel_mix_layer is None:
            channel_mix_layer = partial(
                ChannelMix, depth=depth, hidden_rate=hidden_rate, shift_mode=shift_mode, shift_pixel=shift_pixel,
                channel_gamma=channel_gamma, init_mode=init_mode, key_norm=key_norm,
            )  # fmt: skip

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, dynamic_img_pad=dynamic_img_pad, **dd)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim, **dd))
        self.drop_after_pos = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.layers = nn.ModuleList(
            Block(embed_dim, i, spatial_mix_layer, channel_mix_layer, drop_path=dpr[i], init_values=init_values,
                  post_norm=post_norm, **dd)
            for i in range(depth)
        )  # fmt: skip
        self.ln1 = nn.LayerNorm(embed_dim, **dd) if final_norm else nn.Identity()
        self.head_drop = nn.Dropout(head_drop_rate)
        self.head = _make_head(embed_dim, head_hidden_size, num_classes, **dd)
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"layers.{i}") for i in range(depth)]
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init: zero ``pos_embed``, trunc-normal Linears (incl. head), LayerNorm 1/0; the patch conv keeps
        PyTorch's default and the mixers' decay/bonus/mix parameters keep their ``init_mode`` values."""
        nn.init.zeros_(self.pos_embed)
        self.apply(_init_linear_and_norm)

    # ----------------------------------------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Nothing: the official recipe decays ``pos_embed`` and the 2-/3-D mixer parameters.

        (timm's optimizer factory still exempts 1-D parameters, i.e. norms, biases, ``spatial_decay``,
        ``spatial_first`` and ``gamma*``; the official mmcls recipe decays the last three.)
        """
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^pos_embed|^patch_embed", blocks=[(r"^layers\.(\d+)", None), (r"^ln1", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head[-1] if isinstance(self.head, nn.Sequential) else self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the final classifier layer (an MLP head keeps its hidden layer); 0 removes it."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.pos_embed
        if isinstance(self.head, nn.Sequential):
            self.head[-1] = _make_head(self.head_hidden_size, None, num_classes, ref.device, ref.dtype)
        else:
            self.head = _make_head(self.embed_dim, None, num_classes, ref.device, ref.dtype)
        self.get_classifier().apply(_init_linear_and_norm)

    # ---------------------------------------------------------------------------------------------- forward
    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images ``[B, in_chans, h, w]`` -> tokens ``[B, T, C]`` with position embedding, and the grid (H, W)."""
        x, hw = self.patch_embed(x)  # [B, T, C] view of the conv's [B, C, T]
        pos = self.pos_embed_for(hw)
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            x = x + pos
        else:  # the stream token-major (x + pos would take the conv's layout, which every norm copies first), so
            stream = x.new_empty(x.shape, dtype=torch.result_type(x, pos))  # (x is bfloat16 under autocast)
            x = torch.add(x, pos, out=stream)  # block 0 can normalise it in place (Block._ln0)
        return self.drop_after_pos(x), hw

    def pos_embed_for(self, hw: tuple[int, int]) -> torch.Tensor:
        """``pos_embed`` resized to the patch grid ``hw``: ``[1, H*W, C]`` (computed each call: two small products,
        :func:`~vrwkv.layers.resize_pos_embed`; a kept copy would add ``[1, T, C]`` to the forward's peak)."""
        return resize_pos_embed(self.pos_embed, self.grid_size, hw, self.interpolate_mode)

    def _workspace(self, x: torch.Tensor) -> contextlib.AbstractContextManager:
        """Around the blocks, for their tokens ``x`` ``[B, T, C]``: their inference temporaries share buffers
        (:mod:`vrwkv.layers.workspace`): always with the fused CPU kernels on (:func:`vrwkv.ops.use_numba`), where the
        spatial mix's buffer and the channel mix's hidden activations are one and the forward's peak does not grow; on
        the default path from :data:`WORKSPACE_MIN_TOKEN_BYTES`. Below it the default path's buffers come back from
        the C library's heap without page faults (no measured gain in time), and a buffer kept across blocks added to
        the peak (the block Bi-WKV's temporaries come on top of it: +1.1 MB at 224 px batch 8, +0.75 MB at 512 px
        batch 1, where VRWKV-T's peak is within 1-2 MB of DeiT-T's); from 512 px batch 8 and 1024 px batch 1, the
        fresh pages of those temporaries took 10-20 % of the forward (``benchmarks/NOTES.md``, session 17)."""
        if numba_enabled() or x.numel() * x.element_size() >= WORKSPACE_MIN_TOKEN_BYTES:
            return inference_workspace()
        return contextlib.nullcontext()

    def _block(self, blk: nn.Module, x: torch.Tensor, hw: tuple[int, int], consume_input: bool = False) -> torch.Tensor:
        """``blk(x, hw)``; ``consume_input`` (see :meth:`Block.forward`): the caller replaces ``x`` by the result and
        nothing may have kept ``x`` (no hook on the module that made it, no output holding a view of it)."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(blk, x, hw, use_reentrant=False)
        return blk(x, hw, consume_input=consume_input)

    def set_low_memory(self, enable: bool = True, chunk_tokens: int = 16384) -> None:
        """Low-memory exact inference for very large images (see :mod:`vrwkv.models.low_memory`).

        When enabled, :meth:`forward_features` and :meth:`forward` *without autograd* (``torch.no_grad()`` /
        ``torch.inference_mode()``, model in eval mode) keep only four ``[B, T, C]`` tensors through the blocks:
        per-token work runs on chunks of about ``chunk_tokens`` tokens (whole patch rows), the Bi-WKV on channel
        groups of about the same size, blocks update the token stream in place. Results equal the normal path up to
        float rounding. With autograd enabled the normal path runs (training is unaffected). Measured for VRWKV-T
        (benchmarks/NOTES.md): the forward adds 1.0 GiB to the process at 8192² px (normal path: 2.7 GiB) and
        about 3.9 GiB at 16384² px (1,048,576 tokens; the image itself is 3 GiB).

        Args:
            enable: turn the mode on or off.
            chunk_tokens: tokens per chunk (>= 1); smaller means less memory and more, smaller matmuls.

        Raises:
            ValueError: for a bad ``chunk_tokens`` or a model whose mixers/tokens the low-memory path does not
                implement (VRWKV6, a cls token, custom mixers).

        Example::

            model = vrwkv.create_model("vrwkv_tiny", pretrained=True).eval()
            model.set_low_memory()  # chunks of 16384 tokens
            with torch.inference_mode():
                tokens = model.forward_features(images)  # [B, T, C]
        """
        if enable:
            if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
                raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
            check_low_memory_support(self)
        self.low_memory_chunk_tokens = chunk_tokens if enable else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, in_chans, h, w]`` -> final-normed tokens ``[B, T, C]`` (raster order, ``T = h/p * w/p``)."""
        if self.low_memory_chunk_tokens is not None and not torch.is_grad_enabled():
            return low_memory_forward_features(self, x, self.low_memory_chunk_tokens)
        x, hw = self._embed(x)
        with self._workspace(x):  # (the blocks' inference temporaries share buffers: layers/workspace.py)
            private = not calls_hooks(self.drop_after_pos)  # (whether the next block may write into x)
            for blk in self.layers:
                x, private = self._block(blk, x, hw, private), not calls_hooks(blk)
        return self.ln1(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``[B, T, C]`` -> logits ``[B, num_classes]`` (pooled features ``[B, C]`` if ``pre_logits``;
        for an MLP head, its hidden activations ``[B, head_hidden_size]``)."""
        if self.global_pool == "avg":
            x = x[:, : x.shape[1] - self.num_suffix_tokens].mean(dim=1)  # mean over the patch tokens
        x = self.head_drop(x)
        if isinstance(self.head, nn.Sequential):
            x = self.head[:-1](x)
            return x if pre_logits else self.head[-1](x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, in_chans, h, w]`` -> logits ``[B, num_classes]``."""
        return self.forward_head(self.forward_features(x))

    def forward_backbone(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The official backbone output: maps ``[B, C, H, W]`` of the blocks in ``out_indices``.

        As in the official code the final norm is applied after the last block only, so only that output is
        normalised. Dense-prediction heads use this.
        """
        x, hw = self._embed(x)
        outs = []
        with self._workspace(x):
            private = not calls_hooks(self.drop_after_pos)  # (whether the next block may write into x)
            for i, blk in enumerate(self.layers):
                x = self._block(blk, x, hw, private)
                if i == len(self.layers) - 1:
                    x = self.ln1(x)
                private = not calls_hooks(blk)
                if i in self.out_indices:
                    outs.append(self._backbone_output(x, hw))
                    private = private and not _holds_storage_of(outs[-1], x)
        return tuple(outs)

    def _backbone_output(self, x: torch.Tensor, hw: tuple[int, int]) -> Any:
        """One entry of :meth:`forward_backbone`: the map ``[B, C, H, W]`` of a block's output tokens."""
        return self._to_map(x, hw)

    def _to_map(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Tokens ``[B, H * W (+ suffix tokens), C]`` -> patch map ``[B, C, H, W]`` (suffix tokens dropped)."""
        H, W = hw
        return x[:, : H * W].reshape(x.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous()

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's intermediate-feature API.

        Args:
            x: images ``[B, in_chans, h, w]``.
            indices: last n blocks if int, all if None, else these block indices (negative from the end).
            norm: apply the final norm to every intermediate (timm semantics; see :meth:`forward_backbone` for the
                official one).
            stop_early: stop after the last requested block.
            output_fmt: ``"NCHW"`` (maps ``[B, C, H, W]``) or ``"NLC"`` (tokens ``[B, T, C]``).
            intermediates_only: return only the intermediates.

        Returns:
            The intermediates, or ``(final-normed tokens [B, T, C], intermediates)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        x, hw = self._embed(x)
        blocks = self.layers[: max_index + 1] if stop_early else self.layers
        intermediates = []
        with self._workspace(x):
            private = not calls_hooks(self.drop_after_pos)  # (whether the next block may write into x)
            for i, blk in enumerate(blocks):
                x = self._block(blk, x, hw, private)
                private = not calls_hooks(blk)
                if i in take_indices:
                    y = self.ln1(x) if norm else x
                    intermediates.append(self._to_map(y, hw) if output_fmt == "NCHW" else y)
                    private = private and not _holds_storage_of(intermediates[-1], x)
        if intermediates_only:
            return intermediates
        return self.ln1(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm / the head); returns the indices kept."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        self.out_indices = [i for i in self.out_indices if i <= max_index]
        if prune_norm:
            self.ln1 = nn.Identity()
        if prune_head:
            self.head = nn.Identity()
            self.num_classes = 0
        return take_indices

    # ------------------------------------------------------------------------------------------- checkpoints
    def load_pretrained(self, checkpoint_path: str | Path, use_ema: bool = False) -> None:
        """Load an official (mmcls / InternImage), plain or vrwkv-safetensors checkpoint into this model.

        Keys are converted, ``pos_embed`` is resized to this model's grid, and a classifier whose class count
        differs from this model's is dropped (the model keeps its fresh head). Called by timm for
        ``pretrained=True`` (the cfgs set ``custom_load``), e.g. ``pretrained_cfg_overlay=dict(file=...)``.

        Raises:
            ValueError: listing missing / unexpected keys and shape mismatches if the file does not fit.
        """
        ckpt = read_checkpoint(checkpoint_path, use_ema=use_ema)
        state_dict = checkpoint_filter_fn(ckpt.state_dict, self, metadata=ckpt.metadata)
        dropped = _drop_mismatched_classifier(state_dict, self)
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict and k not in dropped]
        unexpected = [k for k in state_dict if k not in own]
        mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                      for k, v in state_dict.items() if k in own and v.shape != own[k].shape]  # fmt: skip
        if missing or unexpected or mismatched:
            raise ValueError(
                f"{checkpoint_path} does not fit this model ({type(self).__name__}, embed_dim {self.embed_dim}, "
                f"depth {len(self.layers)}):" + _list("missing keys", missing) + _list("unexpected keys", unexpected)
                + _list("shape mismatches", mismatched)
            )  # fmt: skip
        self.load_state_dict(state_dict, strict=not dropped)
        _logger.info("loaded %s (%s, %d tensors)", checkpoint_path, ckpt.container, len(state_dict))


def _list(title: str, items: list[str], limit: int = 10) -> str:
    if not items:
        return ""
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:limit]) + more


def _drop_mismatched_classifier(state_dict: dict[str, torch.Tensor], model: VRWKV) -> list[str]:
    """Remove the checkpoint's final classifier if the model's has another class count (or none); returns the
    model keys left to their fresh init."""
    prefix = "head.2." if isinstance(model.head, nn.Sequential) else "head."
    weight = state_dict.get(prefix + "weight")
    if weight is None or weight.ndim != 2:
        return []
    if model.num_classes == weight.shape[0]:
        return []
    for k in (prefix + "weight", prefix + "bias"):
        state_dict.pop(k, None)
    _logger.info("checkpoint classifier (%d classes) dropped for a model with %d", weight.shape[0], model.num_classes)
    return [k for k in model.state_dict() if k.startswith(prefix)]


def checkpoint_filter_fn(
    state_dict: dict[str, torch.Tensor], model: VRWKV, metadata: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Convert an official or plain state dict to this model's names and ``pos_embed`` grid (timm filter_fn).

    ``backbone.`` / ``module.`` prefixes are stripped, ``head.fc.*`` becomes ``head.*``, and ``pos_embed`` is
    bicubic-resized to ``model.grid_size`` if its grid differs (square grids are assumed unless ``metadata``
    from our safetensors says otherwise).
    """
    state_dict, layout = convert_state_dict(state_dict)
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.ndim == 3:
        src = pos_embed_grid(pos.shape[1], metadata, model.grid_size)
        if src != tuple(model.grid_size):
            _logger.info("resizing pos_embed from %s to %s", src, model.grid_size)
            state_dict["pos_embed"] = resize_pos_embed(pos, src, model.grid_size, model.interpolate_mode)
    _logger.debug("checkpoint layout: %s", layout)
    return state_dict


# -------------------------------------------------------------------------------------------------- cfgs
_HF = "https://huggingface.co/OpenGVLab/Vision-RWKV/resolve/main/"


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,  # official test pipeline: resize the short side to 256, center crop 224
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,  # mmcls (123.675, 116.28, 103.53) / 255
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.projection",
        "classifier": "head",
        "custom_load": True,  # timm calls VRWKV.load_pretrained (official layouts, yacs configs, pos_embed resize)
        "license": "apache-2.0",
        "paper_ids": "arXiv:2403.02308",
        "origin_url": "https://github.com/OpenGVLab/Vision-RWKV",
        **kwargs,
    }


# URLs are the file names of the HuggingFace repo OpenGVLab/Vision-RWKV as listed in the official README
# (not reachable from the machine this was written on).
default_cfgs = generate_default_cfgs({
    "vrwkv_tiny.in1k": _cfg(url=_HF + "vrwkv_t_in1k_224.pth"),
    "vrwkv_small.in1k": _cfg(url=_HF + "vrwkv_s_in1k_224.pth"),
    "vrwkv_base.in1k": _cfg(url=_HF + "vrwkv_b_in1k_224.pth"),
    "vrwkv_large.in22k_ft_in1k": _cfg(
        url=_HF + "vrwkv_l_22kto1k_384.pth", input_size=(3, 384, 384), classifier="head.2"),
    "vrwkv_large.in22k": _cfg(
        url=_HF + "vrwkv_l_in22k_192.pth", num_classes=21841, input_size=(3, 192, 192), classifier="head.2"),
    "test_vrwkv.untrained": _cfg(input_size=(3, 64, 64)),
    "test_vrwkv2.untrained": _cfg(input_size=(3, 64, 64), classifier="head.2"),
})  # fmt: skip


def _feature_indices(depth: int) -> tuple[int, ...]:
    """Default features_only blocks: the ends of four equal stages (2, 5, 8, 11 for 12 blocks)."""
    return tuple(sorted({max(0, depth * (k + 1) // 4 - 1) for k in range(4)}))


def _create_vrwkv(variant: str, pretrained: bool = False, model_cls: type[VRWKV] | None = None, **kwargs: Any) -> VRWKV:
    """Build ``variant`` with timm's builder; ``model_cls`` is a VRWKV subclass (VRWKV6) or None for VRWKV."""
    depth = kwargs.get("depth", 12)
    overlay = kwargs.get("pretrained_cfg_overlay")
    if overlay and any(overlay.get(k) for k in ("file", "url")):
        # timm resets custom_load when the overlay names a new file/url; our loader is what reads official formats
        kwargs["pretrained_cfg_overlay"] = {"custom_load": True, **overlay}
    return build_model_with_cfg(
        model_cls or VRWKV,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=_feature_indices(depth), feature_cls="getter"),
        **kwargs,
    )


# ---------------------------------------------------------------------------------------- registered sizes
@register_model
def vrwkv_tiny(pretrained: bool = False, **kwargs: Any) -> VRWKV:
    """VRWKV-T: 192 x 12, pre-norm, no layer scale (6.2M params). Official recipe: drop_path_rate 0."""
    model_args = dict(embed_dim=192, depth=12, patch_size=16, img_size=224)
    return _create_vrwkv("vrwkv_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vrwkv_small(pretrained: bool = False, **kwargs: Any) -> VRWKV:
    """VRWKV-S: 384 x 12, res-post-norm, layer scale 1.0 (23.8M params). Official recipe: drop_path_rate 0.3."""
    model_args = dict(embed_dim=384, depth=12, patch_size=16, img_size=224, post_norm=True, init_values=1.0)
    return _create_vrwkv("vrwkv_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vrwkv_base(pretrained: bool = False, **kwargs: Any) -> VRWKV:
    """VRWKV-B: 768 x 12, res-post-norm, layer scale 1e-5 (93.6M params). Official recipe: drop_path_rate 0.5."""
    model_args = dict(embed_dim=768, depth=12, patch_size=16, img_size=224, post_norm=True, init_values=1e-5)
    return _create_vrwkv("vrwkv_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vrwkv_large(pretrained: bool = False, **kwargs: Any) -> VRWKV:
    """VRWKV-L: 1024 x 24, res-post-norm, layer scale 1e-5, key_norm, Tanh MLP head 1024 -> 3072 -> classes,
    12x12 ``pos_embed`` grid (img_size 192) run at 384 (334.9M params). Official IN-1k fine-tune: drop_path 0.1."""
    model_args = dict(
        embed_dim=1024, depth=24, patch_size=16, img_size=192, post_norm=True, init_values=1e-5, key_norm=True,
        head_hidden_size=3072,
    )  # fmt: skip
    return _create_vrwkv("vrwkv_large", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_vrwkv(pretrained: bool = False, **kwargs: Any) -> VRWKV:
    """Tiny test variant (64 x 2, 4x4 grid at 64 px), VRWKV-T options."""
    model_args = dict(embed_dim=64, depth=2, patch_size=16, img_size=64)
    return _create_vrwkv("test_vrwkv", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_vrwkv2(pretrained: bool = False, **kwargs: Any) -> VRWKV:
    """Tiny test variant with every VRWKV-L option: post-norm, layer scale, key_norm, Tanh MLP head."""
    model_args = dict(
        embed_dim=64, depth=3, patch_size=16, img_size=64, post_norm=True, init_values=1e-5, key_norm=True,
        head_hidden_size=96,
    )  # fmt: skip
    return _create_vrwkv("test_vrwkv2", pretrained=pretrained, **dict(model_args, **kwargs))
