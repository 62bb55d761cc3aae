"""``vrwkv predict IMAGE...``: top-k classes with probabilities."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--checkpoint", help="run folder or checkpoint file (ours, or official with --model)")
    p.add_argument("--model", help="model name (for official checkpoints, or a model with built-in weights)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--device", help="torch device (default: cuda if available, else mps, else cpu)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's; 1 is faster on a busy machine)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a run checkpoint")


def run(args: argparse.Namespace) -> int:
    from vrwkv.cli import CLIError
    from vrwkv.cli._common import setup_logging, user_errors

    setup_logging()
    if args.checkpoint is None and args.model is None:
        raise CLIError("give --checkpoint (a run folder or checkpoint file) and/or --model")
    if args.topk < 1:
        raise CLIError(f"--topk must be >= 1, got {args.topk}")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    with user_errors():
        from vrwkv.cli.eval import resolve_checkpoint
        from vrwkv.engine import classification
        from vrwkv.engine.distributed import default_device

        ckpt = resolve_checkpoint(args.checkpoint) if args.checkpoint else None
        clf = classification.load_classifier(ckpt, args.model, ema=args.ema, device=args.device or default_device())
        results = classification.predict(clf, args.images, topk=args.topk)
    for path, top in zip(args.images, results):
        print(path)
        for name, prob in top:
            print(f"  {prob:7.2%}  {name}")
    return 0
