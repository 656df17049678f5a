"""Anti-aliased rasterisation of the synthetic object classes and clutter.

Every function returns a coverage map `alpha` float32 [H, W] in [0, 1] (the fraction of
each pixel inside the shape, from 4×4 supersampling for objects, 2×2 for clutter);
`alpha >= 0.5` is the shape's mask.
Only the shape's bounding window is evaluated, so cost follows the shape's size.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from maskd.errors import UserValueError

SHAPES = ("circle", "triangle", "square", "star", "ring", "cross")
SUPERSAMPLE = 4
CLUTTER_SUPERSAMPLE = 2


def _window(cx: float, cy: float, reach: float, h: int, w: int) -> tuple[int, int, int, int]:
    x0 = max(0, math.floor(cx - reach) - 1)
    y0 = max(0, math.floor(cy - reach) - 1)
    x1 = min(w, math.ceil(cx + reach) + 2)
    y1 = min(h, math.ceil(cy + reach) + 2)
    return y0, y1, x0, x1


def _subpixels(
    y0: int, y1: int, x0: int, x1: int, s: int = SUPERSAMPLE
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel centre coordinates, [(y1-y0)*s, (x1-x0)*s] each."""
    offs = (np.arange(s) + 0.5) / s
    ys = (np.arange(y0, y1)[:, None] + offs[None, :]).reshape(-1)
    xs = (np.arange(x0, x1)[:, None] + offs[None, :]).reshape(-1)
    return np.meshgrid(ys, xs, indexing="ij")


def _pool(inside: np.ndarray, s: int = SUPERSAMPLE) -> np.ndarray:
    hs, ws = inside.shape
    return inside.reshape(hs // s, s, ws // s, s).mean(axis=(1, 3), dtype=np.float32)


def inside_polygon(x: np.ndarray, y: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd rule: which points (x, y) lie inside the closed polygon `verts` [V, 2]."""
    inside = np.zeros(x.shape, dtype=bool)
    xj, yj = verts[-1]
    for xi, yi in verts:
        crosses = (yi > y) != (yj > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (xj - xi) * (y - yi) / (yj - yi) + xi
        inside ^= crosses & (x < x_at)
        xj, yj = xi, yi
    return inside


def _unit_inside(shape: str, u: np.ndarray, v: np.ndarray, inner: float) -> np.ndarray:
    """Membership in the canonical shape (outer radius 1) at local coordinates (u, v)."""
    r2 = u * u + v * v
    if shape == "circle":
        return r2 <= 1.0
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= inner * inner)
    if shape == "square":
        return (np.abs(u) <= 0.75) & (np.abs(v) <= 0.75)
    if shape == "cross":
        arm = 0.3
        return ((np.abs(u) <= 1.0) & (np.abs(v) <= arm)) | ((np.abs(u) <= arm) & (np.abs(v) <= 1.0))
    if shape == "triangle":
        t = np.deg2rad([-90.0, 30.0, 150.0])
        return inside_polygon(u, v, np.stack([np.cos(t), np.sin(t)], axis=1))
    if shape == "star":
        t = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return inside_polygon(u, v, np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1))
    raise UserValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def shape_alpha(
    shape: str,
    h: int,
    w: int,
    cx: float,
    cy: float,
    radius: float,
    angle: float = 0.0,
    aspect: float = 1.0,
    inner: float = 0.5,
) -> np.ndarray:
    """Coverage [h, w] of `shape` centred at (cx, cy) with outer radius `radius` px,
    rotated by `angle` radians and stretched by `aspect` along its own x axis.
    `inner` is the ring's hole / the star's inner radius, relative to the outer one."""
    alpha = np.zeros((h, w), dtype=np.float32)
    reach = radius * max(aspect, 1.0)
    y0, y1, x0, x1 = _window(cx, cy, reach, h, w)
    if y1 <= y0 or x1 <= x0:
        return alpha
    yy, xx = _subpixels(y0, y1, x0, x1)
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(angle), math.sin(angle)
    u = (c * dx + s * dy) / (radius * aspect)
    v = (-s * dx + c * dy) / radius
    alpha[y0:y1, x0:x1] = _pool(_unit_inside(shape, u, v, inner))
    return alpha


def segment_alpha(h: int, w: int, points: np.ndarray, width: float) -> np.ndarray:
    """Coverage [h, w] of a polyline through `points` [P, 2] (x, y) of stroke `width` px."""
    alpha = np.zeros((h, w), dtype=np.float32)
    half = width / 2.0
    lo = points.min(axis=0) - half
    hi = points.max(axis=0) + half
    y0, y1, x0, x1 = (
        max(0, math.floor(lo[1]) - 1),
        min(h, math.ceil(hi[1]) + 2),
        max(0, math.floor(lo[0]) - 1),
        min(w, math.ceil(hi[0]) + 2),
    )
    if y1 <= y0 or x1 <= x0:
        return alpha
    yy, xx = _subpixels(y0, y1, x0, x1, CLUTTER_SUPERSAMPLE)
    near = np.zeros(xx.shape, dtype=bool)
    for (ax, ay), (bx, by) in itertools.pairwise(points):
        ex, ey = bx - ax, by - ay
        t = ((xx - ax) * ex + (yy - ay) * ey) / max(ex * ex + ey * ey, 1e-9)
        t = np.clip(t, 0.0, 1.0)
        near |= (xx - ax - t * ex) ** 2 + (yy - ay - t * ey) ** 2 <= half * half
    alpha[y0:y1, x0:x1] = _pool(near, CLUTTER_SUPERSAMPLE)
    return alpha


def blob_alpha(
    rng: np.random.Generator, h: int, w: int, cx: float, cy: float, radius: float
) -> np.ndarray:
    """Coverage [h, w] of an irregular blob: a smooth random field plus a radial bump,
    thresholded. Its outline is lumpy without the symmetric lobes of a star or cross."""
    alpha = np.zeros((h, w), dtype=np.float32)
    y0, y1, x0, x1 = _window(cx, cy, radius * 2.0, h, w)
    if y1 <= y0 or x1 <= x0:
        return alpha
    yy, xx = _subpixels(y0, y1, x0, x1, CLUTTER_SUPERSAMPLE)
    u = (xx - cx) / radius
    v = (yy - cy) / radius
    cells = 6  # noise grid spanning [-2, 2] in units of the radius
    coarse = rng.normal(size=(cells + 1, cells + 1))
    gu = np.clip((u + 2.0) / 4.0 * cells, 0, cells - 1e-6)
    gv = np.clip((v + 2.0) / 4.0 * cells, 0, cells - 1e-6)
    iu, iv = gu.astype(int), gv.astype(int)
    fu, fv = gu - iu, gv - iv
    field = (
        coarse[iv, iu] * (1 - fu) * (1 - fv)
        + coarse[iv, iu + 1] * fu * (1 - fv)
        + coarse[iv + 1, iu] * (1 - fu) * fv
        + coarse[iv + 1, iu + 1] * fu * fv
    )
    theta, squash = rng.uniform(0, np.pi), rng.uniform(1.0, 2.5)  # elongated, any direction
    along = u * math.cos(theta) + v * math.sin(theta)
    across = (v * math.cos(theta) - u * math.sin(theta)) * squash
    inside = 1.1 * field + 1.0 - (along * along + across * across) > 0.0
    alpha[y0:y1, x0:x1] = _pool(inside, CLUTTER_SUPERSAMPLE)
    return alpha
