"""``vrwkv erf MODEL``: effective receptive field heat maps (one panel per model variant) to a PNG."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="registered model name (e.g. vrwkv_tiny)")
    p.add_argument("--img-size", type=int, default=None, help="square input side (default: the model's input size)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", metavar="DIR", help="image folder (recursive); default: random crops of "
                                                     "scikit-learn's bundled photos")
    src.add_argument("--num-images", type=int, default=16, help="number of random photo crops (default: 16)")
    p.add_argument("--max-images", type=int, default=None, help="with --images: use at most this many")
    p.add_argument("--compare", nargs="+", default=[], metavar="VARIANT",
                   help="model variants side by side, comma-separated; a variant is KEY=VALUE[+KEY=VALUE...], e.g. "
                        "wkv_mode=bidirectional,wkv_mode=causal or shift_mode=q_shift,shift_mode=none")
    p.add_argument("--output", default="erf.png", help="output PNG (default: erf.png)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the photo crops (and of random model weights)")
    p.add_argument("--device", help="torch device (default: cpu)")
    from vrwkv.cli._model_options import add_model_options

    add_model_options(p)


def parse_variants(items: list[str]) -> list[tuple[str, dict]]:
    """``["a=1,a=2", "b=x+c=3"]`` -> ``[("a=1", {"a": 1}), ("a=2", {"a": 2}), ("b=x+c=3", {"b": "x", "c": 3})]``."""
    from vrwkv.cli._model_options import parse_kwargs

    variants = []
    for item in items:
        for spec in filter(None, (s.strip() for s in item.split(","))):
            variants.append((spec, parse_kwargs(spec.split("+"), what="--compare")))
    return variants


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from vrwkv.cli import CLIError
    from vrwkv.cli._common import setup_logging
    from vrwkv.cli._model_options import build_model, native_size, parse_kwargs
    from vrwkv.tools import erf

    setup_logging()
    if args.batch_size < 1 or args.num_images < 1:
        raise CLIError("--batch-size and --num-images must be >= 1")
    if not Path(args.output).resolve().parent.is_dir():
        raise CLIError(f"output directory {Path(args.output).parent} does not exist")
    base = parse_kwargs(args.model_kwargs)
    variants = parse_variants(args.compare) or [(args.model, {})]
    maps = {}
    for label, kwargs in variants:
        torch.manual_seed(args.seed)  # same random weights for every variant without a checkpoint
        model = build_model(args.model, args.checkpoint, {**base, **kwargs}, device=args.device)
        size = args.img_size or native_size(model)[0]
        if not maps:  # the same images for every variant
            try:
                if args.images:
                    images, files = erf.folder_images(args.images, size, args.max_images)
                    source = f"{len(files)} images of {args.images}"
                else:
                    images = erf.sample_photos(args.num_images, size, args.seed)
                    source = f"{args.num_images} random crops of scikit-learn's sample photos"
            except ValueError as e:
                raise CLIError(str(e)) from None
        param = next(model.parameters())
        x = erf.normalize_images(images, model).to(device=param.device, dtype=param.dtype)
        try:
            maps[label] = erf.erf_map(model, x, batch_size=args.batch_size)
        except ValueError as e:
            raise CLIError(" ".join(str(e).split())) from None
        ratios = erf.erf_area_ratios(maps[label], model.patch_size)
        print(f"{label}: area holding " + ", ".join(f"{t:.0%} of the gradient: {r:.2%}" for t, r in ratios.items())
              + " of the image")
    weights = f" ({Path(args.checkpoint).name})" if args.checkpoint else " (random init)"
    title = f"ERF of the centre token: {args.model}{weights}, {size}x{size}, {source}"
    path = erf.plot_erf(maps, args.output, title=title, patch_size=model.patch_size)
    print(f"wrote {path}")
    return 0
