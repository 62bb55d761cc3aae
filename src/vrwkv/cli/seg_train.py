"""``vrwkv seg-train``: train UperNet on a VRWKV backbone (bundled digit scenes by default, or an ADE20K folder)."""
from __future__ import annotations

import argparse

# flag -> config key it overrides (besides the shared run flags of _run_options)
_FLAGS = {
    "backbone": "model.backbone", "neck": "model.neck", "checkpoint": "model.checkpoint", "data": "data.dataset",
    "layer_decay": "optim.layer_decay", "crop_size": "data.crop_size", "img_size": "data.img_size",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vrwkv.cli._run_options import add_run_options

    add_run_options(p, default_preset="digit_scenes", preset_help="bundled segmentation preset or YAML file",
                    output_help="run folder (default: runs/seg-<preset>, numbered if taken)",
                    overrides_example="model.channels=128 data.scenes_train=500 run.max_steps=100")
    p.add_argument("--backbone", help="adapter size (vrwkv_tiny/small/base/large, test_vrwkv) or VRWKV model name")
    p.add_argument("--neck", choices=["adapter", "simple"], help="VRWKV-Adapter (official) or simple pyramid")
    p.add_argument("--checkpoint", help="initial weights: official seg/det checkpoint or a classification one")
    p.add_argument("--data", help="'digit_scenes' or an ADE20K-layout root (images/, annotations/)")
    p.add_argument("--layer-decay", type=float, help="layer-wise lr decay (official: T 0.95, S 0.85, B 0.8, L 0.9)")
    p.add_argument("--crop-size", type=int)
    p.add_argument("--img-size", type=int, help="short side at scale ratio 1")


def run(args: argparse.Namespace) -> int:
    from vrwkv.cli._common import setup_logging, user_errors
    from vrwkv.cli._run_options import collect_overrides, resume_dir

    setup_logging()
    with user_errors():
        from pathlib import Path

        from vrwkv.engine import segmentation

        if args.list_presets:
            print("\n".join(segmentation.list_seg_presets()))
            return 0
        overrides = collect_overrides(args, _FLAGS)
        cfg = segmentation.make_config(args.preset, overrides)
        resume = resume_dir(args, cfg.run.output_dir, f"runs/seg-{Path(args.preset).stem}",
                            segmentation.latest_run_dir)
        run_dir, metrics = segmentation.train(cfg, preset=args.preset, resume=resume,
                                              overrides_on_resume=overrides if resume else None)
    if "val_mIoU" in metrics:
        print(f"final val mIoU {metrics['val_mIoU']:.2f}% aAcc {metrics['val_aAcc']:.2f}% mAcc "
              f"{metrics['val_mAcc']:.2f}% | run dir {run_dir}")
    return 0
