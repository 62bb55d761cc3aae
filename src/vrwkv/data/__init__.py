"""Data: the bundled digits, ImageNet-layout folders, transforms, seeded per-sample pipeline, DDP sampler."""
from vrwkv.data.config import DataConfig
from vrwkv.data.digits import DIGITS_CLASSES, DigitsDataset
from vrwkv.data.image_folder import BadImageError, ImageFolderDataset, load_rgb, to_rgb
from vrwkv.data.pipeline import TransformedDataset, collate_samples, sample_rng
from vrwkv.data.sampler import ShardedSampler
from vrwkv.data.transforms import build_transform

__all__ = [
    "DataConfig", "DIGITS_CLASSES", "DigitsDataset", "BadImageError", "ImageFolderDataset", "load_rgb", "to_rgb",
    "TransformedDataset", "collate_samples", "sample_rng", "ShardedSampler", "build_transform", "build_datasets",
]


def build_datasets(cfg: DataConfig) -> tuple[object, object, list[str]]:
    """The raw (train, val) data sets named by ``cfg.dataset`` and their class names."""
    if cfg.dataset == "digits":
        return DigitsDataset("train", cfg.img_size), DigitsDataset("val", cfg.img_size), list(DIGITS_CLASSES)
    train = ImageFolderDataset(cfg.dataset, cfg.train_split, on_bad_image=cfg.on_bad_image)
    val = ImageFolderDataset(cfg.dataset, cfg.val_split, classes=train.classes, on_bad_image=cfg.on_bad_image)
    return train, val, train.classes
