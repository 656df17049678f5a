"""Small torchvision detectors and a fixed batch, shared by the stage-1 and stage-2 tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

DETECTORS = {"retinanet": RetinaNet, "fcos": FCOS, "fasterrcnn": FasterRCNN}


def detector(
    kind: str, seed: int = 0, norm: type[nn.Module] = nn.BatchNorm2d, min_size: int = 64
) -> nn.Module:
    """A ResNet-18 FPN detector (P2–P6 for Faster R-CNN, P3–P7 otherwise), 3 classes."""
    torch.manual_seed(seed)
    extra: dict = {} if kind == "fasterrcnn" else {"returned_layers": [2, 3, 4]}
    if kind != "fasterrcnn":
        extra["extra_blocks"] = LastLevelP6P7(256, 256)
    backbone = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, trainable_layers=5, norm_layer=norm, **extra
    )
    extra = {}
    if kind == "fasterrcnn":  # few proposals keep the RoI head cheap
        extra = {
            "rpn_pre_nms_top_n_train": 200,
            "rpn_post_nms_top_n_train": 50,
            "rpn_pre_nms_top_n_test": 200,
            "rpn_post_nms_top_n_test": 50,
            "box_batch_size_per_image": 32,
        }
    return DETECTORS[kind](backbone, num_classes=3, min_size=min_size, max_size=96, **extra)


def detection_batch() -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Two 64x80 images with one box each."""
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 64, 80, generator=g) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[20.0, 10.0, 70.0, 60.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Copies of every tensor in the model's state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, Tensor)}
