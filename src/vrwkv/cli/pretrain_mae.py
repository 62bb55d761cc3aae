"""``vrwkv pretrain-mae``: masked-autoencoder pre-training (bundled digits by default, or an ImageNet-layout folder),
and ``--visualize CKPT`` for a reconstruction figure of a checkpoint."""
from __future__ import annotations

import argparse

# flag -> config key it overrides (besides the shared run flags of _run_options)
_FLAGS = {
    "model": "model.name", "data": "data.dataset", "img_size": "data.img_size", "accum_steps": "run.accum_steps",
    "mask_ratio": "task.mask_ratio", "sparse_mode": "model.kwargs.sparse_mode",
    "norm_pix_loss": "model.kwargs.norm_pix_loss", "num_images": "visualize.num_images",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vrwkv.cli._run_options import add_run_options

    add_run_options(p, default_preset="digits", preset_help="bundled pre-training preset or YAML file",
                    output_help="run folder (default: runs/mae-<preset>, numbered if taken)",
                    overrides_example="optim.lr=1e-3 model.kwargs.decoder_depth=4 task.mask_ratio=0.6")
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
    p.add_argument("--accum-steps", type=int, help="gradient accumulation steps per optimizer update")
    p.add_argument("--img-size", type=int)


def run(args: argparse.Namespace) -> int:
    from vrwkv.cli._common import setup_logging, user_errors
    from vrwkv.cli._run_options import collect_overrides, resume_dir

    setup_logging()
    with user_errors():
        from vrwkv.engine import mae

        if args.list_presets:
            print("\n".join(mae.list_mae_presets()))
            return 0
        overrides = collect_overrides(args, _FLAGS)
        if args.visualize is not None:
            from vrwkv.engine.distributed import default_device

            cfg = mae.make_config(args.preset, overrides)  # used for checkpoints that carry no config
            path = mae.visualize(args.visualize, args.figure, cfg=cfg, dataset=args.data, num_images=args.num_images,
                                 device=args.device or default_device())
            print(f"reconstructions written to {path}")
            return 0
        cfg = mae.make_config(args.preset, overrides)
        resume = resume_dir(args, cfg.run.output_dir, mae.default_output_dir(args.preset), mae.latest_run_dir)
        run_dir, metrics = mae.pretrain(cfg, preset=args.preset, resume=resume,
                                        overrides_on_resume=overrides if resume else None)
    import os

    if "val_loss" in metrics and os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(f"final val loss {metrics['val_loss']:.4f} (masked patches) | run dir {run_dir} | fine-tune: "
              f"vrwkv train --init-from {run_dir / 'last.pt'}")
    return 0
