"""``vrwkv export MODEL OUT``: ONNX (``.onnx``) or TorchScript (``.pt``) export, checked against PyTorch."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="registered model name (e.g. vrwkv_tiny)")
    p.add_argument("output", metavar="OUT", help="output file: .onnx (ONNX) or .pt (TorchScript trace)")
    p.add_argument("--img-size", type=int, nargs="+", metavar="S", default=None,
                   help="input size fixed in the graph: S or H W (default: the model's pretrained input size)")
    p.add_argument("--batch-size", type=int, default=1, help="batch of the example input (default: 1)")
    p.add_argument("--dynamic-batch", action="store_true", help="ONNX: make the batch axis dynamic")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--format", choices=["onnx", "torchscript"], default=None,
                   help="default: from the suffix of OUT (.onnx -> onnx, else torchscript)")
    from vrwkv.cli._model_options import add_model_options

    add_model_options(p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vrwkv.cli import CLIError
    from vrwkv.cli._model_options import build_model, native_size, parse_kwargs
    from vrwkv.tools.export import TOLERANCE, export_onnx, export_torchscript

    fmt = args.format or ("onnx" if Path(args.output).suffix.lower() == ".onnx" else "torchscript")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.img_size is not None and len(args.img_size) not in (1, 2):
        raise CLIError(f"--img-size takes S or H W, got {len(args.img_size)} values")
    if fmt != "onnx" and args.dynamic_batch:
        raise CLIError("--dynamic-batch is an ONNX option (a TorchScript trace takes any batch size)")
    model = build_model(args.model, args.checkpoint, parse_kwargs(args.model_kwargs))
    size = (native_size(model) if args.img_size is None
            else tuple(args.img_size) * (3 - len(args.img_size)))  # fmt: skip
    try:
        if fmt == "onnx":
            report = export_onnx(model, args.output, size, batch_size=args.batch_size,
                                 dynamic_batch=args.dynamic_batch, opset=args.opset)
        else:
            report = export_torchscript(model, args.output, size, batch_size=args.batch_size)
    except (ValueError, ImportError) as e:
        raise CLIError(" ".join(str(e).split())) from None
    shape = "x".join(map(str, report.input_shape))
    print(f"wrote {report.path} ({fmt}, input images {shape}"
          + (", dynamic batch" if args.dynamic_batch else "") + ")")
    if report.checked:
        errors = ", ".join(f"batch {b}: {e:.1e}" for b, e in report.checked.items())
        print(f"max relative error vs PyTorch: {errors}")
        if report.max_error > TOLERANCE:
            raise CLIError(f"the exported graph differs from PyTorch by {report.max_error:.1e} > {TOLERANCE:.0e}")
    else:
        print("not checked (onnxruntime is not installed: pip install 'vrwkv[export]')")
    return 0
