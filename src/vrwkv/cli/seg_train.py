"""``vrwkv seg-train``: train UperNet on a VRWKV backbone (bundled digit scenes by default, or an ADE20K folder)."""
from __future__ import annotations

import argparse

# flag -> config key it overrides
_FLAGS = {
    "backbone": "model.backbone", "neck": "model.neck", "checkpoint": "model.checkpoint", "data": "data.dataset",
    "epochs": "schedule.epochs", "batch_size": "data.batch_size", "lr": "optim.lr", "layer_decay": "optim.layer_decay",
    "output": "run.output_dir", "device": "run.device", "amp": "run.amp", "seed": "run.seed",
    "workers": "data.workers", "crop_size": "data.crop_size", "img_size": "data.img_size",
    "on_bad_image": "data.on_bad_image",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. model.channels=128 data.scenes_train=500 run.max_steps=100")
    p.add_argument("--preset", default="digit_scenes", help="bundled segmentation preset or YAML file")
    p.add_argument("--list-presets", action="store_true", help="print the bundled presets and exit")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_DIR",
                   help="continue a run from its last checkpoint (default: the latest run of --preset)")
    p.add_argument("--backbone", help="adapter size (vrwkv_tiny/small/base/large, test_vrwkv) or VRWKV model name")
    p.add_argument("--neck", choices=["adapter", "simple"], help="VRWKV-Adapter (official) or simple pyramid")
    p.add_argument("--checkpoint", help="initial weights: official seg/det checkpoint or a classification one")
    p.add_argument("--data", help="'digit_scenes' or an ADE20K-layout root (images/, annotations/)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch per step, summed over processes")
    p.add_argument("--lr", type=float)
    p.add_argument("--layer-decay", type=float, help="layer-wise lr decay (official: T 0.95, S 0.85, B 0.8, L 0.9)")
    p.add_argument("--crop-size", type=int)
    p.add_argument("--img-size", type=int, help="short side at scale ratio 1")
    p.add_argument("--output", help="run folder (default: runs/seg-<preset>, numbered if taken)")
    p.add_argument("--device")
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"])
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--on-bad-image", choices=["skip", "error"])


def run(args: argparse.Namespace) -> int:
    from vrwkv.cli import CLIError
    from vrwkv.cli._common import setup_logging, user_errors

    setup_logging()
    with user_errors():
        from pathlib import Path

        from vrwkv.engine import segmentation

        if args.list_presets:
            print("\n".join(segmentation.list_seg_presets()))
            return 0
        overrides = [f"{key}={getattr(args, flag)}" for flag, key in _FLAGS.items() if getattr(args, flag) is not None]
        overrides += list(args.overrides)
        cfg = segmentation.make_config(args.preset, overrides)
        resume = None
        if args.resume is not None:
            if args.resume == "latest":
                base = Path(cfg.run.output_dir or f"runs/seg-{Path(args.preset).stem}")
                resume = segmentation.latest_run_dir(base)
                if resume is None:
                    raise CLIError(f"no run to resume under {base}[-N] (no last.pt); give the run folder")
            else:
                resume = Path(args.resume)
        run_dir, metrics = segmentation.train(cfg, preset=args.preset, resume=resume,
                                              overrides_on_resume=overrides if resume else None)
    if "val_mIoU" in metrics:
        print(f"final val mIoU {metrics['val_mIoU']:.2f}% aAcc {metrics['val_aAcc']:.2f}% mAcc "
              f"{metrics['val_mAcc']:.2f}% | run dir {run_dir}")
    return 0
