"""A grid of dataset samples with their boxes or masks, drawn with matplotlib (Agg)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskd.data.factory import build_dataset
from maskd.data.transforms import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from maskd.errors import UserValueError

_COLOURS = ("#e6194b", "#3cb44b", "#ffe119", "#0082c8", "#f58231", "#911eb4", "#46f0f0",
            "#f032e6", "#d2f53c", "#fabebe", "#008080", "#e6beff", "#aa6e28", "#800000")  # fmt: skip


def _colour(label: int) -> str:
    return _COLOURS[(label - 1) % len(_COLOURS)]


def _denormalise(image: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def preview(
    dataset_root: str | Path,
    task: str,
    out_png: str | Path,
    n: int = 8,
    split: str = "val",
    kind: str | None = None,
) -> Path:
    """Draw the first `n` samples of a dataset into `out_png`.

    detection: each image with its boxes and class names; segmentation: each image next
    to its colour-coded mask (ignored pixels white) with a class legend. The dataset is read
    with `build_dataset(kind, dataset_root, split)`; `kind` defaults to "coco" for
    detection and "folder" for segmentation (the synthetic layouts). Returns `out_png`.
    """
    # matplotlib loads here, not at import: training code never pays for it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if task not in ("detection", "segmentation"):
        raise UserValueError(f"task must be 'detection' or 'segmentation', got {task!r}")
    kind = kind or ("coco" if task == "detection" else "folder")
    dataset = build_dataset(kind, dataset_root, split)
    n = min(n, len(dataset))
    if n <= 0:
        raise UserValueError(f"nothing to preview: n={n}, {len(dataset)} samples in {dataset_root}")
    panels = n if task == "detection" else 2 * n
    cols = min(panels, 4 if task == "detection" else 6)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(2.6 * cols, 2.6 * rows + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(rows * cols)]
    for ax in axes:
        ax.set_axis_off()
    names = list(dataset.class_names)
    for i in range(n):
        image, target = dataset[i]
        if task == "detection":
            _draw_detection(axes[i], image, target, names)
        else:
            _draw_segmentation(axes[2 * i], axes[2 * i + 1], image, target, dataset.num_classes)
    if task == "segmentation":
        handles = [
            Patch(color=_colour(c) if c else "black", label=name) for c, name in enumerate(names)
        ]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 if task == "segmentation" else 0, 1, 1))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png


def _draw_detection(ax: Any, image: torch.Tensor, target: dict, names: list[str]) -> None:
    from matplotlib.patches import Rectangle

    ax.imshow(image.permute(1, 2, 0).numpy())
    for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
        x0, y0, x1, y1 = box
        colour = _colour(label)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1.2))
        ax.text(x0, y0 - 1, names[label - 1], color="black", fontsize=6, va="bottom",
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 0.5, "lw": 0})  # fmt: skip
    ax.set_title(f"image {target['image_id']}", fontsize=8)


def _draw_segmentation(
    ax_img: Any, ax_mask: Any, image: torch.Tensor, mask: torch.Tensor, k: int
) -> None:
    from matplotlib.colors import to_rgb

    ax_img.imshow(_denormalise(image))
    lut = np.zeros((256, 3), dtype=np.float32)
    lut[1:k] = [to_rgb(_colour(c)) for c in range(1, k)]
    lut[IGNORE_INDEX] = 1.0
    ax_mask.imshow(lut[mask.numpy().astype(np.uint8)], interpolation="nearest")
