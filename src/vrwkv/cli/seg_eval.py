"""``vrwkv seg-eval``: mIoU / aAcc / mAcc of a segmentation checkpoint (whole image or sliding window)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a seg-train run's last.pt/best.pt, or an official mmseg checkpoint (+ --preset)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for an official checkpoint")
    p.add_argument("--preset", default=None, help="preset describing an official checkpoint's model and data")
    p.add_argument("--data", help="'digit_scenes' or an ADE20K-layout root (default: the run's)")
    p.add_argument("--slide", type=int, metavar="CROP", help="sliding-window inference with this crop size")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: 2/3 of the crop, as 512/341)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--device")
    p.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"], default="none")


def run(args: argparse.Namespace) -> int:
    from vrwkv.cli._common import setup_logging, user_errors

    setup_logging()
    with user_errors():
        from vrwkv.engine import segmentation
        from vrwkv.engine.distributed import default_device

        cfg = segmentation.make_config(args.preset, list(args.overrides)) if args.preset else None
        seg = segmentation.load_segmentor(args.checkpoint, cfg=cfg, ema=args.ema, device=args.device or default_device())
        stride = args.stride or (max(1, round(args.slide * 2 / 3)) if args.slide else None)
        m = segmentation.evaluate(seg, args.data, slide_crop=args.slide, slide_stride=stride,
                                  batch_size=args.batch_size, amp=args.amp)
    print(f"mIoU {m['mIoU']:.2f}% aAcc {m['aAcc']:.2f}% mAcc {m['mAcc']:.2f}% loss {m['loss']:.4f} | "
          f"{m['count']} images, {m['img_per_s_model']:.1f} img/s")
    return 0
