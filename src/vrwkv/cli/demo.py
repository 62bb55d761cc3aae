"""``vrwkv demo``: build a model, run it on a bundled real photo at two resolutions, print shapes and timing."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vrwkv_tiny", help="registered model name (default: vrwkv_tiny)")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 448], help="square input sizes to run")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    import time

    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_sample_image

    import vrwkv
    from vrwkv.cli import CLIError

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model = vrwkv.create_model(args.model).to(device).eval()
    except (KeyError, ValueError) as e:  # unknown model name
        raise CLIError(str(e)) from None
    photo = load_sample_image("china.jpg")  # (427, 640, 3) uint8, ships with scikit-learn
    img = torch.from_numpy(np.array(photo))  # copy: the sample is read-only
    img = img.permute(2, 0, 1).float().div(255)[None].to(device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device)[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225], device=device)[:, None, None]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params / 1e6:.2f}M parameters on {device}; photo china.jpg {tuple(photo.shape)}")
    for size in args.sizes:
        x = (F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False) - mean) / std
        with torch.inference_mode():
            t0 = time.perf_counter()
            feats = model.forward_features(x)
            logits = model.forward_head(feats)
            dt = time.perf_counter() - t0
        print(f"  {size}x{size}: tokens {feats.shape[1]}, features {tuple(feats.shape)}, logits {tuple(logits.shape)}, "
              f"{dt * 1e3:.0f} ms")
    return 0
