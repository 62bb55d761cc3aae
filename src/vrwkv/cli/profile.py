"""``vrwkv profile MODEL --size S``: where one forward's (or training step's) time goes, by operator category."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="registered model name: ours (e.g. vrwkv_tiny) or a timm ViT (e.g. deit_tiny_patch16_224)")
    p.add_argument("--size", type=int, nargs="+", metavar="S", default=[1024], help="input size: S or H W")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--train", action="store_true", help="a training step (forward, loss, backward, SGD step)")
    p.add_argument("--numba", action="store_true", help="the fused numba CPU kernels on (vrwkv.ops.use_numba)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--top", type=int, default=12, help="operators listed (by own time)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the breakdown as JSON")
    from vrwkv.cli._model_options import add_model_options

    add_model_options(p, checkpoint=False)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    import torch

    from vrwkv.bench.profile import format_breakdown, profile_model
    from vrwkv.bench.runner import is_ours
    from vrwkv.cli import CLIError
    from vrwkv.cli._model_options import build_model, parse_kwargs

    if len(args.size) not in (1, 2) or min(args.size) < 16:
        raise CLIError(f"--size takes S or H W, each >= 16; got {args.size}")
    if args.batch < 1 or args.top < 0 or (args.threads is not None and args.threads < 1):
        raise CLIError("--batch and --threads must be >= 1, --top >= 0")
    size = tuple(args.size) * (3 - len(args.size))
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = parse_kwargs(args.model_kwargs)
    if is_ours(args.model):
        model = build_model(args.model, kwargs=kwargs)
    else:
        import timm

        try:
            model = timm.create_model(args.model, img_size=size, dynamic_img_size=True, **kwargs)
        except (RuntimeError, TypeError, ValueError) as e:
            raise CLIError(f"cannot build {args.model}: {' '.join(str(e).split())}") from None
    import contextlib

    from vrwkv.ops.wkv.fused_cpu import numba_scans

    with numba_scans() if args.numba else contextlib.nullcontext():  # (else: the default, or VRWKV_NUMBA's)
        breakdown = profile_model(model, args.model + ("+numba" if args.numba else ""), size, args.batch,
                                  "train" if args.train else "infer")
    print(format_breakdown(breakdown, top=args.top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(breakdown), f, indent=1)
    return 0
