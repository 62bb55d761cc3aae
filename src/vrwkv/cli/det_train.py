"""``vrwkv det-train``: train Mask R-CNN on a VRWKV backbone (bundled digit scenes by default, or a COCO folder)."""
from __future__ import annotations

import argparse

# flag -> config key it overrides (besides the shared run flags)
_FLAGS = {
    "backbone": "model.backbone", "neck": "model.neck", "checkpoint": "model.checkpoint", "data": "data.dataset",
    "layer_decay": "optim.layer_decay",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vrwkv.cli._run_options import add_run_options

    add_run_options(p, default_preset="digit_scenes", preset_help="bundled detection preset or YAML file",
                    output_help="run folder (default: runs/det-<preset>, numbered if taken)",
                    overrides_example="model.rcnn.fpn_channels=128 data.scenes_train=500 run.max_steps=100")
    p.add_argument("--backbone", help="adapter size (vrwkv_tiny/small/base/large, test_vrwkv) or VRWKV model name")
    p.add_argument("--neck", choices=["adapter", "simple"], help="VRWKV-Adapter (official) or simple pyramid")
    p.add_argument("--checkpoint", help="backbone init: official det/seg checkpoint (backbone.*) or a classifier")
    p.add_argument("--data", help="'digit_scenes' or a COCO root (train2017/, val2017/, annotations/)")
    p.add_argument("--layer-decay", type=float, help="layer-wise lr decay (official Mask R-CNN: 0.85)")


def run(args: argparse.Namespace) -> int:
    from vrwkv.cli._common import setup_logging, user_errors
    from vrwkv.cli._run_options import collect_overrides, resume_dir

    setup_logging()
    with user_errors():
        from vrwkv.engine import detection

        if args.list_presets:
            print("\n".join(detection.list_det_presets()))
            return 0
        overrides = collect_overrides(args, _FLAGS)
        cfg = detection.make_config(args.preset, overrides)
        resume = resume_dir(args, cfg.run.output_dir, detection.default_output_dir(args.preset),
                            detection.latest_run_dir)
        run_dir, metrics = detection.train(cfg, preset=args.preset, resume=resume,
                                           overrides_on_resume=overrides if resume else None)
    import os

    if "val_box_AP" in metrics and os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(f"final val box AP {metrics['val_box_AP']:.2f} (AP50 {metrics['val_box_AP50']:.2f}) | mask AP "
              f"{metrics['val_mask_AP']:.2f} (AP50 {metrics['val_mask_AP50']:.2f}) | run dir {run_dir}")
    return 0
