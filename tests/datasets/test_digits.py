import numpy as np
import pytest

from vrwkv.data import DigitsDataset
from vrwkv.data.digits import digits_split_indices


def test_split_is_fixed_disjoint_and_stratified():
    tr, va = digits_split_indices()
    tr2, va2 = digits_split_indices()
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert len(tr) == 1438 and len(va) == 359 and not set(tr) & set(va)
    val = DigitsDataset("val", 16)
    counts = np.bincount(val.targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20 % of ~180 per class


def test_images_are_rgb_upscaled_real_digits():
    ds = DigitsDataset("train", img_size=32)
    img, label = ds[0]
    assert img.mode == "RGB" and img.size == (32, 32) and 0 <= label <= 9
    arr = np.asarray(img)
    assert (arr[..., 0] == arr[..., 1]).all() and arr.max() > 200 and arr.min() < 30  # grey ink on black
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("test")
    with pytest.raises(ValueError, match="img_size"):
        DigitsDataset("train", img_size=4)
