"""Convert an official (or plain) checkpoint file to our safetensors format (``vrwkv convert``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vrwkv.models._checkpoint import convert_state_dict, pos_embed_grid, read_checkpoint, save_safetensors

#: Keys every Vision-RWKV backbone (V1 or V6) has after conversion.
REQUIRED_KEYS = ("pos_embed", "patch_embed.projection.weight")


@dataclass
class ConversionReport:
    """What :func:`convert_checkpoint` wrote."""

    num_tensors: int
    num_params: int
    layout: str
    container: str
    grid: tuple[int, int]
    model_name: str | None


def convert_checkpoint(
    src: str | Path, dst: str | Path, model_name: str | None = None, use_ema: bool = False
) -> ConversionReport:
    """Read ``src`` (mmcls / InternImage ``.pth``, plain state dict, or ours), rename the keys to ours and write a
    safetensors file whose metadata records the source layout and the ``pos_embed`` grid.

    Args:
        src: checkpoint file.
        dst: output ``.safetensors`` path (its directory must exist).
        model_name: if given, load the weights into this registered model first (strictly; num_classes and the
            ``pos_embed`` grid are taken from the checkpoint) so that a file that does not fit is rejected.
        use_ema: convert the EMA weights of a training checkpoint.

    Raises:
        FileNotFoundError: ``src`` missing or ``dst``'s directory missing.
        ValueError: not a Vision-RWKV checkpoint, or (with ``model_name``) it does not fit that model.
    """
    dst = Path(dst)
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {dst.parent}")
    ckpt = read_checkpoint(src, use_ema=use_ema)
    state_dict, layout = convert_state_dict(ckpt.state_dict)
    missing = [k for k in REQUIRED_KEYS if k not in state_dict]
    if missing:
        some = ", ".join(list(state_dict)[:5])
        raise ValueError(f"{src}: not a Vision-RWKV checkpoint: no {', '.join(missing)} (keys: {some}, ...)")
    pos, proj = state_dict["pos_embed"], state_dict["patch_embed.projection.weight"]
    grid = pos_embed_grid(pos.shape[1], ckpt.metadata)
    if model_name is not None:
        state_dict = _through_model(src, model_name, state_dict, grid, proj.shape[-1], use_ema)
    metadata = {
        "source_file": Path(src).name,
        "source_layout": layout,
        "source_container": ckpt.container,
        "pos_embed_grid": f"{grid[0]}x{grid[1]}",
    }
    if model_name is not None:
        metadata["arch"] = model_name
    save_safetensors(state_dict, dst, metadata)
    return ConversionReport(
        num_tensors=len(state_dict),
        num_params=sum(v.numel() for v in state_dict.values()),
        layout=layout,
        container=ckpt.container,
        grid=grid,
        model_name=model_name,
    )


def _num_classes(state_dict: dict) -> int:
    for key in ("head.2.weight", "head.weight"):
        if key in state_dict:
            return state_dict[key].shape[0]
    return 0


def _through_model(src, model_name, state_dict, grid, patch_size, use_ema) -> dict:
    """Load ``src`` into ``model_name`` built with the checkpoint's class count and grid; return its state dict."""
    from vrwkv.models._factory import create_model

    img_size = (grid[0] * patch_size, grid[1] * patch_size)
    model = create_model(model_name, num_classes=_num_classes(state_dict), img_size=img_size, patch_size=patch_size)
    model.load_pretrained(src, use_ema=use_ema)
    return model.state_dict()
