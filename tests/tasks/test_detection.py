"""Mask R-CNN on VRWKV necks (torchvision heads): shapes, losses, gradients, lr-decay groups; COCO metrics against
cases with known answers."""
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch

from vrwkv.data.detection import DetectionSamples, DigitDetectionScenes, collate_detection, encode_mask
from vrwkv.tasks.detection import (DetectionTask, MaskRCNNConfig, VRWKVBackboneWithFPN, VRWKVMaskRCNN, coco_evaluate,
                                   detections_to_coco, layer_id_of)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_RCNN = MaskRCNNConfig(fpn_channels=16, min_size=[64], max_size=128, anchor_sizes=[8, 16, 32, 64, 128],
                           rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=20, rpn_pre_nms_top_n_test=50,
                           rpn_post_nms_top_n_test=20, rpn_batch_size_per_image=32, box_batch_size_per_image=16,
                           representation_size=32, mask_channels=8)


def _tiny_model(neck: str = "adapter") -> VRWKVMaskRCNN:
    import vrwkv
    from vrwkv.models.adapter import SimpleFeaturePyramid, create_vrwkv_adapter

    torch.manual_seed(0)
    if neck == "adapter":
        body = create_vrwkv_adapter("test_vrwkv", add_rwkv_feature="detection")
    else:
        body = SimpleFeaturePyramid(vrwkv.create_model("test_vrwkv", num_classes=0, img_size=64), 16)
    return VRWKVMaskRCNN(VRWKVBackboneWithFPN(body, 16), num_classes=11, cfg=TINY_RCNN)


@pytest.fixture(scope="module")
def batch():
    scenes = DigitDetectionScenes("train", img_size=64, num_images=2)
    return collate_detection([DetectionSamples(scenes, train=True)[i] for i in range(2)])


def test_backbone_with_fpn_gives_five_levels():
    model = _tiny_model()
    maps = model.backbone(torch.randn(1, 3, 64, 96))
    assert isinstance(maps, OrderedDict) and list(maps) == ["0", "1", "2", "3", "pool"]
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert all(m.shape[1] == model.backbone.out_channels == 16 for m in maps.values())


@pytest.mark.parametrize("neck", ["adapter", "simple"])
def test_training_losses_and_gradients(neck, batch):
    model = _tiny_model(neck)
    task = DetectionTask(model).train()
    out = task(batch)
    assert set(out) == {"loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in out.values())
    assert torch.allclose(out["loss"], sum(v for k, v in out.items() if k != "loss"))
    out["loss"].backward()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}  # an image with only crowd regions
    negative = task({**batch, "targets": [batch["targets"][0], empty]})
    assert torch.isfinite(negative["loss"])
    first_block = next(p for n, p in model.named_parameters() if ".layers.0." in n)
    for part in (first_block, model.roi_heads.mask_predictor.mask_fcn_logits.weight,
                 model.rpn.head.cls_logits.weight, model.backbone.fpn.inner_blocks[0][0].weight):
        assert part.grad is not None and part.grad.abs().sum() > 0


def test_inference_outputs_and_coco_results(batch):
    model = _tiny_model().eval()
    task = DetectionTask(model)
    with torch.no_grad():
        (det,) = model([batch["image"][0, :, :, :48]])  # any size: the transform pads to multiples of 32
    n = det["boxes"].shape[0]
    assert det["masks"].shape == (n, 1, 64, 48) and det["labels"].min() >= 1 and det["scores"].max() <= 1
    category_ids = list(range(101, 111))
    results = task.predict_batch(batch, category_ids)
    assert results and all(r["category_id"] in category_ids and r["image_id"] in (1, 2) for r in results)
    dets = {"boxes": torch.tensor([[1.0, 2.0, 5.0, 10.0]]), "labels": torch.tensor([3]),
            "scores": torch.tensor([0.9]), "masks": torch.zeros(1, 1, 12, 8).index_fill_(2, torch.tensor([2, 3]), 0.7)}
    (r,) = detections_to_coco([dets], [7], category_ids)
    assert r["bbox"] == [1.0, 2.0, 4.0, 8.0] and r["category_id"] == 103 and r["image_id"] == 7
    from pycocotools import mask as mask_utils

    assert mask_utils.area(r["segmentation"]) == 16  # rows 2-3 of a 12 x 8 mask are above 0.5


def test_layer_decay_groups_follow_the_official_layer_ids():
    from vrwkv.engine.config import OptimConfig
    from vrwkv.engine.optim import build_optimizer

    model = _tiny_model()
    depth = model.backbone.body.depth
    opt = build_optimizer(model, OptimConfig(lr=1.0, layer_decay=0.5))
    scale_of = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    checked = set()
    for name, p in names.items():
        expected = 0.5 ** (depth + 1 - layer_id_of(name, depth))
        assert math.isclose(scale_of[id(p)], expected), name
        checked.add(layer_id_of(name, depth))
    assert checked == set(range(depth + 2))
    assert layer_id_of("backbone.body.patch_embed.projection.weight", depth) == 0
    assert layer_id_of("backbone.body.layers.2.att.key.weight", depth) == 3
    assert layer_id_of("roi_heads.box_head.fc6.weight", depth) == depth + 1


def test_config_errors():
    body = _tiny_model().backbone
    with pytest.raises(ValueError, match="anchor_sizes"):
        VRWKVMaskRCNN(body, 3, MaskRCNNConfig(anchor_sizes=[8, 16]))
    with pytest.raises(ValueError, match="min_size must be a list"):
        VRWKVMaskRCNN(body, 3, MaskRCNNConfig(min_size=128))
    with pytest.raises(ValueError, match="num_classes"):
        VRWKVMaskRCNN(body, 1, TINY_RCNN)


# ------------------------------------------------------------------------------------------------ COCO metrics
def _square(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _gt():
    masks = [_square(20, 30, 0, 10, 0, 10), _square(20, 30, 5, 15, 12, 28), _square(20, 30, 2, 12, 2, 12)]
    anns = [{"id": i + 1, "image_id": img, "category_id": cat, "bbox": bbox, "area": float(m.sum()),
             "segmentation": encode_mask(m), "iscrowd": 0}
            for i, (img, cat, bbox, m) in enumerate(zip([1, 1, 2], [4, 9, 4], [[0, 0, 10, 10], [12, 5, 16, 10],
                                                                                  [2, 2, 10, 10]], masks))]
    images = [{"id": i, "file_name": f"{i}.png", "height": 20, "width": 30} for i in (1, 2)]
    return {"images": images, "annotations": anns, "categories": [{"id": 4, "name": "a"}, {"id": 9, "name": "b"}]}


def test_coco_ap_perfect_predictions_score_100():
    gt = _gt()
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in gt["annotations"]]
    m = coco_evaluate(gt, results)
    for key in ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75", "box_APs"):
        assert m[key] == pytest.approx(100.0), key
    assert math.isnan(m["box_APl"])  # no large objects: COCO reports -1


def test_coco_ap_known_partial_overlaps():
    gt = _gt()
    gt["images"], gt["annotations"] = gt["images"][:1], gt["annotations"][:1]
    # box IoU 0.62 matches at thresholds 0.50, 0.55, 0.60 only: AP = 3/10; mask IoU 80/100 matches up to 0.80: 7/10
    result = {"image_id": 1, "category_id": 4, "bbox": [0, 0, 10, 6.2], "score": 0.8,
              "segmentation": encode_mask(_square(20, 30, 0, 8, 0, 10))}
    m = coco_evaluate(gt, [result])
    assert m["box_AP"] == pytest.approx(30.0) and m["box_AP50"] == pytest.approx(100.0) and m["box_AP75"] == 0.0
    assert m["mask_AP"] == pytest.approx(70.0) and m["mask_AP75"] == pytest.approx(100.0)
    wrong_class = coco_evaluate(gt, [{**result, "category_id": 9}])
    assert wrong_class["box_AP"] == 0.0 and wrong_class["mask_AP"] == 0.0
    assert coco_evaluate(gt, [])["mask_AP"] == 0.0
    with pytest.raises(ValueError, match="segmentation"):
        coco_evaluate(gt, [{k: v for k, v in result.items() if k != "segmentation"}])


def test_coco_ap_crowd_regions_are_ignored():
    gt = _gt()
    gt["annotations"][1]["iscrowd"] = 1  # a detection on the crowd region is neither a hit nor a false positive
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in gt["annotations"]]
    assert coco_evaluate(gt, results)["box_AP"] == pytest.approx(100.0)
    gt["annotations"][1]["iscrowd"] = 0
    assert coco_evaluate(gt, [r for r in results if r["category_id"] == 4])["box_AP"] == pytest.approx(50.0)


def test_official_dense_checkpoint_initialises_the_adapter(tmp_path):
    """An mmdet-style file (``backbone.*`` adapter keys plus mmdet neck/head keys) loads into the detector's
    adapter; the mmdet heads are left out (torchvision's heads have other names)."""
    from vrwkv.engine.detection import DetModelConfig, build_detector
    from vrwkv.models.adapter import create_vrwkv_adapter

    torch.manual_seed(1)
    source = create_vrwkv_adapter("test_vrwkv", add_rwkv_feature="detection")
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    state["neck.fpn_convs.0.conv.weight"] = torch.zeros(256, 256, 3, 3)
    state["rpn_head.rpn_cls.weight"] = torch.zeros(3, 256, 1, 1)
    torch.save({"state_dict": state, "meta": {}}, tmp_path / "mask_rcnn_official.pth")
    cfg = DetModelConfig(backbone="test_vrwkv", checkpoint=str(tmp_path / "mask_rcnn_official.pth"), rcnn=TINY_RCNN)
    model = build_detector(cfg, num_classes=81)
    own = model.backbone.body.state_dict()
    assert all(torch.equal(own[k], v) for k, v in source.state_dict().items())
    assert model.roi_heads.box_predictor.cls_score.out_features == 81
