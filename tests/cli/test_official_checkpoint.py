"""eval / predict on an official (mmcls-format) VRWKV-T checkpoint: the golden fixture's weights."""
import pytest
import torch
from PIL import Image

from conftest import rel_err
from vrwkv.cli import main
from vrwkv.engine.classification import load_classifier


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def official_pth(golden, tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "vrwkv_t_in1k_224.pth"
    torch.save({"meta": {"note": "golden fixture"}, "state_dict": golden("vrwkv_t")["state_dict"]}, path)
    return path


def test_official_checkpoint_loads_with_the_official_outputs(official_pth, golden):
    clf = load_classifier(str(official_pth), "vrwkv_tiny")
    d = golden("vrwkv_t")
    with torch.no_grad():
        logits = clf.model(d["inputs"]["224"])
    assert rel_err(logits, d["outputs"]["logits_224"]) < 1e-5
    assert clf.classes[0].startswith("tench") and clf.folder_names[0] == "n01440764"
    assert (clf.data.img_size, clf.data.crop_pct) == (224, 0.875)


def test_predict_and_eval_with_imagenet_names(official_pth, tmp_path, capsys):
    img = tmp_path / "photo.png"
    Image.new("RGB", (300, 200), (30, 120, 200)).save(img)
    assert main(["predict", str(img), "--checkpoint", str(official_pth), "--model", "vrwkv_tiny", "--topk", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("%" in line for line in lines[1:])
    from timm.data import ImageNetInfo

    names = set(ImageNetInfo().label_descriptions())
    assert all(line.split("%", 1)[1].strip() in names for line in lines[1:])
    for synset in ("n01440764", "n01443537"):  # a two-class ImageNet-layout val split (tench, goldfish)
        (tmp_path / "imagenet" / "val" / synset).mkdir(parents=True)
        Image.new("RGB", (256, 256), (200, 100, 50)).save(tmp_path / "imagenet" / "val" / synset / "a.JPEG")
    assert main(["eval", str(official_pth), "--model", "vrwkv_tiny", "--data", str(tmp_path / "imagenet")]) == 0
    out = capsys.readouterr().out
    assert "2 images" in out and "top-1" in out
    (tmp_path / "imagenet" / "val" / "cats").mkdir()
    assert main(["eval", str(official_pth), "--model", "vrwkv_tiny", "--data", str(tmp_path / "imagenet")]) == 2
    assert "does not know: ['cats']" in capsys.readouterr().err
