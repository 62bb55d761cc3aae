"""MAETask: the training loss is the model's masked-patch loss; validation is reproducible and leaves the RNG alone."""
import pytest
import torch

from conftest import DEVICE
from vrwkv.models.mae import MaskedAutoencoderVRWKV
from vrwkv.tasks.mae import MAEConfig, MAETask

TINY = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, decoder_embed_dim=16, decoder_depth=1)


def _task(**cfg) -> MAETask:
    torch.manual_seed(0)
    return MAETask(MaskedAutoencoderVRWKV(**TINY).to(DEVICE), MAEConfig(**cfg))


def test_training_loss_is_the_models_loss_with_fresh_masks():
    task = _task(mask_ratio=0.5)
    batch = {"image": torch.randn(4, 3, 16, 16, device=DEVICE), "target": torch.zeros(4, dtype=torch.long)}
    torch.manual_seed(1)
    loss = task(batch)["loss"]
    torch.manual_seed(1)
    expected, _, mask = task.model(batch["image"], mask_ratio=0.5)
    assert torch.equal(loss, expected) and mask.sum() == 4 * 8
    loss.backward()  # the engine backpropagates it
    assert task.model.decoder_pred.weight.grad is not None
    assert not torch.equal(task(batch)["loss"], loss)  # the next step draws other masks


def test_validation_is_reproducible_per_image_and_leaves_the_global_rng_alone():
    task = _task(eval_seed=3).eval()
    images = torch.randn(6, 3, 16, 16, device=DEVICE)
    rng = torch.get_rng_state()
    stats = task.evaluate_batch({"image": images})
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(task.evaluate_batch({"image": images})["loss_sum"], stats["loss_sum"])
    loss, _, _ = task.model(images, 0.75, torch.Generator(device=DEVICE).manual_seed(3))
    assert stats["count"].item() == 6 and stats["loss_sum"].item() == pytest.approx(6 * loss.item(), rel=1e-6)
    # statistics are sums: two batches summarise to the mean over all their images
    other = task.evaluate_batch({"image": images[:2]})
    summed = {k: stats[k] + other[k] for k in stats}
    assert task.summarize(summed) == {"loss": pytest.approx((stats["loss_sum"] + other["loss_sum"]).item() / 8),
                                      "count": 8}
    assert set(stats) == set(MAETask.stat_keys)


def test_bad_mask_ratio_is_a_clear_error():
    with pytest.raises(ValueError, match="task.mask_ratio must be in"):
        _task(mask_ratio=1.0)
