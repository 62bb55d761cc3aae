"""``vrwkv train``: train a classifier (bundled digits by default, or an ImageNet-layout folder)."""
from __future__ import annotations

import argparse

# flag -> config key it overrides
_FLAGS = {
    "model": "model.name", "data": "data.dataset", "epochs": "schedule.epochs", "batch_size": "data.batch_size",
    "lr": "optim.lr", "output": "run.output_dir", "device": "run.device", "amp": "run.amp", "seed": "run.seed",
    "workers": "data.workers", "on_bad_image": "data.on_bad_image", "img_size": "data.img_size",
    "accum_steps": "run.accum_steps", "layer_decay": "optim.layer_decay", "drop_path": "model.drop_path_rate",
    "init_from": "model.init_from",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, in one group before or after the options, e.g. "
                        "optim.lr=3e-4 model.kwargs.depth=6 run.ema=true")
    p.add_argument("--preset", default="digits",
                   help="bundled preset name or YAML file (default: digits; see --list-presets)")
    p.add_argument("--list-presets", action="store_true", help="print the bundled presets and exit")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_DIR",
                   help="continue a run from its last checkpoint (default: the latest run of --preset)")
    p.add_argument("--model", help="registered model name (VRWKV or any timm model)")
    p.add_argument("--data", help="'digits' or the root of an ImageFolder tree with train/ and val/")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch per step, summed over processes")
    p.add_argument("--accum-steps", type=int, help="gradient accumulation steps per optimizer update")
    p.add_argument("--lr", type=float)
    p.add_argument("--layer-decay", type=float, help="layer-wise lr decay factor, e.g. 0.75")
    p.add_argument("--drop-path", type=float, help="stochastic depth rate")
    p.add_argument("--img-size", type=int)
    p.add_argument("--output", help="run folder (default: runs/<preset>, numbered if taken)")
    p.add_argument("--device", help="torch device (default: this process's GPU, else mps, else cpu)")
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"])
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="data-loading processes per training process")
    p.add_argument("--init-from", metavar="MAE_CKPT",
                   help="fine-tune: initialise the backbone from the encoder of an MAE checkpoint (a `vrwkv "
                        "pretrain-mae` run folder's last.pt, or an official one); combine with --layer-decay")
    p.add_argument("--on-bad-image", choices=["skip", "error"],
                   help="unreadable images / empty class folders: skip and report, or stop (default: error)")


def run(args: argparse.Namespace) -> int:
    from vrwkv.cli import CLIError
    from vrwkv.cli._common import setup_logging, user_errors

    setup_logging()
    with user_errors():
        from pathlib import Path

        from vrwkv.engine import classification
        from vrwkv.engine.config import list_presets

        if args.list_presets:
            print("\n".join(list_presets()))
            return 0
        overrides = [f"{key}={getattr(args, flag)}" for flag, key in _FLAGS.items()
                     if getattr(args, flag) is not None]
        overrides += list(args.overrides)
        cfg = classification.make_config(args.preset, overrides)
        resume = None
        if args.resume is not None:
            if args.resume == "latest":
                base = Path(cfg.run.output_dir or f"runs/{Path(args.preset).stem}")
                resume = classification.latest_run_dir(base)
                if resume is None:
                    raise CLIError(f"no run to resume under {base}[-N] (no last.pt); give the run folder")
            else:
                resume = Path(args.resume)
        try:
            run_dir, metrics = classification.train(cfg, preset=args.preset, resume=resume,
                                                    overrides_on_resume=overrides if resume else None)
        except KeyboardInterrupt:
            import sys

            print("vrwkv train: interrupted; `vrwkv train --resume [RUN_DIR]` continues from the last checkpoint",
                  file=sys.stderr)
            return 130
    if "val_top1" in metrics:
        print(f"final val top-1 {metrics['val_top1']:.2f}% top-5 {metrics['val_top5']:.2f}% "
              f"loss {metrics['val_loss']:.4f} | run dir {run_dir}")
    return 0
