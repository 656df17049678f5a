"""FCOS centerness on the classification tower (mmdet's default) beside torchvision's layout."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import fcos_resnet50_fpn
from torchvision.models.detection.fcos import FCOSHead

from maskd.models import build
from maskd.models.fcos_head import ClsCenternessFCOSHead


def fcos(centerness_on: str | None, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = {} if centerness_on is None else {"centerness_on": centerness_on}
    model, _ = build("fcos_resnet18_fpn", 3, min_size=64, max_size=96, **kwargs)
    return model


def levels(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 256, s, s, generator=g) for s in (8, 4)]


def head_outputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.head(levels())


def bump_tower(model: torch.nn.Module, branch: str) -> None:
    """Change every conv of one tower (the tower only, not its output convs)."""
    with torch.no_grad():
        for layer in getattr(model.head, branch).conv:
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.add_(0.05)


@pytest.mark.parametrize(
    ("centerness_on", "follows", "ignores"),
    [
        ("cls", "classification_head", "regression_head"),
        ("reg", "regression_head", "classification_head"),
        (None, "regression_head", "classification_head"),
    ],
)
def test_centerness_reads_only_its_tower(centerness_on, follows, ignores) -> None:
    model = fcos(centerness_on)
    before = head_outputs(model)
    bump_tower(model, ignores)
    after = head_outputs(model)
    assert torch.equal(after["bbox_ctrness"], before["bbox_ctrness"])
    bump_tower(model, follows)
    moved = head_outputs(model)
    assert not torch.allclose(moved["bbox_ctrness"], after["bbox_ctrness"])


def test_cls_centerness_is_the_conv_on_the_classification_tower() -> None:
    model = fcos("cls")
    head = model.head
    out = head_outputs(model)
    with torch.no_grad():
        expected = []
        for x in levels():
            c = head.classification_head.bbox_ctrness(head.classification_head.conv(x))
            expected.append(c.permute(0, 2, 3, 1).reshape(2, -1, 1))  # one anchor per place
        boxes = [
            torch.relu(head.regression_head.bbox_reg(head.regression_head.conv(x)))
            .permute(0, 2, 3, 1)
            .reshape(2, -1, 4)
            for x in levels()
        ]
    torch.testing.assert_close(out["bbox_ctrness"], torch.cat(expected, 1))
    torch.testing.assert_close(out["bbox_regression"], torch.cat(boxes, 1))
    assert out["cls_logits"].shape == (2, 8 * 8 + 4 * 4, 4)


def test_centerness_loss_trains_the_classification_tower_only() -> None:
    model = fcos("cls")
    model.train()
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 64, 80, generator=g)]
    targets = [{"boxes": torch.tensor([[8.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([2])}]
    losses = model(images, targets)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    losses["bbox_ctrness"].backward()
    cls_tower = model.head.classification_head.conv[0].weight.grad
    reg_tower = model.head.regression_head.conv[0].weight.grad
    assert cls_tower is not None and cls_tower.abs().sum() > 0
    assert reg_tower is None or torch.count_nonzero(reg_tower) == 0


def test_default_keeps_torchvision_layout_and_cls_moves_the_conv() -> None:
    default, cls = fcos(None), fcos("cls")
    assert type(default.head) is FCOSHead
    assert isinstance(cls.head, ClsCenternessFCOSHead)
    reference = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
    head_keys = {k for k in reference.state_dict() if k.startswith("head.")}
    assert {k for k in default.state_dict() if k.startswith("head.")} == head_keys
    moved = {
        k.replace("regression_head.bbox_ctrness", "classification_head.bbox_ctrness")
        for k in head_keys
    }
    assert {k for k in cls.state_dict() if k.startswith("head.")} == moved
    # a checkpoint of one layout does not load silently into the other
    with pytest.raises(RuntimeError, match="bbox_ctrness"):
        cls.load_state_dict(default.state_dict())


def test_centerness_option_errors() -> None:
    with pytest.raises(ValueError, match="centerness_on applies to FCOS only, not 'retinanet'"):
        build("retinanet_resnet18_fpn", 3, centerness_on="cls")
    with pytest.raises(ValueError, match="centerness_on must be 'reg' or 'cls', got 'box'"):
        build("fcos_resnet18_fpn", 3, centerness_on="box")
    head = ClsCenternessFCOSHead(256, 1, 4)
    with pytest.raises(ValueError, match="either head= or centerness_on='cls'"):
        build("fcos_resnet18_fpn", 3, centerness_on="cls", head=head)
