"""FCOS scale ranges per level (``regress_ranges``) against torchvision's fixed ones."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maskd.errors import UserValueError
from maskd.models import build
from maskd.models.fcos_ranges import RangedFCOS, match_locations

TORCHVISION_RANGES = [[0, 64], [64, 128], [128, 256], [256, 512], [512, math.inf]]


def fcos(seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    model, _ = build("fcos_resnet18_fpn", 3, min_size=64, max_size=64, **options)
    return model


def batch(seed: int = 3) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Three 64 px images: boxes of 6–40 px, one image without any."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(3)]
    targets = []
    for count in (3, 2, 0):
        xy = torch.rand(count, 2, generator=g) * 30
        wh = 6 + torch.rand(count, 2, generator=g) * 34
        boxes = torch.cat([xy, (xy + wh).clamp(max=64)], 1)
        labels = torch.randint(1, 4, (count,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def brute_force(points, strides, ranges_per_point, boxes, radius=1.5) -> list[int]:
    """FCOS's rule, location by location and box by box."""
    out = []
    for (x, y), s, (low, high) in zip(
        points.tolist(), strides.tolist(), ranges_per_point, strict=True
    ):
        best, best_area = -1, math.inf
        for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            d = (x - x0, y - y0, x1 - x, y1 - y)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            if max(abs(x - cx), abs(y - cy)) >= radius * s or min(d) <= 0:
                continue
            if not low < max(d) < high:
                continue
            area = (x1 - x0) * (y1 - y0)
            if area < best_area:
                best, best_area = i, area
        out.append(best)
    return out


def test_torchvision_ranges_give_torchvision_loss_exactly() -> None:
    images, targets = batch()
    plain, ranged = fcos(), fcos(regress_ranges=TORCHVISION_RANGES)
    assert type(plain) is not RangedFCOS and isinstance(ranged, RangedFCOS)
    ranged.load_state_dict(plain.state_dict())
    plain.train(), ranged.train()
    a, b = plain(images, targets), ranged(images, targets)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_smaller_ranges_move_positives_to_higher_levels() -> None:
    """At 64 px every positive sits on P3 under torchvision's ranges; scaled ranges use P4."""
    images, targets = batch()
    levels = {}
    quarter = [[0, 16], [16, 32], [32, 64], [64, 128], [128, "inf"]]
    for name, ranges in {"torchvision": TORCHVISION_RANGES, "quarter": quarter}.items():
        model = fcos(regress_ranges=ranges)
        seen = {}

        def spy(targets, head_outputs, anchors, matched, seen=seen):
            seen["matched"] = matched
            return {}

        model.head.compute_loss = spy
        model.train()
        model(images, targets)
        counts = [8 * 8, 4 * 4, 2 * 2, 1, 1]
        per_level = [m.split(counts) for m in seen["matched"]]
        levels[name] = [sum(int((p[lv] >= 0).sum()) for p in per_level) for lv in range(5)]
    assert levels["torchvision"][0] > 0 and sum(levels["torchvision"][1:]) == 0
    assert levels["quarter"][1] > 0


@settings(max_examples=40, deadline=None)
@given(
    boxes=st.lists(
        st.tuples(st.floats(0, 50), st.floats(0, 50), st.floats(1, 40), st.floats(1, 40)),
        max_size=4,
    ),
    cut=st.floats(1, 40),
)
def test_matching_equals_the_rule_location_by_location(boxes, cut) -> None:
    xs = torch.arange(4) * 16 + 8.0
    points = torch.cartesian_prod(xs, xs)
    strides = torch.full((16,), 16.0)
    low = torch.tensor([0.0] * 8 + [cut] * 8)
    high = torch.tensor([cut] * 8 + [math.inf] * 8)
    b = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes], dtype=torch.float32)
    b = b.reshape(-1, 4)
    got = match_locations(points, strides, low, high, b, 1.5).tolist()
    want = brute_force(points, strides, list(zip(low.tolist(), high.tolist(), strict=True)), b)
    assert got == want


@pytest.mark.parametrize(
    ("ranges", "says"),
    [
        ([[0, 64]] * 4, "5 pairs"),
        ("0-64", "5 pairs"),
        (
            [[0, 64], [64, 128], [128, 256], [256, 512], [512]],
            r"regress_ranges\[4\] must be a pair",
        ),
        ([[0, 64], [64, 128], [128, 256], [256, 512], [512, "lots"]], "numbers"),
        ([[0, 64], [64, 128], [128, 256], [256, 512], [512, None]], "numbers"),
        (
            [[0, 64], [64, 128], [256, 128], [256, 512], [512, 1e9]],
            r"regress_ranges\[2\] needs low < high",
        ),
        ([[0, float("nan")], [64, 128], [128, 256], [256, 512], [512, 1e9]], "low < high"),
    ],
)
def test_bad_ranges_are_named(ranges, says) -> None:
    with pytest.raises(UserValueError, match=says):
        fcos(regress_ranges=ranges)


def test_ranges_apply_to_fcos_only() -> None:
    with pytest.raises(UserValueError, match="FCOS only"):
        build(
            "retinanet_resnet18_fpn", 3, min_size=64, max_size=64, regress_ranges=TORCHVISION_RANGES
        )


def test_ranges_keep_weights_and_inference() -> None:
    plain, ranged = (
        fcos(),
        fcos(regress_ranges=[[0, 16], [16, 32], [32, 64], [64, 128], [128, 1e8]]),
    )
    assert plain.state_dict().keys() == ranged.state_dict().keys()
    ranged.load_state_dict(plain.state_dict())
    plain.eval(), ranged.eval()
    images, _ = batch()
    with torch.no_grad():
        a, b = plain(images), ranged(images)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["scores"], y["scores"])
