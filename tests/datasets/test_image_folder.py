import numpy as np
import pytest
from PIL import Image

from vrwkv.data import BadImageError, DataConfig, ImageFolderDataset, TransformedDataset, build_transform, load_rgb


def _write(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def test_modes_are_converted_to_8bit_rgb(tmp_path):
    grey = _write(tmp_path / "g.png", Image.fromarray(np.full((5, 7), 100, np.uint8), "L"))
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[0, 0, 3] = 255  # one opaque red pixel, the rest fully transparent
    rgba = _write(tmp_path / "a.png", Image.fromarray(rgba, "RGBA"))
    sixteen = _write(tmp_path / "s.png", Image.fromarray(np.full((3, 3), 65535 // 2, np.uint16)))
    palette = _write(tmp_path / "p.gif", Image.fromarray(np.full((3, 3), 200, np.uint8), "L").convert("P"))
    g = np.asarray(load_rgb(grey))
    assert g.shape == (5, 7, 3) and (g == 100).all()
    a = np.asarray(load_rgb(rgba))
    assert tuple(a[0, 0]) == (255, 0, 0) and tuple(a[1, 1]) == (255, 255, 255)  # transparent -> white
    s = np.asarray(load_rgb(sixteen))
    assert s.dtype == np.uint8 and abs(int(s[0, 0, 0]) - 127) <= 1  # 16-bit mid-grey stays mid-grey
    p = np.asarray(load_rgb(palette))
    assert p.shape == (3, 3, 3) and abs(int(p[0, 0, 0]) - 200) <= 2


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(BadImageError, match="bad.jpg"):
        load_rgb(bad)
    good = _write(tmp_path / "t.png", Image.fromarray(np.random.randint(0, 255, (64, 64, 3), np.uint8)))
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(BadImageError, match="trunc.png"):
        load_rgb(truncated)


def _tree(root, counts):
    for cls, n in counts.items():
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _write(root / "train" / cls / f"{i}.png", Image.new("RGB", (8, 8), (i * 20, 0, 0)))


def test_empty_class_folder_error_or_skip(tmp_path):
    _tree(tmp_path, {"cat": 2, "dog": 0, "eel": 1})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="empty class folder.*dog"):
        ImageFolderDataset(tmp_path, "train", on_bad_image="error")
    with pytest.warns(UserWarning, match="dog"):
        ds = ImageFolderDataset(tmp_path, "train", on_bad_image="skip")
    assert ds.classes == ["cat", "dog", "eel"] and ds.empty_classes == ["dog"]
    assert len(ds) == 3 and sorted(ds.targets) == [0, 0, 2]  # indices stay aligned, .txt ignored


def test_layout_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(tmp_path, "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path, "train")
    _tree(tmp_path, {"cat": 1})
    (tmp_path / "val" / "zebra").mkdir(parents=True)
    with pytest.raises(ValueError, match="zebra"):
        ImageFolderDataset(tmp_path, "val", classes=["cat"])


def test_bad_and_small_images_in_the_pipeline(tmp_path):
    _tree(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "train" / "a" / "0.png").write_bytes(b"garbage")
    ds = ImageFolderDataset(tmp_path, "train")
    transform = build_transform(DataConfig(img_size=16, crop_pct=1.0), is_training=False)
    train = TransformedDataset(ds, transform, replace_bad=True, min_size=16)
    x, y, bad, small = train[0]  # unreadable -> replaced by the next readable image (same batch size)
    assert x.shape == (3, 16, 16) and y == 0 and bad[0][0].endswith("0.png") and small  # 8 px < 16 px crop
    evaluation = TransformedDataset(ds, transform, replace_bad=False, min_size=16)
    x, y, bad, _ = evaluation[0]  # dropped for evaluation
    assert x is None and len(bad) == 1
