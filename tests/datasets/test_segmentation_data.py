"""Segmentation data: deterministic digit scenes with exact labels, ADE20K folders, seeded joint transforms."""
import numpy as np
import pytest
import torch
from PIL import Image

from vrwkv.data.segmentation import (ADE20KFolder, DigitScenes, SegmentationSamples, SegmentationTransform,
                                     collate_segmentation)


def test_digit_scenes_are_deterministic_with_exact_masks():
    a, b = DigitScenes("train", 64, num_images=6), DigitScenes("train", 64, num_images=6)
    val = DigitScenes("val", 64, num_images=6)
    for i in range(6):
        (ia, ma), (ib, mb) = a[i], b[i]
        assert np.array_equal(np.asarray(ia), np.asarray(ib)) and np.array_equal(np.asarray(ma), np.asarray(mb))
        m = np.asarray(ma)
        assert ia.size == (64, 64) and ia.mode == "RGB" and m.shape == (64, 64)
        assert m.max() <= 10 and (m > 0).sum() > 20  # at least one digit's worth of labelled pixels
        img = np.asarray(ia, dtype=np.float64)
        # digit pixels are inked: their colour differs from the background's on average
        assert np.abs(img[m > 0].mean(0) - img[m == 0].mean(0)).max() > 20
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(val[0][0]))
    assert len(DigitScenes("val", 32)) == 200
    with pytest.raises(ValueError, match="split"):
        DigitScenes("test")


def test_digit_scenes_are_dark_ink_on_light_paper_in_disjoint_squares():
    scenes = DigitScenes("train", 64, num_images=40)
    several = 0
    for (image, mask), boxes in zip(scenes, scenes.boxes):
        img, m = np.asarray(image, dtype=np.float64), np.asarray(mask)
        # one contrast polarity: the ink is darker than the paper in every colour channel
        assert (img[m > 0].mean(0) < img[m == 0].mean(0) - 20).all()
        inside = np.zeros(m.shape, dtype=bool)
        for x, y, side, cls in boxes:
            assert 16 <= side <= 32 and 1 <= cls <= 10
            assert not inside[y:y + side, x:x + side].any()  # digits never overlap: every labelled digit is whole
            inside[y:y + side, x:x + side] = True
            assert set(np.unique(m[y:y + side, x:x + side])) == {0, cls}  # exactly its own label in its square
        assert (m[~inside] == 0).all()
        several += len(boxes) > 1
    assert several >= 10  # most scenes hold more than one digit


def test_ade20k_folder_reduces_zero_label(tmp_path):
    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / "images/training/a.jpg")
    ann = np.array([[0, 1, 150, 7, 0]] * 6, dtype=np.uint8)
    Image.fromarray(ann).save(tmp_path / "annotations/training/a.png")
    ds = ADE20KFolder(tmp_path, "training")
    image, mask = ds[0]
    assert image.size == (5, 6) and np.asarray(mask)[0].tolist() == [255, 0, 149, 6, 255]
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / "images/validation/b.jpg")
    with pytest.raises(ValueError, match="no annotation"):
        ADE20KFolder(tmp_path, "validation")
    with pytest.raises(ValueError, match="does not exist"):
        ADE20KFolder(tmp_path / "nope")


def test_samples_are_seeded_per_epoch_and_index():
    base = DigitScenes("train", 64, num_images=4)
    tf = SegmentationTransform(True, 64, 48, ratio_range=(0.5, 1.5), hflip=0.5)
    ds = SegmentationSamples(base, tf, seed=3)
    x1, y1, _, _ = ds[2]
    x2, y2, _, _ = ds[2]
    assert x1.shape == (3, 48, 48) and y1.shape == (48, 48) and y1.dtype == torch.long
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    ds.set_epoch(1)
    assert not torch.equal(ds[2][0], x1)
    # small rescales pad the crop with ignore labels
    tf_small = SegmentationTransform(True, 64, 48, ratio_range=(0.5, 0.5), hflip=0.0)
    _, y, _, _ = SegmentationSamples(base, tf_small)[0]
    assert (y[32:] == 255).all() and (y[:32, :32] != 255).all()
    batch = collate_segmentation([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 48, 48) and batch["mask"].shape == (2, 48, 48)
    ev = SegmentationSamples(base, SegmentationTransform(False, 64, 64))
    img, mask, _, _ = ev[0]
    assert torch.equal(mask, torch.from_numpy(np.asarray(base[0][1], dtype=np.int64)))
