"""``vrwkv pretrain-mae``: masked-autoencoder pre-training (bundled digits by default, or an ImageNet-layout folder),
and ``--visualize CKPT`` for a reconstruction figure of a checkpoint."""
from __future__ import annotations

import argparse

# flag -> config key it overrides
_FLAGS = {
    "model": "model.name", "data": "data.dataset", "epochs": "schedule.epochs", "batch_size": "data.batch_size",
    "lr": "optim.lr", "output": "run.output_dir", "device": "run.device", "amp": "run.amp", "seed": "run.seed",
    "workers": "data.workers", "on_bad_image": "data.on_bad_image", "img_size": "data.img_size",
    "accum_steps": "run.accum_steps", "mask_ratio": "task.mask_ratio", "sparse_mode": "model.kwargs.sparse_mode",
    "norm_pix_loss": "model.kwargs.norm_pix_loss", "num_images": "visualize.num_images",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, in one group before or after the options, e.g. "
                        "optim.lr=1e-3 model.kwargs.decoder_depth=4 task.mask_ratio=0.6")
    p.add_argument("--preset", default="digits",
                   help="bundled pre-training preset or YAML file (default: digits; see --list-presets)")
    p.add_argument("--list-presets", action="store_true", help="print the bundled presets and exit")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_DIR",
                   help="continue a run from its last checkpoint (default: the latest run of --preset)")
    p.add_argument("--visualize", metavar="CKPT",
                   help="instead of training, draw original / masked / reconstruction of a checkpoint's model on the "
                        "first validation images (our run checkpoint, or an official one with --preset/--model)")
    p.add_argument("--figure", metavar="PNG", help="--visualize output (default: reconstruction.png beside CKPT)")
    p.add_argument("--num-images", type=int, help="images in the reconstruction figures")
    p.add_argument("--model", help="MAE model name (mae_vrwkv_base_patch16, mae_vrwkv_tiny_patch16)")
    p.add_argument("--data", help="'digits' or the root of an ImageFolder tree with train/ and val/ (labels unused)")
    p.add_argument("--sparse-mode", choices=["official", "grid"],
                   help="encoder input: official (random order, 1-D shift) or grid (raster order, Q-Shift on the "
                        "grid with masked neighbours absent)")
    p.add_argument("--mask-ratio", type=float, help="fraction of patches hidden from the encoder (default 0.75)")
    p.add_argument("--norm-pix-loss", action="store_true", default=None,
                   help="regress per-patch normalised pixels")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch per step, summed over processes")
    p.add_argument("--accum-steps", type=int, help="gradient accumulation steps per optimizer update")
    p.add_argument("--lr", type=float)
    p.add_argument("--img-size", type=int)
    p.add_argument("--output", help="run folder (default: runs/mae-<preset>, numbered if taken)")
    p.add_argument("--device", help="torch device (default: this process's GPU, else mps, else cpu)")
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"])
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="data-loading processes per training process")
    p.add_argument("--on-bad-image", choices=["skip", "error"],
                   help="unreadable images / empty class folders: skip and report, or stop (default: error)")


def run(args: argparse.Namespace) -> int:
    from vrwkv.cli import CLIError
    from vrwkv.cli._common import setup_logging, user_errors

    setup_logging()
    with user_errors():
        from pathlib import Path

        from vrwkv.engine import mae

        if args.list_presets:
            print("\n".join(mae.list_mae_presets()))
            return 0
        overrides = [f"{key}={'true' if value is True else value}" for flag, key in _FLAGS.items()
                     if (value := getattr(args, flag)) is not None]
        overrides += list(args.overrides)
        if args.visualize is not None:
            from vrwkv.engine.distributed import default_device

            cfg = mae.make_config(args.preset, overrides)  # used for checkpoints that carry no config
            path = mae.visualize(args.visualize, args.figure, cfg=cfg, dataset=args.data, num_images=args.num_images,
                                 device=args.device or default_device())
            print(f"reconstructions written to {path}")
            return 0
        cfg = mae.make_config(args.preset, overrides)
        resume = None
        if args.resume is not None:
            if args.resume == "latest":
                base = Path(cfg.run.output_dir or mae.default_output_dir(args.preset))
                resume = mae.latest_run_dir(base)
                if resume is None:
                    raise CLIError(f"no run to resume under {base}[-N] (no last.pt); give the run folder")
            else:
                resume = Path(args.resume)
        run_dir, metrics = mae.pretrain(cfg, preset=args.preset, resume=resume,
                                        overrides_on_resume=overrides if resume else None)
    import os

    if "val_loss" in metrics and os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(f"final val loss {metrics['val_loss']:.4f} (masked patches) | run dir {run_dir} | fine-tune: "
              f"vrwkv train --init-from {run_dir / 'last.pt'}")
    return 0
