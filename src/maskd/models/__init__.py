"""Registry of detectors and segmenters that follow the task-model contract.

>>> model, layers = build("retinanet_resnet18_fpn", num_classes=3, min_size=128, max_size=128)
>>> layers
['backbone.fpn']
"""

from maskd.models.registry import (
    REGISTRY,
    ModelInfo,
    ModelSpec,
    available,
    build,
    describe,
    get_spec,
    task_of,
)
from maskd.models.resnet_dilated import DilatedBasicBlock, resnet18_dilated
from maskd.models.weights import load_backbone_weights, load_checkpoint, read_state_dict

__all__ = [
    "REGISTRY",
    "DilatedBasicBlock",
    "ModelInfo",
    "ModelSpec",
    "available",
    "build",
    "describe",
    "get_spec",
    "load_backbone_weights",
    "load_checkpoint",
    "read_state_dict",
    "resnet18_dilated",
    "task_of",
]
