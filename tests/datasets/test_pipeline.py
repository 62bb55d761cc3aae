import random

import numpy as np
import torch

from vrwkv.data import DataConfig, DigitsDataset, ShardedSampler, TransformedDataset, build_transform, collate_samples


def _train_set(seed=0):
    cfg = DataConfig(img_size=16, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    return TransformedDataset(DigitsDataset("val", 16), build_transform(cfg, True), seed=seed)


def test_augmentation_depends_only_on_seed_epoch_index():
    ds = _train_set()
    a = ds[5][0]
    torch.manual_seed(123)
    random.seed(4)
    ds[7]  # other samples in between, other global RNG states
    state = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    b = ds[5][0]
    assert torch.equal(a, b)
    assert torch.equal(state[0], torch.get_rng_state()) and state[1] == random.getstate()  # global RNG untouched
    assert np.array_equal(state[2], np.random.get_state()[1])
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], a)  # a new epoch draws new augmentations
    assert not torch.equal(_train_set(seed=1)[5][0], a)


def test_sharded_batches_equal_single_process_batches():
    n, global_batch = 103, 8
    single = list(ShardedSampler(n, 1, 0, seed=3, global_batch=global_batch))
    assert len(single) == 96 and len(set(single)) == 96  # cut to whole global batches
    ranks = [list(ShardedSampler(n, 2, r, seed=3, global_batch=global_batch)) for r in range(2)]
    for k in range(len(single) // global_batch):
        union = ranks[0][4 * k: 4 * k + 4] + ranks[1][4 * k: 4 * k + 4]
        assert sorted(union) == sorted(single[8 * k: 8 * k + 8])
    s = ShardedSampler(n, 1, 0, seed=3, global_batch=global_batch)
    s.set_epoch(0, skip_batches=5)
    assert list(s) == single[40:] and len(s) == 56
    s.set_epoch(1)
    assert list(s) != single
    ev = [list(ShardedSampler(n, 3, r, shuffle=False)) for r in range(3)]
    assert sorted(sum(ev, [])) == list(range(n))  # evaluation: every sample exactly once, no padding


def test_collate_keeps_bad_records_and_drops_missing_images():
    good = (torch.zeros(3, 4, 4), 1, [], ["small.png"])
    bad = (None, -1, [("x.png", "cannot be decoded")], [])
    b = collate_samples([good, bad, good])
    assert b["image"].shape == (2, 3, 4, 4) and b["target"].tolist() == [1, 1]
    assert b["bad"] == [("x.png", "cannot be decoded")] and b["small"] == ["small.png", "small.png"]
    assert collate_samples([bad])["image"].numel() == 0
