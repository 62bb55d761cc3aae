"""``vrwkv eval``: top-1 / top-5 / loss / throughput of a checkpoint (ours or official) on a data set."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run folder (uses best.pt, else last.pt), one of our checkpoints, "
                                      "or an official checkpoint (then --model is required)")
    p.add_argument("--model", help="model name for official / foreign checkpoints")
    p.add_argument("--data", help="'digits' or an ImageFolder root (default: the run's data set)")
    p.add_argument("--split", help="split folder to evaluate (default: val)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", help="torch device (default: cuda if available, else mps, else cpu)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's; 1 is faster on a busy machine)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a run checkpoint")
    p.add_argument("--on-bad-image", choices=["skip", "error"], default="error")


def resolve_checkpoint(path: str) -> str:
    """A run folder → its best.pt (else last.pt); a file → itself."""
    from pathlib import Path

    from vrwkv.cli import CLIError

    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return str(p / name)
        raise CLIError(f"{p} holds no best.pt or last.pt")
    if not p.is_file():
        raise CLIError(f"checkpoint {p} does not exist")
    return str(p)


def run(args: argparse.Namespace) -> int:
    from vrwkv.cli import CLIError
    from vrwkv.cli._common import setup_logging, user_errors

    setup_logging()
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    with user_errors():
        from vrwkv.engine import classification
        from vrwkv.engine.distributed import default_device

        ckpt = resolve_checkpoint(args.checkpoint)
        device = args.device or default_device()
        clf = classification.load_classifier(ckpt, args.model, ema=args.ema, device=device)
        m = classification.evaluate(clf, args.data, split=args.split, batch_size=args.batch_size,
                                    workers=args.workers, on_bad_image=args.on_bad_image, amp=args.amp,
                                    progress=True)
    print(f"{clf.name} ({ckpt}) on {args.data or clf.data.dataset}: top-1 {m['top1']:.2f}% | top-5 {m['top5']:.2f}% "
          f"| loss {m['loss']:.4f} | {m['count']} images | {m['img_per_s_model']:.0f} img/s model, "
          f"{m['img_per_s_total']:.0f} img/s end to end" + (f" | {m['bad_images']} bad images skipped"
                                                            if m["bad_images"] else ""))
    return 0
