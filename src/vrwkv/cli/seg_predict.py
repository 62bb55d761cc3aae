"""``vrwkv seg-predict``: segment an image, writing a colour mask PNG and an overlay."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="image file (any format Pillow reads)")
    p.add_argument("--checkpoint", required=True, help="a seg-train run's last.pt / best.pt")
    p.add_argument("--out", default="mask.png", help="colour mask PNG (default: mask.png)")
    p.add_argument("--overlay", help="blended image PNG (default: <out>_overlay.png; 'none' to skip)")
    p.add_argument("--slide", type=int, metavar="CROP", help="sliding-window inference with this crop size")
    p.add_argument("--stride", type=int)
    p.add_argument("--device")


def run(args: argparse.Namespace) -> int:
    from vrwkv.cli._common import setup_logging, user_errors

    setup_logging()
    with user_errors():
        from pathlib import Path

        from vrwkv.data.image_folder import BadImageError
        from vrwkv.engine import segmentation
        from vrwkv.engine.distributed import default_device

        out = Path(args.out)
        overlay = None if args.overlay == "none" else Path(args.overlay or out.with_name(f"{out.stem}_overlay.png"))
        seg = segmentation.load_segmentor(args.checkpoint, device=args.device or default_device())
        try:
            result = segmentation.predict(seg, args.image, out, overlay, slide_crop=args.slide,
                                          slide_stride=args.stride)
        except BadImageError as e:
            raise ValueError(str(e)) from None
    shares = ", ".join(f"{name} {100 * frac:.1f}%" for name, frac in result["classes"].items())
    print(f"{args.image}: {shares}\nmask {result['mask']}" + (f", overlay {result['overlay']}" if overlay else ""))
    return 0
