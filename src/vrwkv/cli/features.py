"""``vrwkv features IMAGE_DIR OUT``: pooled embeddings of every image of a folder, with the file list."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image_dir", metavar="IMAGE_DIR", help="image folder (searched recursively, sorted by path)")
    p.add_argument("output", metavar="OUT", help="output file (.safetensors or .npz)")
    p.add_argument("--model", default="vrwkv_tiny", help="registered model name (default: vrwkv_tiny)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--format", choices=["safetensors", "npz"], default=None,
                   help="default: from the suffix of OUT (.npz -> npz, else safetensors)")
    p.add_argument("--img-size", type=int, default=None, help="crop size (default: the model's input size)")
    p.add_argument("--on-bad-image", choices=["skip", "error"], default="skip",
                   help="undecodable files: skip them (listed at the end) or stop at the first (default: skip)")
    p.add_argument("--workers", type=int, default=0, help="image decoding processes (default: 0)")
    p.add_argument("--device", help="torch device (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--low-memory", action="store_true",
                   help="exact low-memory inference for very large images (VRWKV: token chunks, Bi-WKV on channel "
                        "groups; see model.set_low_memory)")
    from vrwkv.cli._model_options import add_model_options

    add_model_options(p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vrwkv.cli import CLIError
    from vrwkv.cli._common import setup_logging
    from vrwkv.cli._model_options import build_model, native_size, parse_kwargs
    from vrwkv.data import BadImageError
    from vrwkv.tools import features

    setup_logging()
    if args.batch_size < 1 or args.workers < 0:
        raise CLIError("--batch-size must be >= 1 and --workers >= 0")
    if not Path(args.output).resolve().parent.is_dir():
        raise CLIError(f"output directory {Path(args.output).parent} does not exist")
    try:
        files = features.list_images(args.image_dir)
    except ValueError as e:
        raise CLIError(str(e)) from None
    model = build_model(args.model, args.checkpoint, parse_kwargs(args.model_kwargs), device=args.device)
    if args.low_memory:
        if not hasattr(model, "set_low_memory"):
            raise CLIError(f"--low-memory: {args.model} has no low-memory mode (VRWKV models do)")
        try:
            model.set_low_memory()
        except ValueError as e:
            raise CLIError(f"--low-memory: {e}") from None
    transform = features.eval_transform(model, args.img_size)
    try:
        result = features.extract_features(model, files, transform, batch_size=args.batch_size,
                                           on_bad_image=args.on_bad_image, workers=args.workers,
                                           progress=not args.no_progress)
    except BadImageError as e:
        raise CLIError(f"{e} (use --on-bad-image skip to leave such files out)") from None
    except ValueError as e:
        raise CLIError(str(e)) from None
    size = args.img_size or native_size(model)[0]
    meta = {"model": args.model, "checkpoint": args.checkpoint or "", "img_size": str(size),
            "pooling": "mean of the final-normed patch tokens", "root": str(Path(args.image_dir).resolve())}
    path = features.save_features(result, args.output, args.format, root=args.image_dir, metadata=meta)
    n, dim = result.features.shape
    print(f"wrote {path}: {n} embeddings of dimension {dim} ({args.model}, {size}x{size})")
    if result.bad:
        print(f"skipped {len(result.bad)} bad image(s): " + ", ".join(f for f, _ in result.bad))
    return 0
