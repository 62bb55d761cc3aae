"""Features of a folder of real photos (written with PIL from scikit-learn's samples) plus one corrupt file."""
import numpy as np
import pytest
import torch
from PIL import Image

import vrwkv
from vrwkv.data import BadImageError, load_rgb
from vrwkv.tools.erf import sample_photos
from vrwkv.tools.features import (
    eval_transform,
    extract_features,
    list_images,
    load_features,
    pooled_features,
    save_features,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def photo_dir(tmp_path):
    """4 photos (jpg/png, one in a sub-folder), a corrupt jpg, a hidden file and a text file."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    crops = (sample_photos(4, 80, seed=5).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    names = ["b.jpg", "a.png", "sub/c.jpg", "sub/d.png"]
    for name, crop in zip(names, crops):
        Image.fromarray(crop).resize((80, 60)).save(root / name)
    (root / "e_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a complete jpeg")
    (root / ".hidden.png").write_bytes(b"ignored")
    (root / "notes.txt").write_text("not an image")
    return root


def _model():
    torch.manual_seed(0)
    return vrwkv.create_model("test_vrwkv6b", img_size=32).eval()  # cls token: must stay out of the pooled mean


def test_list_images_recursive_sorted(photo_dir):
    names = [f[len(str(photo_dir)) + 1 :] for f in list_images(photo_dir)]
    assert names == ["a.png", "b.jpg", "e_corrupt.jpg", "sub/c.jpg", "sub/d.png"]
    (photo_dir / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        list_images(photo_dir / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        list_images(photo_dir / "missing")


def test_extract_features_skips_corrupt_and_matches_direct_forward(photo_dir):
    model, files = _model(), list_images(photo_dir)
    transform = eval_transform(model)
    result = extract_features(model, files, transform, batch_size=3, progress=False)
    good = [f for f in files if "corrupt" not in f]
    assert result.files == good and [f for f, _ in result.bad] == [str(photo_dir / "e_corrupt.jpg")]
    assert result.features.shape == (4, model.embed_dim) and result.features.dtype == torch.float32
    with torch.no_grad():
        batch = torch.stack([transform(load_rgb(f)) for f in good])
        tokens = model.forward_features(batch)  # [4, 5, C]: 2x2 patches (the model is built for 32 px) + cls token
        direct = tokens[:, :4].mean(1)
        assert torch.allclose(pooled_features(model, batch), direct)
    assert torch.allclose(result.features, direct, atol=1e-6)
    assert not torch.allclose(tokens.mean(1), direct, atol=1e-3)  # the cls token would have changed the pooling
    one_by_one = extract_features(model, good, transform, batch_size=1, progress=False)
    assert torch.allclose(one_by_one.features, result.features, atol=1e-6)


def test_extract_features_error_mode_names_the_file(photo_dir):
    model = _model()
    with pytest.raises(BadImageError, match="e_corrupt.jpg"):
        extract_features(model, list_images(photo_dir), eval_transform(model), on_bad_image="error", progress=False)


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_save_and_load_features(photo_dir, tmp_path, fmt):
    model, files = _model(), list_images(photo_dir)
    result = extract_features(model, files, eval_transform(model), batch_size=8, progress=False)
    path = save_features(result, tmp_path / f"f.{fmt}", root=photo_dir, metadata={"model": "test_vrwkv6b"})
    feats, names, meta = load_features(path)
    assert torch.equal(feats, result.features)
    assert names == ["a.png", "b.jpg", "sub/c.jpg", "sub/d.png"] and meta["model"] == "test_vrwkv6b"
