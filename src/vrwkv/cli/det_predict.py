"""``vrwkv det-predict``: detect objects in an image; writes it with masks, boxes, labels and scores drawn."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="image file (any format Pillow reads)")
    p.add_argument("--checkpoint", required=True, help="a det-train run's last.pt / best.pt")
    p.add_argument("--out", default="detections.png", help="output PNG (default: detections.png)")
    p.add_argument("--score-thresh", type=float, default=0.5, help="draw detections scoring at least this")
    p.add_argument("--scale", type=int, default=1, help="enlarge the drawing this many times (small images)")
    p.add_argument("--device")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's; 1 is faster on a busy machine)")


def run(args: argparse.Namespace) -> int:
    from vrwkv.cli._common import setup_logging, user_errors

    setup_logging()
    with user_errors():
        from vrwkv.cli._run_options import set_threads
        from vrwkv.data.image_folder import BadImageError
        from vrwkv.engine import detection
        from vrwkv.engine.distributed import default_device

        set_threads(args.threads)

        det = detection.load_detector(args.checkpoint, device=args.device or default_device())
        try:
            found = detection.predict(det, args.image, args.out, score_thresh=args.score_thresh, scale=args.scale)
        except BadImageError as e:
            raise ValueError(str(e)) from None
    lines = [f"{d['label']} {d['score']:.2f} box {d['box']}" for d in found]
    print(f"{args.image}: {len(found)} detection(s) with score >= {args.score_thresh}"
          + "".join(f"\n  {line}" for line in lines) + f"\nwritten {args.out}")
    return 0
