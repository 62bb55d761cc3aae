"""``vrwkv flops MODEL --img-size H W``: parameters, MACs and FLOPs per module type (counted, not run)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="registered model name (e.g. vrwkv_tiny, vrwkv6_base)")
    p.add_argument("--img-size", type=int, nargs="+", metavar="S", default=None,
                   help="input size: S or H W (default: the model's pretrained input size)")
    from vrwkv.cli._model_options import add_model_options

    add_model_options(p, checkpoint=False)


def run(args: argparse.Namespace) -> int:
    from vrwkv.cli import CLIError
    from vrwkv.cli._model_options import build_model, native_size, parse_kwargs
    from vrwkv.tools.flops import count_flops, format_report

    kwargs = parse_kwargs(args.model_kwargs)
    # on the meta device: shapes only, so even VRWKV-L costs no memory and no time
    model = build_model(args.model, kwargs={**kwargs, "device": "meta"})
    if args.img_size is None:
        size = native_size(model)
    elif len(args.img_size) in (1, 2):
        size = tuple(args.img_size) * (3 - len(args.img_size))
    else:
        raise CLIError(f"--img-size takes S or H W, got {len(args.img_size)} values")
    try:
        report = count_flops(model, size)
    except ValueError as e:
        raise CLIError(" ".join(str(e).split())) from None
    print(format_report(report, args.model))
    return 0
