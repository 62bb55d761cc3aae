"""``vrwkv train``: train a classifier (bundled digits by default, or an ImageNet-layout folder)."""
from __future__ import annotations

import argparse

# flag -> config key it overrides (besides the shared run flags of _run_options)
_FLAGS = {
    "model": "model.name", "data": "data.dataset", "img_size": "data.img_size", "accum_steps": "run.accum_steps",
    "layer_decay": "optim.layer_decay", "drop_path": "model.drop_path_rate", "init_from": "model.init_from",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vrwkv.cli._run_options import add_run_options

    add_run_options(p, default_preset="digits", preset_help="bundled preset name or YAML file",
                    output_help="run folder (default: runs/<preset>, numbered if taken)",
                    overrides_example="optim.lr=3e-4 model.kwargs.depth=6 run.ema=true")
    p.add_argument("--model", help="registered model name (VRWKV or any timm model)")
    p.add_argument("--data", help="'digits' or the root of an ImageFolder tree with train/ and val/")
    p.add_argument("--accum-steps", type=int, help="gradient accumulation steps per optimizer update")
    p.add_argument("--layer-decay", type=float, help="layer-wise lr decay factor, e.g. 0.75")
    p.add_argument("--drop-path", type=float, help="stochastic depth rate")
    p.add_argument("--img-size", type=int)
    p.add_argument("--init-from", metavar="MAE_CKPT",
                   help="fine-tune: initialise the backbone from the encoder of an MAE checkpoint (a `vrwkv "
                        "pretrain-mae` run folder's last.pt, or an official one); combine with --layer-decay")


def run(args: argparse.Namespace) -> int:
    from vrwkv.cli._common import setup_logging, user_errors
    from vrwkv.cli._run_options import collect_overrides, resume_dir

    setup_logging()
    with user_errors():
        from pathlib import Path

        from vrwkv.engine import classification
        from vrwkv.engine.config import list_presets

        if args.list_presets:
            print("\n".join(list_presets()))
            return 0
        overrides = collect_overrides(args, _FLAGS)
        cfg = classification.make_config(args.preset, overrides)
        resume = resume_dir(args, cfg.run.output_dir, f"runs/{Path(args.preset).stem}", classification.latest_run_dir)
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
