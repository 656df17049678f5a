"""Datasets, transforms and a synthetic dataset.

Detection datasets yield `(image float32 [3, H, W] in [0, 1], target)` with target
`boxes` [K, 4] XYXY px, `labels` [K] int64 in 1..num_classes, `image_id`, `orig_size`;
batch them with `detection_collate`. Segmentation datasets yield
`(image float32 [3, H, W] ImageNet-normalised, mask int64 [H, W])`, 255 = ignore.
"""

from maskd.data.coco import CocoDetection
from maskd.data.collate import collate_for, detection_collate
from maskd.data.factory import KINDS, build_dataset, coco_paths, task_of
from maskd.data.files import BadSampleError
from maskd.data.preview import preview
from maskd.data.segmentation import (
    CITYSCAPES_CLASSES,
    VOC_CLASSES,
    CityscapesSegmentation,
    FolderSegmentation,
    SegmentationFiles,
    VOCSegmentation,
)
from maskd.data.transforms import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomScale,
    build_transforms,
    detection_transforms,
    segmentation_transforms,
)

__all__ = [
    "CITYSCAPES_CLASSES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KINDS",
    "VOC_CLASSES",
    "BadSampleError",
    "CityscapesSegmentation",
    "CocoDetection",
    "FolderSegmentation",
    "RandomScale",
    "SegmentationFiles",
    "VOCSegmentation",
    "build_dataset",
    "build_transforms",
    "coco_paths",
    "collate_for",
    "detection_collate",
    "detection_transforms",
    "preview",
    "segmentation_transforms",
    "task_of",
]
