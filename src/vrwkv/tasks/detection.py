"""Object detection / instance segmentation: Mask R-CNN with FPN on a multi-scale VRWKV backbone, and COCO metrics.

The official recipe (spec §6.3, mmdet 2.28) is Mask R-CNN + FPN on the VRWKV-Adapter's 4 maps (FPN 256 channels,
5 levels; RPN anchors ratios 0.5/1/2 over strides 4-64; 2-FC box head; 4-conv mask head). Everything but the
backbone comes from torchvision: :class:`~torchvision.ops.FeaturePyramidNetwork` (+ max-pool level),
:class:`~torchvision.models.detection.MaskRCNN` (anchors, RPN, RoIAlign heads, losses, post-processing, resizing
and normalisation in ``GeneralizedRCNNTransform``). Evaluation is COCO's (pycocotools): box and mask AP,
AP50, AP75. No loops over data here: the engine drives the task.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

__all__ = ["DetectionTask", "MaskRCNNConfig", "VRWKVBackboneWithFPN", "VRWKVMaskRCNN", "coco_evaluate",
           "detections_to_coco", "layer_id_of"]

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


class VRWKVBackboneWithFPN(nn.Module):
    """torchvision's backbone contract for a VRWKV neck: ``body`` (``VRWKVAdapter`` or ``SimpleFeaturePyramid``,
    4 maps at strides 4-32) + :class:`~torchvision.ops.FeaturePyramidNetwork` with an extra max-pool level.

    Returns ``OrderedDict`` ``{"0": s4, "1": s8, "2": s16, "3": s32, "pool": s64}``, ``out_channels`` each (the
    role of torchvision's ``BackboneWithFPN``, whose layer getter needs a sequential backbone).
    """

    def __init__(self, body: nn.Module, out_channels: int = 256):
        super().__init__()
        in_channels = body.out_channels
        in_channels = list(in_channels) if isinstance(in_channels, (list, tuple)) else [int(in_channels)] * 4
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body(x)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


@dataclass
class MaskRCNNConfig:
    """Mask R-CNN settings (torchvision names). Defaults are the official/mmdet ones at COCO scale."""

    fpn_channels: int = 256
    min_size: list[int] = field(default_factory=lambda: [800])  # training short sides (random); eval uses the last
    max_size: int = 1333
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # one per FPN level
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    representation_size: int = 1024  # the 2-FC box head's width
    mask_channels: int = 256  # the 4-conv mask head's width
    box_score_thresh: float = 0.05
    box_detections_per_img: int = 100
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


class VRWKVMaskRCNN(MaskRCNN):
    """torchvision's :class:`~torchvision.models.detection.MaskRCNN` on a :class:`VRWKVBackboneWithFPN`, with the
    official layer-wise lr decay groups (``group_matcher``: patch/pos embedding first, block ``i`` next, everything
    else, i.e. adapter, FPN and heads, last).

    Args:
        backbone: the backbone with FPN (5 levels).
        num_classes: object categories + 1 (label 0 is the background).
        cfg: sizes and sampling settings.
    """

    def __init__(self, backbone: VRWKVBackboneWithFPN, num_classes: int, cfg: MaskRCNNConfig | None = None):
        cfg = cfg or MaskRCNNConfig()
        if num_classes < 2:
            raise ValueError(f"num_classes (categories + background) must be >= 2, got {num_classes}")
        for name in ("min_size", "anchor_sizes", "aspect_ratios", "image_mean", "image_std"):
            value = getattr(cfg, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
                raise ValueError(f"rcnn.{name} must be a list of numbers, got {value!r}")
        if len(cfg.anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per FPN level (5), got {cfg.anchor_sizes}")
        if not cfg.min_size or min(cfg.min_size) < 32:
            raise ValueError(f"min_size must list training short sides >= 32, got {cfg.min_size}")
        C = backbone.out_channels
        anchors = AnchorGenerator(tuple((int(s),) for s in cfg.anchor_sizes),
                                  (tuple(float(r) for r in cfg.aspect_ratios),) * 5)
        box_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
        mask_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=14, sampling_ratio=2)
        R, M = cfg.representation_size, cfg.mask_channels
        super().__init__(
            backbone, min_size=tuple(cfg.min_size), max_size=cfg.max_size, image_mean=list(cfg.image_mean),
            image_std=list(cfg.image_std), rpn_anchor_generator=anchors,
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test, rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
            box_roi_pool=box_pool, box_head=TwoMLPHead(C * 7 * 7, R), box_predictor=FastRCNNPredictor(R, num_classes),
            box_score_thresh=cfg.box_score_thresh, box_detections_per_img=cfg.box_detections_per_img,
            box_batch_size_per_image=cfg.box_batch_size_per_image, mask_roi_pool=mask_pool,
            mask_head=MaskRCNNHeads(C, [M] * 4, 1), mask_predictor=MaskRCNNPredictor(M, M, num_classes))
        self.num_classes = num_classes

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Official layer-wise lr decay groups (spec §6.3) for the adapter (``backbone.body.*``) or the simple
        pyramid (``backbone.body.backbone.*``)."""
        return dict(stem=r"^backbone\.body\.(?:backbone\.)?(?:pos_embed|patch_embed)",
                    blocks=r"^backbone\.body\.(?:backbone\.)?layers\.(\d+)")


# ------------------------------------------------------------------------------------------------ COCO metrics
def detections_to_coco(detections: list[dict[str, torch.Tensor]], image_ids: list[int], category_ids: list[int],
                       mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """torchvision outputs (``boxes`` xyxy, ``labels`` 1..K, ``scores``, optional ``masks [N, 1, h, w]``
    probabilities) as COCO result dicts (``bbox`` xywh, ``category_id``, ``score``, RLE ``segmentation``)."""
    from pycocotools import mask as mask_utils

    results = []
    for det, image_id in zip(detections, image_ids):
        boxes = det["boxes"].detach().float().cpu()
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        masks = det.get("masks")
        binary = (masks[:, 0] > mask_threshold).cpu().numpy() if masks is not None else None
        for j, (box, label, score) in enumerate(zip(boxes, det["labels"].tolist(), det["scores"].tolist())):
            r = {"image_id": int(image_id), "category_id": category_ids[label - 1], "bbox": box, "score": score}
            if binary is not None:
                rle = mask_utils.encode(np.asfortranarray(binary[j].astype(np.uint8)))
                r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            results.append(r)
    return results


def coco_evaluate(gt: dict[str, Any], results: list[dict[str, Any]],
                  iou_types: tuple[str, ...] = ("bbox", "segm")) -> dict[str, float]:
    """COCO AP (pycocotools' ``COCOeval``) of ``results`` against the instances dict ``gt``, in percent.

    Returns ``box_AP``, ``box_AP50``, ``box_AP75``, ``box_APs/m/l`` and the same with ``mask_`` (NaN where COCO
    reports -1: no ground truth of that size); 0 when there are no results. Mask AP uses the mask area for the
    size ranges (detections are loaded without their box, as detectron2 does).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
    out: dict[str, float] = {}
    for iou_type in iou_types:
        prefix = {"bbox": "box", "segm": "mask"}[iou_type]
        dts = results if iou_type == "bbox" else [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        if iou_type == "segm" and any("segmentation" not in r for r in dts):
            raise ValueError("mask AP needs a 'segmentation' in every result")
        if not dts:
            out.update({f"{prefix}_{n}": 0.0 for n in METRIC_NAMES})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(copy.deepcopy(dts))
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.params.imgIds = sorted(coco_gt.getImgIds())
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        out.update({f"{prefix}_{n}": (100.0 * float(s) if s >= 0 else math.nan)
                    for n, s in zip(METRIC_NAMES, evaluator.stats[:6])})
    return out


# ------------------------------------------------------------------------------------------------ task
class DetectionTask(nn.Module):
    """Wraps a :class:`VRWKVMaskRCNN` with the training loss for the shared ``Trainer``.

    Batches are dicts from :func:`vrwkv.data.detection.collate_detection`: padded ``image [B, 3, H, W]`` (0..1),
    ``sizes [B, 2]`` and ``targets`` (list of torchvision target dicts, moved to the images' device here).
    """

    def __init__(self, model: VRWKVMaskRCNN):
        super().__init__()
        self.model = model

    @staticmethod
    def images(batch: dict[str, Any]) -> list[torch.Tensor]:
        """The batch's images at their own sizes (padding removed)."""
        return [img[:, :h, :w] for img, (h, w) in zip(batch["image"], batch["sizes"].tolist())]

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"loss": sum, "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}``."""
        device = batch["image"].device
        targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
        losses = self.model(self.images(batch), targets)
        return {"loss": sum(losses.values()), **losses}

    @torch.no_grad()
    def predict_batch(self, batch: dict[str, Any], category_ids: list[int],
                      model: nn.Module | None = None) -> list[dict[str, Any]]:
        """COCO result dicts of a batch (image ids from the targets), in original image coordinates."""
        model = model if model is not None else self.model
        detections = model(self.images(batch))
        image_ids = [int(t["image_id"]) for t in batch["targets"]]
        return detections_to_coco(detections, image_ids, category_ids)


def layer_id_of(name: str, depth: int) -> int:
    """The official layer id of a :class:`VRWKVMaskRCNN` parameter for layer-wise lr decay (for reference/tests)."""
    import re

    if re.match(r"^backbone\.body\.(?:backbone\.)?(?:pos_embed|patch_embed)", name):
        return 0
    m = re.match(r"^backbone\.body\.(?:backbone\.)?layers\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else depth + 1
