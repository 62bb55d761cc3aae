"""Detection data: bundled digit scenes (exact masks/boxes), COCO folders (masks, crowd, label map, errors), the COCO
writer round trip, training samples and batching."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vrwkv.data.detection import (COCODetection, DetectionSamples, DigitDetectionScenes, collate_detection,
                                  export_coco)
from vrwkv.data.digits import digits_split_indices, load_digits_arrays
from vrwkv.data.image_folder import BadImageError


@pytest.fixture(scope="module")
def scenes():
    return DigitDetectionScenes("val", img_size=64, num_images=12)


def test_scene_masks_and_boxes_are_the_pasted_digits(scenes):
    images, labels = load_digits_arrays()
    val_pool = set(digits_split_indices()[1].tolist())
    n_instances = 0
    for i in range(len(scenes)):
        image, target = scenes[i]
        placed = scenes.instances[i]
        assert image.size == (64, 64) and target["masks"].shape == (len(placed), 64, 64)
        assert int(target["image_id"]) == i + 1 and target["iscrowd"].sum() == 0
        for j, p in enumerate(placed):
            assert p["digit"] in val_pool and p["label"] == labels[p["digit"]] + 1 == int(target["labels"][j])
            # the mask, rebuilt from the recorded placement: the upscaled scan's ink above 0.4 of full intensity
            ink = Image.fromarray((images[p["digit"]] / 16.0 * 255).astype(np.uint8))
            ink = np.asarray(ink.resize((p["side"], p["side"]), Image.BILINEAR)) / 255.0
            expected = np.zeros((64, 64), dtype=np.uint8)
            expected[p["y"]:p["y"] + p["side"], p["x"]:p["x"] + p["side"]] = ink > 0.4
            assert np.array_equal(target["masks"][j].numpy(), expected)
            rows, cols = np.nonzero(expected)
            assert target["boxes"][j].tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        assert target["masks"].sum(0).max() <= 1  # instances never overlap
        n_instances += len(placed)
    assert n_instances > len(scenes)  # several digits per scene on average


def test_scenes_are_deterministic_and_splits_use_disjoint_digits(scenes):
    again = DigitDetectionScenes("val", img_size=64, num_images=12)
    assert all(np.array_equal(np.asarray(scenes[i][0]), np.asarray(again[i][0])) for i in range(12))
    train = DigitDetectionScenes("train", img_size=64, num_images=12)
    train_digits = {p["digit"] for inst in train.instances for p in inst}
    assert train_digits <= set(digits_split_indices()[0].tolist())
    with pytest.raises(ValueError, match="split"):
        DigitDetectionScenes("test")
    with pytest.raises(ValueError, match="img_size"):
        DigitDetectionScenes("val", img_size=16)


def test_coco_export_round_trip_is_exact(scenes, tmp_path):
    from pycocotools import mask as mask_utils

    ann_file = export_coco(scenes, tmp_path / "val2017", tmp_path / "annotations" / "instances_val2017.json")
    coco = COCODetection(tmp_path / "val2017", ann_file)
    assert len(coco) == len(scenes) and coco.classes == scenes.classes and coco.category_ids == list(range(1, 11))
    for i in range(len(scenes)):
        (img_a, t_a), (img_b, t_b) = scenes[i], coco[i]
        assert np.array_equal(np.asarray(img_a), np.asarray(img_b))
        for key in ("boxes", "labels", "masks", "iscrowd", "image_id"):
            assert torch.equal(t_a[key], t_b[key]), key
    for ann in scenes.coco_dict()["annotations"]:  # json boxes are the tight boxes of the json masks
        assert mask_utils.toBbox(ann["segmentation"]).tolist() == ann["bbox"]
        assert mask_utils.area(ann["segmentation"]) == ann["area"] > 0


def _write_coco(tmp_path, annotations, images=None, categories=None):
    Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data = {"images": images if images is not None else [{"id": 5, "file_name": "a.png", "height": 10, "width": 12}],
            "annotations": annotations,
            "categories": categories if categories is not None else [{"id": 7, "name": "seven"},
                                                                     {"id": 3, "name": "three"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_masks_crowd_ignore_and_category_map(tmp_path):
    anns = [
        {"id": 1, "image_id": 5, "category_id": 7, "bbox": [2, 2, 4, 3], "segmentation": [[2, 2, 6, 2, 6, 5, 2, 5]]},
        {"id": 2, "image_id": 5, "category_id": 3, "bbox": [0, 0, 1, 5], "iscrowd": 1,
         "segmentation": {"size": [10, 12], "counts": [0, 5, 115]}},  # uncompressed RLE: column 0, rows 0-4
        {"id": 3, "image_id": 5, "category_id": 3, "bbox": [8, 1, 2, 2], "ignore": 1},  # no mask: the box
        {"id": 4, "image_id": 5, "category_id": 7, "bbox": [9, 6, 0.5, 3], "segmentation": []},  # degenerate
    ]
    coco = COCODetection(tmp_path, _write_coco(tmp_path, anns))
    assert coco.classes == ["three", "seven"] and coco.category_ids == [3, 7]
    image, t = coco[0]
    assert t["labels"].tolist() == [2, 1, 1, 2] and t["iscrowd"].tolist() == [0, 1, 1, 0]
    assert int(t["image_id"]) == 5
    rect = np.zeros((10, 12), dtype=np.uint8)
    rect[2:5, 2:6] = 1  # the polygon's 4 x 3 pixels
    assert np.array_equal(t["masks"][0].numpy(), rect)
    assert t["masks"][1].sum() == 5 and t["masks"][1][:5, 0].all()
    assert t["masks"][2].sum() == 4 and t["masks"][2][1:3, 8:10].all()
    assert t["boxes"][0].tolist() == [2, 2, 6, 5]
    assert [a["iscrowd"] for a in coco.coco_dict()["annotations"]] == [0, 1, 1, 0]
    # training targets keep only the non-crowd, non-degenerate instance; evaluation keeps all
    img, train_t, bad, _ = DetectionSamples(coco, train=True)[0]
    assert train_t["labels"].tolist() == [2] and train_t["masks"].shape == (1, 10, 12) and not bad
    assert img.shape == (3, 10, 12) and 0 <= img.min() and img.max() <= 1
    assert DetectionSamples(coco, train=False)[0][1]["labels"].shape == (4,)


@pytest.mark.parametrize("case, match", [
    ("not json", "not valid JSON"),
    ("no categories", "'categories'"),
    ("unknown image", "unknown image id"),
    ("unknown category", "unknown category id"),
    ("bad bbox", "bbox"),
    ("duplicate image", "duplicate image ids"),
    ("missing file", "missing from"),
    ("missing field", "'height'"),
])
def test_coco_bad_json_errors_name_the_problem(tmp_path, case, match):
    ann = {"id": 1, "image_id": 5, "category_id": 7, "bbox": [0, 0, 2, 2]}
    image = {"id": 5, "file_name": "a.png", "height": 10, "width": 12}
    if case == "not json":
        path = _write_coco(tmp_path, [ann])
        path.write_text("{images: [")
    elif case == "no categories":
        path = _write_coco(tmp_path, [ann])
        path.write_text(json.dumps({"images": [image], "annotations": [ann]}))
    elif case == "unknown image":
        path = _write_coco(tmp_path, [{**ann, "image_id": 6}])
    elif case == "unknown category":
        path = _write_coco(tmp_path, [{**ann, "category_id": 1}])
    elif case == "bad bbox":
        path = _write_coco(tmp_path, [{**ann, "bbox": [0, 0, -1, 2]}])
    elif case == "duplicate image":
        path = _write_coco(tmp_path, [ann], images=[image, dict(image)])
    elif case == "missing file":
        path = _write_coco(tmp_path, [ann], images=[image, {**image, "id": 6, "file_name": "gone.png"}])
    else:
        path = _write_coco(tmp_path, [ann], images=[{"id": 5, "file_name": "a.png", "width": 12}])
    with pytest.raises(ValueError, match=match):
        COCODetection(tmp_path, path)
    with pytest.raises(ValueError, match="does not exist"):
        COCODetection(tmp_path, tmp_path / "nope.json")


def test_unreadable_or_wrong_size_images_are_reported(tmp_path):
    path = _write_coco(tmp_path, [{"id": 1, "image_id": 5, "category_id": 7, "bbox": [0, 0, 2, 2]}])
    coco = COCODetection(tmp_path, path)
    Image.fromarray(np.zeros((11, 12, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(BadImageError, match="differs"):
        coco[0]
    (tmp_path / "a.png").write_bytes(b"not an image")
    image, target, bad, _ = DetectionSamples(coco, train=False)[0]
    assert image is None and target is None and bad[0][0].endswith("a.png")


def test_flip_keeps_boxes_on_masks_and_batches_pad(scenes):
    samples = DetectionSamples(scenes, train=True, hflip=1.0)
    img, t, _, _ = samples[0]
    assert torch.equal(img, DetectionSamples(scenes, train=False)[0][0].flip(-1))
    for box, mask in zip(t["boxes"], t["masks"]):
        rows, cols = np.nonzero(mask.numpy())
        assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    small = (torch.ones(3, 32, 40), {"labels": torch.zeros(0)}, [], [])
    batch = collate_detection([(img, t, [], []), small, (None, None, [("x", "bad")], [])])
    assert batch["image"].shape == (2, 3, 64, 64) and batch["sizes"].tolist() == [[64, 64], [32, 40]]
    assert batch["image"][1, :, 32:].abs().sum() == 0 and batch["bad"] == [("x", "bad")]
    assert len(batch["targets"]) == 2
