"""The ``vrwkv`` command. Each subcommand is a module of this package with ``add_parser`` and ``run``;
modules are imported only when their subcommand runs, so ``vrwkv --help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("vrwkv.cli.demo", "build a model and run it on a bundled photo at two resolutions"),
    "convert": ("vrwkv.cli.convert", "official checkpoint (.pth) -> safetensors with vrwkv key names"),
    "train": ("vrwkv.cli.train", "train a classifier (default: a small VRWKV on the bundled digits)"),
    "eval": ("vrwkv.cli.eval", "top-1/top-5, loss and throughput of a checkpoint on a data set"),
    "predict": ("vrwkv.cli.predict", "top-k classes with probabilities for image files"),
    "plot": ("vrwkv.cli.plot", "draw a run's loss/accuracy curves to a PNG"),
    "ablate": ("vrwkv.cli.ablate", "shift / wkv ablations on the bundled digits, several seeds, mean ± std"),
    "bench": ("vrwkv.cli.bench", "benchmark VRWKV vs ViT (time, memory, FLOPs) and the Bi-WKV op"),
    "profile": ("vrwkv.cli.profile", "where one forward's (or training step's) time goes, by operator category"),
    "flops": ("vrwkv.cli.flops", "parameters, MACs and FLOPs per module type of a model at an input size"),
    "erf": ("vrwkv.cli.erf", "effective receptive field heat maps of model variants, side by side, to a PNG"),
    "export": ("vrwkv.cli.export", "ONNX / TorchScript export, checked against PyTorch"),
    "features": ("vrwkv.cli.features", "pooled embeddings of every image of a folder (safetensors / npz)"),
    "pretrain-mae": ("vrwkv.cli.pretrain_mae", "masked-autoencoder pre-training (default: the bundled digits)"),
    "seg-train": ("vrwkv.cli.seg_train", "train UperNet on a VRWKV backbone (default: the bundled digit scenes)"),
    "seg-eval": ("vrwkv.cli.seg_eval", "mIoU / pixel accuracy of a segmentation checkpoint (optional sliding window)"),
    "seg-predict": ("vrwkv.cli.seg_predict", "segment an image: colour mask PNG and overlay"),
    "det-train": ("vrwkv.cli.det_train", "train Mask R-CNN on a VRWKV backbone (default: the bundled digit scenes)"),
    "det-eval": ("vrwkv.cli.det_eval", "COCO box / mask AP of a detection checkpoint"),
    "det-predict": ("vrwkv.cli.det_predict", "detect objects in an image: boxes, labels, scores and masks drawn"),
}


class CLIError(Exception):
    """A user error: printed as one line, exit code 2, no stack trace."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vrwkv", description="Vision-RWKV in pure PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return importlib.import_module(args._module).run(args) or 0
    except CLIError as e:
        print(f"vrwkv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
