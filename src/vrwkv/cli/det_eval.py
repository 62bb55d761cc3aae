"""``vrwkv det-eval``: COCO box / mask AP (AP, AP50, AP75, by size) of a det-train checkpoint."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a det-train run's last.pt / best.pt")
    p.add_argument("--data", help="'digit_scenes' or a COCO root laid out as the run's config (default: the run's)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--device")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's; 1 is faster on a busy machine)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"], default="none")


def run(args: argparse.Namespace) -> int:
    from vrwkv.cli._common import setup_logging, user_errors

    setup_logging()
    with user_errors():
        from vrwkv.cli._run_options import set_threads
        from vrwkv.engine import detection
        from vrwkv.engine.distributed import default_device

        set_threads(args.threads)
        det = detection.load_detector(args.checkpoint, ema=args.ema, device=args.device or default_device())
        m = detection.evaluate(det, args.data, batch_size=args.batch_size, amp=args.amp)

    def fmt(kind: str) -> str:
        return " ".join(f"{name} {m[f'{kind}_{name}']:.2f}" for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"))

    print(f"box  {fmt('box')}\nmask {fmt('mask')}\n{m['count']} images, {m['detections']} detections, "
          f"{m['img_per_s_model']:.1f} img/s")
    return 0
