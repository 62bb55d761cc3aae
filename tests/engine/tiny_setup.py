"""A tiny, fast classification setup shared by the engine tests: the bundled digits at 16 px."""
RUN = [
    "data.img_size=16", "data.batch_size=32", "schedule.epochs=2", "schedule.warmup_epochs=0", "run.progress=false",
    "run.tensorboard=false", "run.log_every=1",
    "run.threads=1",  # tiny tensors: one thread is faster, and immune to other processes on the cores
]
# no BatchNorm (its batch statistics would differ between 1 and 2 processes / accumulation steps)
VIT = ["model.name=test_vit", "model.kwargs={patch_size: 4, depth: 2}"]
TINY = VIT + RUN
# our smallest registered VRWKV (embed 64, depth 2) with 4x4 patches: 16 tokens at 16 px
VRWKV = ["model.name=test_vrwkv", "model.kwargs={patch_size: 4}"]
