import pytest
import torch
from torch import nn

from vrwkv.tasks.classification import ClassificationConfig, ClassificationTask


class Fixed(nn.Module):
    """Returns preset logits (so the loss can be checked against a hand computation)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x):
        return self.logits[: x.shape[0]]


def test_label_smoothed_loss_matches_the_official_formula():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 7, dtype=torch.float64), torch.randint(0, 7, (6,))
    task = ClassificationTask(Fixed(logits.clone()), 7, ClassificationConfig(label_smoothing=0.1))
    loss = task({"image": torch.zeros(6, 3, 2, 2), "target": target})["loss"]
    soft = torch.full((6, 7), 0.1 / 7, dtype=torch.float64)
    soft[torch.arange(6), target] += 0.9  # (1 - eps) * onehot + eps / K
    expected = -(soft * logits.log_softmax(-1)).sum(-1).mean()
    assert abs(loss.item() - expected.item()) < 1e-12


def test_evaluate_counts_top1_top5_and_loss_sum():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0.0, 1, 2, 3, 4, 5], [0.0, 9, 1, 2, 3, 4]])
    target = torch.tensor([0, 0, 3])  # top-1 hit, miss entirely, top-5 hit only
    task = ClassificationTask(Fixed(logits), 6)
    s = task.evaluate_batch({"image": torch.zeros(3, 1), "target": target})
    assert (s["top1"].item(), s["top5"].item(), s["count"].item()) == (1, 2, 3)
    assert abs(s["loss_sum"].item() - nn.functional.cross_entropy(logits, target, reduction="sum").item()) < 1e-5
    m = task.summarize(s)
    assert m["top1"] == pytest.approx(100 / 3) and m["top5"] == pytest.approx(200 / 3) and m["count"] == 3


def test_mixup_uses_soft_targets_and_needs_even_batches():
    torch.manual_seed(0)
    task = ClassificationTask(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), 4,
                              ClassificationConfig(mixup=0.8, cutmix=1.0))
    loss = task({"image": torch.randn(4, 3, 2, 2), "target": torch.tensor([0, 1, 2, 3])})["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    with pytest.raises(ValueError, match="even"):
        task({"image": torch.randn(3, 3, 2, 2), "target": torch.tensor([0, 1, 2])})
    with pytest.raises(ValueError, match="label_smoothing"):
        ClassificationTask(nn.Identity(), 4, ClassificationConfig(label_smoothing=1.0))
