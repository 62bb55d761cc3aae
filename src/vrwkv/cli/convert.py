"""``vrwkv convert IN OUT``: an official Vision-RWKV checkpoint (mmcls / InternImage ``.pth``, plain state dict) to
a safetensors file with our key names (loadable with ``vrwkv.create_model(name, checkpoint_path=OUT)``)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="IN", help="checkpoint file (.pth/.pt/.safetensors)")
    p.add_argument("dst", metavar="OUT", help="output .safetensors file")
    p.add_argument("--model", default=None, help="registered model to validate the weights against (e.g. vrwkv_tiny)")
    p.add_argument("--ema", action="store_true", help="convert the EMA weights of a training checkpoint")


def run(args: argparse.Namespace) -> int:
    from vrwkv.cli import CLIError
    from vrwkv.models import is_model, list_models
    from vrwkv.models._convert import convert_checkpoint

    if args.model is not None and not is_model(args.model):
        raise CLIError(f"unknown model {args.model!r}; available: {', '.join(list_models())}")
    try:
        report = convert_checkpoint(args.src, args.dst, model_name=args.model, use_ema=args.ema)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(" ".join(str(e).split())) from None  # one line
    checked = f", checked against {report.model_name}" if report.model_name else ""
    print(f"wrote {args.dst}: {report.num_tensors} tensors, {report.num_params:,} values from a {report.layout} "
          f"checkpoint ({report.container}), pos_embed grid {report.grid[0]}x{report.grid[1]}{checked}")
    return 0
