"""Joint image / box / mask transforms built on `torchvision.transforms.v2`.

Datasets wrap their raw sample in `tv_tensors` (`Image` uint8 [3, H, W],
`BoundingBoxes` XYXY [K, 4], `Mask` [H, W]) and call the pipeline once, so every
geometric op moves the image, its boxes and its mask together. The pipelines from
`build_transforms` end with the dtype conversion (and, for segmentation, ImageNet
normalisation), so their output already meets the data contract of `docs/design.md`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from maskd.errors import UserValueError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255
# Target entries with one row per box; they are filtered together with the boxes.
PER_BOX_KEYS = ("labels", "iscrowd", "area")
TASKS = ("detection", "segmentation")

Size = int | tuple[int, int]


def per_box_fields(inputs: Any) -> tuple[torch.Tensor, ...] | None:
    """`SanitizeBoundingBoxes` labels getter: every per-box tensor in the target dict."""
    items = inputs if isinstance(inputs, tuple | list) else (inputs,)
    target = next((x for x in items if isinstance(x, dict)), None)
    if target is None:
        return None
    return tuple(target[k] for k in PER_BOX_KEYS if k in target)


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from `scale_range`, relative to the input size.

    Images use bilinear interpolation, masks nearest-exact (no new class values).
    The factor comes from torch's RNG, like every other v2 random transform.
    """

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        super().__init__()
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise UserValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.scale_range = (lo, hi)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        spatial = [x for x in flat_inputs if isinstance(x, tv_tensors.Image | tv_tensors.Mask)]
        if not spatial:
            raise UserValueError("RandomScale needs a tv_tensors.Image or tv_tensors.Mask input")
        h, w = F.get_size(spatial[0])
        lo, hi = self.scale_range
        r = float(torch.empty(1).uniform_(lo, hi))
        return {"size": [max(1, round(h * r)), max(1, round(w * r))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        mode = (
            InterpolationMode.NEAREST_EXACT
            if isinstance(inpt, tv_tensors.Mask)
            else InterpolationMode.BILINEAR
        )
        return self._call_kernel(F.resize, inpt, params["size"], interpolation=mode, antialias=True)


def _resize(size: Size, max_size: int | None) -> v2.Resize:
    """int: shorter side to `size` (longer side capped at `max_size`); (h, w): exact."""
    if isinstance(size, int):
        return v2.Resize(size, max_size=max_size, antialias=True)
    return v2.Resize(list(_pair(size)), antialias=True)


def _pair(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        pair = (size, size)
    elif isinstance(size, Sequence) and len(size) == 2:
        pair = (int(size[0]), int(size[1]))
    else:
        raise UserValueError(f"size must be an int or an (height, width) pair, got {size!r}")
    if min(pair) <= 0:
        raise UserValueError(f"size must be positive, got {size!r}")
    return pair


def detection_transforms(
    train: bool,
    size: Size | None = None,
    *,
    scale_range: tuple[float, float] | None = None,
    hflip: float = 0.5,
    max_size: int | None = None,
) -> v2.Compose:
    """Pipeline for `(Image, target)` detection samples → float image in [0, 1].

    train: optional scale jitter (`scale_range`, relative to `size`), random horizontal flip.
    `size`: None keeps the image (torchvision detectors resize internally); an int resizes
    the shorter side; (h, w) resizes exactly. Boxes are clamped to the image and boxes
    smaller than 1 px are removed with their labels.
    """
    ops: list[Callable[..., Any]] = []
    if train and scale_range is not None:
        if size is None:
            raise UserValueError("detection scale jitter needs a target size (size=...)")
        ops.append(v2.ScaleJitter(_pair(size), scale_range=tuple(scale_range), antialias=True))
    elif size is not None:
        _pair(size)
        ops.append(_resize(size, max_size))
    if train and hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p=hflip))
    ops += [
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1, labels_getter=per_box_fields),
        v2.ToDtype(torch.float32, scale=True),
    ]
    return v2.Compose(ops)


def segmentation_transforms(
    train: bool,
    size: Size | None = None,
    *,
    scale_range: tuple[float, float] | None = (0.5, 2.0),
    hflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Pipeline for `(Image, Mask)` segmentation samples → normalised float image.

    train: random scale (`scale_range`), random crop of `size` (padding the image with 0
    and the mask with 255 where the scaled image is smaller), random horizontal flip.
    eval: `size` None keeps the image; an int resizes the shorter side; (h, w) exactly.
    """
    ops: list[Callable[..., Any]] = []
    if train:
        if size is None:
            raise UserValueError(
                "segmentation training needs a crop size to batch samples (data.size)"
            )
        if scale_range is not None:
            ops.append(RandomScale(scale_range))
        fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
        ops.append(v2.RandomCrop(list(_pair(size)), pad_if_needed=True, fill=fill))
        if hflip > 0:
            ops.append(v2.RandomHorizontalFlip(p=hflip))
    elif size is not None:
        ops.append(_resize(size, None))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)


def build_transforms(task: str, train: bool, size: Size | None = None, **kwargs: Any) -> v2.Compose:
    """Standard pipeline for `task` ("detection" | "segmentation"); see the two builders.

    Extra keyword arguments (`scale_range`, `hflip`, `max_size`, `mean`, `std`) go to
    `detection_transforms` / `segmentation_transforms`.
    """
    builders = {"detection": detection_transforms, "segmentation": segmentation_transforms}
    if task not in builders:
        raise UserValueError(f"unknown task {task!r}; expected one of {TASKS}")
    builder = builders[task]
    valid = [
        n for n, p in inspect.signature(builder).parameters.items() if p.kind == p.KEYWORD_ONLY
    ]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise UserValueError(
            f"{'train' if train else 'val'}_transforms: unknown option(s) {unknown} for "
            f"{task}; valid: {valid}"
        )
    return builder(train, size, **kwargs)


def finalize_detection(
    image: torch.Tensor, target: dict[str, Any]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Plain tensors out: image float32 [3, H, W] in [0, 1], boxes float32 [K, 4]."""
    image = image.as_subclass(torch.Tensor)
    if not image.is_floating_point():
        image = F.to_dtype(image, torch.float32, scale=True)
    out = dict(target)
    out["boxes"] = target["boxes"].as_subclass(torch.Tensor).to(torch.float32).reshape(-1, 4)
    for key in PER_BOX_KEYS:
        if key in out:
            out[key] = out[key].as_subclass(torch.Tensor)
    return image.to(torch.float32), out


def finalize_segmentation(
    image: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain tensors out: image float32 [3, H, W] (normalised), mask int64 [H, W].

    A uint8 image left by a custom pipeline is converted and ImageNet-normalised here,
    so the dataset contract holds whatever the transforms did.
    """
    image = image.as_subclass(torch.Tensor)
    if not image.is_floating_point():
        image = F.normalize(
            F.to_dtype(image, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD
        )
    mask = mask.as_subclass(torch.Tensor)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    return image.to(torch.float32), mask.to(torch.int64)
