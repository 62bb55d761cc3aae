"""ERF maps on real photos: shape, and what causal vs bidirectional Bi-WKV can see (raster order + Q-Shift)."""
import numpy as np
import pytest
import torch
from PIL import Image

import vrwkv
from vrwkv.tools.erf import erf_area_ratios, erf_map, folder_images, normalize_images, plot_erf, sample_photos

pytestmark = pytest.mark.usefixtures("one_thread")


P = 16  # patch size of the test models


def _erf(size, **kwargs):
    torch.manual_seed(0)
    model = vrwkv.create_model("test_vrwkv", img_size=size, **kwargs)
    return erf_map(model, normalize_images(sample_photos(2, size, seed=3), model), batch_size=1)


def _row_mass(erf):
    """Fraction of the map's total in each row of patches."""
    rows = erf.view(erf.shape[0] // P, P, erf.shape[1]).sum((1, 2))
    return rows / rows.sum()


def test_sample_photos_are_seeded_real_crops():
    a, b, c = sample_photos(3, 32, seed=0), sample_photos(3, 32, seed=0), sample_photos(3, 32, seed=1)
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.std(dim=(1, 2, 3)).min() > 0.05  # photo content, not a constant


def test_erf_map_shape_and_values():
    erf = _erf(64)
    assert erf.shape == (64, 64) and erf.dtype == torch.float64
    assert torch.isfinite(erf).all() and erf.min() >= 0 and erf.max() > 0
    # the centre token (grid 4x4 -> token (2, 2), pixels 32..47) is where the gradient concentrates
    centre = erf[32:48, 32:48].mean()
    assert centre == erf.view(4, P, 4, P).mean((1, 3)).max()


def test_erf_causal_sees_only_earlier_tokens_without_shift():
    # no token shift: the centre token (4, 4) of the 8x8 grid sees raster positions <= its own, i.e. the rows above
    # it and the left part of its own row; bidirectional sees everything
    causal = _erf(128, wkv_mode="causal", shift_mode="none", depth=1)
    bidir = _erf(128, wkv_mode="bidirectional", shift_mode="none", depth=1)
    total = causal.sum()
    assert causal[5 * P :].sum() <= 1e-9 * total  # every row below the centre token
    assert causal[4 * P : 5 * P, 5 * P :].sum() <= 1e-9 * total  # right of it in its own row
    assert _row_mass(causal)[:4].min() > 1e-5  # rows above: seen
    assert _row_mass(bidir)[5:].min() > 1e-5 and bidir[4 * P : 5 * P, 5 * P :].sum() > 1e-6 * bidir.sum()


def test_erf_causal_with_q_shift_reaches_two_rows_down_per_block():
    # Q-Shift lets each token read the token below it, once in the attention and once in the FFN of a block, so the
    # centre token of a causal block sees rows <= 4 + 2 (row 6 only through two shifts: tiny), never row 7
    causal = _row_mass(_erf(128, wkv_mode="causal", depth=1))
    bidir = _row_mass(_erf(128, wkv_mode="bidirectional", depth=1))
    assert causal[7] <= 1e-12 and causal[5] > 1e-5 and causal[6] > 0
    assert bidir[7] > 1e-5


def test_erf_area_ratios():
    delta = torch.zeros(64, 64, dtype=torch.float64)
    delta[40, 40] = 1.0  # the centre pixel of the centre token (2, 2)
    assert erf_area_ratios(delta, P) == {t: 1 / 64**2 for t in (0.2, 0.3, 0.5, 0.99)}
    uniform = torch.ones(64, 64, dtype=torch.float64)
    ratios = erf_area_ratios(uniform, P, (0.1, 0.5, 1.0))
    assert ratios[0.1] < ratios[0.5] < ratios[1.0] == 1.0 and ratios[0.5] >= 0.5
    with pytest.raises(ValueError, match="thresholds"):
        erf_area_ratios(uniform, P, (1.5,))


def test_plot_erf_and_folder_images(tmp_path):
    for i, img in enumerate(sample_photos(2, 40, seed=2)):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / f"p{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    images, files = folder_images(tmp_path, 32)
    assert images.shape == (2, 3, 32, 32) and [f.rsplit("/", 1)[-1] for f in files] == ["p0.png", "p1.png"]
    maps = {"a": torch.rand(32, 32, dtype=torch.float64), "b": torch.rand(32, 32, dtype=torch.float64)}
    path = plot_erf(maps, tmp_path / "erf.png", title="t", patch_size=P)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 1.5 * im.height  # two panels side by side
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ValueError, match="no decodable image"):
        folder_images(tmp_path / "bad", 32)
    with pytest.raises(ValueError, match="does not exist"):
        folder_images(tmp_path / "missing", 32)
