"""Token masks over images, and loss curves, as PNG files.

:func:`token_masks` runs a model up to its tapped layers and applies the receptive tokens
of every level; :func:`token_summary` says what each token covers and how much the weighting
head uses it; :func:`mask_grid` lays the masks over the images (rows: images, columns:
tokens) into one RGB array per level; :func:`save_mask_png` writes all levels into one PNG.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskd.errors import UserValueError
from maskd.recorder import Record, Recorder
from maskd.taps import eval_mode, level_names, recorded_levels, resize_records, resized_batch
from maskd.tokens import ReceptiveTokens

__all__ = [
    "load_images",
    "loss_curves",
    "mask_grid",
    "read_csv_logs",
    "save_loss_png",
    "save_mask_png",
    "summary_lines",
    "token_masks",
    "token_masks_and_summary",
    "token_summary",
]


def _save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out ``fig``, write it as a PNG at ``path`` (folders created) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def _token_features(
    model: nn.Module, tokens: Mapping[str, Sequence[ReceptiveTokens]], images: Sequence[Tensor]
) -> tuple[list[tuple[str, ReceptiveTokens, Tensor]], Any, tuple[int, int]]:
    """One eval forward up to the tapped layers: ``[(level, tokens, feature [N, C, h, w])]``,
    the detector's resized batch (or ``None``) and the images' ``(H, W)``."""
    layers = list(tokens)
    records = {path: Record(path) for path in layers}
    rec = Recorder(model, {**records, **resize_records(model)}, stop=True)
    device = next(model.parameters()).device
    batch = torch.stack([img.to(device) for img in images])
    with eval_mode(model):
        rec.run(batch)
    feats = recorded_levels(rec, layers)
    resized = resized_batch(rec)
    out = []
    for path in layers:
        names = level_names(path, rec[path])
        group = list(tokens[path])
        if len(group) != len(names):
            raise UserValueError(
                f"layer {path!r} has {len(names)} levels {names} but {len(group)} token sets"
            )
        out += [(name, tok.to(device), feats[name]) for name, tok in zip(names, group, strict=True)]
    rec.clear()
    return out, resized, (batch.shape[-2], batch.shape[-1])


def _over_image(m: Tensor, resized: Any, i: int) -> Tensor:
    """Image ``i``'s masks ``[1, T, h, w]`` cut to the part over the image: a detector
    resizes and pads its batch, and the padding is not the image's."""
    if resized is None:
        return m
    (ih, iw), (ph, pw) = resized.image_sizes[i], resized.padded
    return m[..., : max(1, round(m.shape[-2] * ih / ph)), : max(1, round(m.shape[-1] * iw / pw))]


@torch.no_grad()
def token_masks(
    model: nn.Module, tokens: Mapping[str, Sequence[ReceptiveTokens]], images: Sequence[Tensor]
) -> dict[str, list[Tensor]]:
    """Every token's mask on every image, at image resolution.

    Args:
        model: the (teacher) task model the tokens were learned on.
        tokens: ``{layer path: [ReceptiveTokens per level]}``.
        images: ``[3, H, W]`` tensors of one size, as the model takes them.

    Returns:
        ``{level name: [masks [T, H, W] per image]}`` with values in (0, 1).
    """
    return token_masks_and_summary(model, tokens, images, summary=False)[0]


@torch.no_grad()
def token_summary(
    model: nn.Module, tokens: Mapping[str, Sequence[ReceptiveTokens]], images: Sequence[Tensor]
) -> dict[str, dict[str, list[float] | None]]:
    """What each token covers and how much the weighting head uses it, over ``images``.

    A head that gives one token all the weight, or a token that covers every position, is
    what a user looks for first: then the level distils one region, or all of it.

    Returns:
        ``{level name: {"coverage": [T], "weight": [T] or None}}``: a token's mean mask
        value over the positions of the feature map that lie over the images, and its mean
        head weight over the images (``None`` for tokens without a head).
    """
    return token_masks_and_summary(model, tokens, images, masks=False)[1]


@torch.no_grad()
def token_masks_and_summary(
    model: nn.Module,
    tokens: Mapping[str, Sequence[ReceptiveTokens]],
    images: Sequence[Tensor],
    masks: bool = True,
    summary: bool = True,
) -> tuple[dict[str, list[Tensor]], dict[str, dict[str, list[float] | None]]]:
    """:func:`token_masks` and :func:`token_summary` from one forward of ``model`` (either
    left empty when not asked for)."""
    levels, resized, size = _token_features(model, tokens, images)
    out_masks: dict[str, list[Tensor]] = {}
    out_summary: dict[str, dict[str, list[float] | None]] = {}
    for name, tok, feat in levels:
        m = tok(feat).float()  # [N, T, h', w']
        over = [_over_image(m[i : i + 1], resized, i) for i in range(len(images))]
        if masks:
            out_masks[name] = [F.interpolate(o.cpu(), size=size, mode="bilinear")[0] for o in over]
        if summary:
            weights = tok.token_weights(feat)
            cover = torch.stack([o[0].mean(dim=(1, 2)) for o in over]).mean(0)
            out_summary[name] = {
                "coverage": cover.cpu().tolist(),
                "weight": None if weights is None else weights.float().mean(0).cpu().tolist(),
            }
    return out_masks, out_summary


def summary_lines(summary: Mapping[str, Mapping[str, list[float] | None]]) -> list[str]:
    """:func:`token_summary` as one line per level, e.g.
    ``backbone.fpn:0  coverage 0.00 0.16 1.00  weight 0.00 0.00 1.00``."""
    width = max(len(name) for name in summary)
    lines = []
    for name, s in summary.items():
        line = f"{name:{width}s}  coverage " + " ".join(f"{v:.2f}" for v in s["coverage"] or [])
        if s["weight"] is not None:
            line += "  weight " + " ".join(f"{v:.2f}" for v in s["weight"])
        lines.append(line)
    return lines


def summary_report(summary: Mapping[str, Mapping[str, list[float] | None]]) -> list[str]:
    """What ``maskd visualize`` and the end of stage 1 print: :func:`summary_lines`
    indented, then each of :func:`head_notes` as a ``note:`` line."""
    return [f"  {line}" for line in summary_lines(summary)] + [
        f"note: {note}" for note in head_notes(summary)
    ]


def head_notes(
    summary: Mapping[str, Mapping[str, list[float] | None]],
    weight: float = 0.9,
    coverage: float = 0.9,
) -> list[str]:
    """One line per level whose head gives one token at least ``weight`` of its mean weight
    while that token's mask covers at least ``coverage`` of the positions (stage 2 on the
    level is then close to plain feature imitation, FitNet) or at most ``1 - coverage`` (the
    level is then barely distilled); either way the other masks go unused."""
    notes = []
    for name, s in summary.items():
        w, cover = s["weight"], s["coverage"]
        if w is None or cover is None:
            continue
        top = max(range(len(w)), key=w.__getitem__)
        if w[top] < weight or 1 - coverage < cover[top] < coverage:
            continue
        effect = (
            "MasKD on this level is close to FitNet"
            if cover[top] >= coverage
            else "this level is barely distilled"
        )
        notes.append(
            f"{name}: the head gives token {top} {w[top]:.2f} of the weight and its mask "
            f"covers {cover[top]:.2f} of the positions, so {effect}; "
            "distill.token_weights=equal uses every mask (compare the two on your "
            "validation split)"
        )
    return notes


def _to_rgb(image: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    img = image.detach().float().cpu()
    if mean is not None and std is not None:
        img = img * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def mask_grid(
    images: Sequence[Tensor],
    masks: Sequence[Tensor],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    alpha: float = 0.6,
) -> np.ndarray:
    """One level's masks laid over the images: rows = images, columns = image + tokens.

    Args:
        images: ``[3, H, W]`` tensors (denormalised with ``mean``/``std`` when given).
        masks: ``[T, H, W]`` per image, values in [0, 1].

    Returns:
        ``uint8 [rows·H, (T + 1)·W, 3]``; each mask is drawn as a red heat overlay.
    """
    rows = []
    for image, m in zip(images, masks, strict=True):
        rgb = _to_rgb(image, mean, std)
        tiles = [rgb]
        heat = np.zeros_like(rgb)
        heat[..., 0] = 1.0
        for t in range(m.shape[0]):
            a = alpha * m[t].clamp(0, 1).numpy()[..., None]
            tiles.append(rgb * (1 - a) + heat * a)
        rows.append(np.concatenate(tiles, axis=1))
    return (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)


def save_mask_png(
    images: Sequence[Tensor],
    masks: Mapping[str, Sequence[Tensor]],
    path: str | Path,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    summary: Mapping[str, Mapping[str, list[float] | None]] | None = None,
) -> Path:
    """All levels' grids stacked into one titled PNG (one panel per level); with a
    :func:`token_summary`, each title also gives the head's weight of every token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = {name: mask_grid(images, m, mean, std) for name, m in masks.items()}
    first = next(iter(grids.values()))
    width = 2.0 + first.shape[1] / 64
    heights = [g.shape[0] / 64 + 0.4 for g in grids.values()]
    fig, axes = plt.subplots(len(grids), 1, figsize=(width, sum(heights)), squeeze=False)
    for ax, (name, grid) in zip(axes[:, 0], grids.items(), strict=True):
        ax.imshow(grid)
        title = f"{name}: image, then token 1..{next(iter(masks[name])).shape[0]}"
        weights = (summary or {}).get(name, {}).get("weight")
        if weights is not None:
            title += "; head weights " + " ".join(f"{w:.2f}" for w in weights)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    return _save_figure(fig, path)


def load_images(paths: Sequence[str | Path], size: int | None = None) -> list[Tensor]:
    """Read image files as float ``[3, H, W]`` tensors in [0, 1] (optionally resized square)."""
    from PIL import Image

    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"image not found: {p}")
        img = Image.open(p).convert("RGB")
        if size is not None:
            img = img.resize((size, size), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255)
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise UserValueError(f"images differ in size {sorted(shapes)}; pass a size to resize them")
    return out


def read_csv_logs(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Merge every ``csv/version_*/metrics.csv`` of a run: ``{key: [(step, value)]}``.

    A resumed run writes a new version; for a step logged twice, the later version wins.
    """
    merged: dict[str, dict[int, float]] = {}
    versions = sorted(
        Path(run_dir, "csv").glob("version_*/metrics.csv"),
        key=lambda p: int(p.parent.name.split("_")[-1]),
    )
    for path in versions:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                step = int(row.get("step") or 0)
                for key, value in row.items():
                    if key in ("step", "epoch") or value in ("", None):
                        continue
                    merged.setdefault(key, {})[step] = float(value)
    return {k: sorted(v.items()) for k, v in merged.items()}


def loss_curves(run_dir: str | Path, prefix: str = "train/") -> dict[str, list[tuple[int, float]]]:
    """The logged training loss terms of a run (keys starting with ``prefix``)."""
    return {k: v for k, v in read_csv_logs(run_dir).items() if k.startswith(prefix)}


def save_loss_png(
    runs: Mapping[str, str | Path], path: str | Path, key: str = "train/loss"
) -> Path:
    """Plot ``key`` (and, per run, every ``train/loss_*`` term) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(runs)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.5 * rows), squeeze=False)
    for ax, (label, run_dir) in zip(axes.flat, runs.items(), strict=False):
        curves = loss_curves(run_dir)
        for name, points in sorted(curves.items()):
            if not points or "/" in name[len("train/") :]:
                continue
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=name[len("train/") :], lw=2 if name == key else 1)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _save_figure(fig, path)
