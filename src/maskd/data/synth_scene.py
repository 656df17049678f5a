"""One synthetic scene: a photo/noise background, clutter, and shapes that occlude each other.

`render_scene` returns the image and an instance map; objects are painted in order, so a
later object (or a clutter line drawn on top) hides what lies under it, and the instance
map records only what stays visible.
"""

from __future__ import annotations

import colorsys
import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from maskd.data.synth_shapes import SHAPES, blob_alpha, segment_alpha, shape_alpha
from maskd.errors import UserRuntimeError

logger = logging.getLogger("maskd.data")

# scikit-image photographs that ship inside the package (no download). Left out on
# purpose: pictures dominated by circles, rings or squares (coins, clock, retina, cell,
# coffee, colorwheel, checkerboard), which would look like unlabelled objects.
PHOTO_NAMES = (
    "astronaut", "chelsea", "rocket", "camera", "brick", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "text",
)  # fmt: skip

MAX_OBJECTS = 8
MIN_VISIBLE = 0.5  # an earlier object must keep this fraction of its pixels visible
MIN_IN_FRAME = 0.6  # an object may be cut by the image border by at most 40 %
RADIUS_RANGE = (0.04, 0.30)  # outer radius, as a fraction of the image side (log-uniform)


@functools.cache
def photos() -> tuple[tuple[str, Image.Image], ...]:
    """(name, RGB image) for each photograph in PHOTO_NAMES that loads offline."""
    import skimage.data

    loaded = []
    for name in PHOTO_NAMES:
        try:
            arr = np.asarray(getattr(skimage.data, name)())
        except Exception as err:  # a data file missing from this scikit-image install
            logger.warning("synthetic backgrounds: skimage.data.%s unavailable (%s)", name, err)
            continue
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        loaded.append((name, Image.fromarray(np.ascontiguousarray(arr[..., :3].astype(np.uint8)))))
    if not loaded:
        raise UserRuntimeError("no scikit-image photograph could be loaded for the backgrounds")
    return tuple(loaded)


def shape_area(shape: str, radius: float, aspect: float, inner: float) -> float:
    """Exact area in px² of a shape from `shape_alpha` (ignoring the image border)."""
    unit = {
        "circle": math.pi,
        "ring": math.pi * (1.0 - inner * inner),
        "square": 4 * 0.75 * 0.75,
        "cross": 2 * (2.0 * 0.6) - 0.6 * 0.6,
        "triangle": 3.0 * math.sqrt(3.0) / 4.0,
        "star": 5.0 * inner * math.sin(math.radians(36.0)),
    }[shape]
    return unit * radius * radius * aspect


def smooth_noise(
    rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 3
) -> np.ndarray:
    """Bilinearly upsampled Gaussian noise on a grid of `cells` per side:
    float32 [h, w, channels], std ≈ 1."""
    coarse = rng.normal(size=(cells + 1, cells + 1, channels)).astype(np.float32)

    def lerp_axis(a: np.ndarray, n: int, axis: int) -> np.ndarray:
        pos = np.linspace(0, cells, n, dtype=np.float32)
        i0 = np.minimum(pos.astype(int), cells - 1)
        shape = [1, 1, 1]
        shape[axis] = n
        f = (pos - i0).reshape(shape)
        return np.take(a, i0, axis=axis) * (1 - f) + np.take(a, i0 + 1, axis=axis) * f

    return lerp_axis(lerp_axis(coarse, h, 0), w, 1)


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """An RGB colour in 0..255, float32 [3], from random hue/saturation/value."""
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.25, 1.0))
    return np.asarray(rgb, dtype=np.float32) * 255.0


def photo_crop(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Random square crop of a random photograph, flipped/rotated, resized to
    float32 [h, w, 3]."""
    pool = photos()
    _, photo = pool[rng.integers(len(pool))]
    pw, ph = photo.size
    side = max(8, int(rng.uniform(0.3, 1.0) * min(ph, pw)))
    y = int(rng.integers(0, ph - side + 1))
    x = int(rng.integers(0, pw - side + 1))
    k = int(rng.integers(4))
    out_size = (w, h) if k % 2 == 0 else (h, w)
    crop = photo.resize(out_size, Image.BILINEAR, box=(x, y, x + side, y + side))
    out = np.rot90(np.asarray(crop, dtype=np.float32), k=k)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Photo crop (85 %) or pure procedural noise, with colour jitter: float32 [H, W, 3]."""
    noise = smooth_noise(rng, size, size, int(rng.integers(2, 12))) * rng.uniform(20, 60)
    if rng.random() < 0.85:
        img = photo_crop(rng, size, size)
        if rng.random() < 0.5:
            img = img[..., rng.permutation(3)]
        if rng.random() < 0.15:
            img = np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2)
        img = img * rng.uniform(0.6, 1.3, size=3) + rng.uniform(-30, 30)
        mix = rng.uniform(0.0, 0.5)
        img = (1 - mix) * img + mix * (random_colour(rng) + noise)
    else:
        fine = smooth_noise(rng, size, size, int(rng.integers(16, 48))) * rng.uniform(10, 30)
        img = random_colour(rng) + noise + fine
    return img.astype(np.float32)


def texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Fill for an object or clutter item: flat, gradient, stripes, noise or photo.

    Returns float32 [h, w, 3]; colours are drawn independently of the object class.
    """
    c1, c2 = random_colour(rng), random_colour(rng)
    kind = rng.integers(5)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    along = xx * math.cos(theta) + yy * math.sin(theta)
    if kind == 0:
        fill = np.broadcast_to(c1, (h, w, 3)).copy()
    elif kind == 1:
        t = (along - along.min()) / max(float(np.ptp(along)), 1.0)
        fill = c1 * (1 - t[..., None]) + c2 * t[..., None]
    elif kind == 2:
        period = rng.uniform(3.0, 12.0)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * along / period)
        fill = c1 * (1 - t[..., None]) + c2 * t[..., None]
    elif kind == 3:
        cells = int(rng.integers(2, 8))
        fill = c1 + smooth_noise(rng, h, w, cells) * rng.uniform(15, 50)
    else:
        photo = photo_crop(rng, h, w)
        fill = photo / max(float(photo.mean()), 1.0) * c1
    return (fill + rng.normal(0, rng.uniform(2, 12), size=fill.shape)).astype(np.float32)


@dataclass
class Scene:
    """image uint8 [H, W, 3]; instances int32 [H, W] (0 = no object, k = object k);
    labels[k - 1] = class index in 1..len(SHAPES) of object k; areas[k - 1] = its pixel
    count inside the image when it was drawn, before anything covered it."""

    image: np.ndarray
    instances: np.ndarray
    labels: list[int]
    areas: list[int]


def _window(alpha: np.ndarray) -> tuple[slice, slice]:
    """Bounding slices of the non-zero part of `alpha` (empty slices if none)."""
    rows = np.flatnonzero(alpha.any(axis=1))
    cols = np.flatnonzero(alpha.any(axis=0))
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _paint(canvas: np.ndarray, alpha: np.ndarray, fill: np.ndarray, win: tuple) -> None:
    """Alpha-blend `fill` (the window's size) over the window `win` of `canvas`."""
    a = alpha[win][..., None]
    canvas[win] *= 1 - a
    canvas[win] += a * fill


def _fill_for(rng: np.random.Generator, alpha: np.ndarray) -> tuple[np.ndarray, tuple]:
    win = _window(alpha)
    h, w = win[0].stop - win[0].start, win[1].stop - win[1].start
    return texture(rng, max(h, 1), max(w, 1)), win


def _clutter(rng: np.random.Generator, canvas: np.ndarray, instances: np.ndarray, n: int) -> None:
    """Distractors that are not objects: irregular blobs and strokes (label 0)."""
    size = canvas.shape[0]
    for _ in range(n):
        if rng.random() < 0.5:
            radius = size * math.exp(rng.uniform(math.log(0.03), math.log(0.15)))
            alpha = blob_alpha(rng, size, size, *rng.uniform(0, size, 2), radius)
        else:
            points = rng.uniform(-0.1 * size, 1.1 * size, size=(int(rng.integers(2, 5)), 2))
            alpha = segment_alpha(size, size, points, rng.uniform(1.0, 0.04 * size + 1.0))
        _paint(canvas, alpha, *_fill_for(rng, alpha))
        instances[alpha >= 0.5] = 0


def _place(
    rng: np.random.Generator, size: int, instances: np.ndarray, areas: list[int]
) -> tuple[str, np.ndarray] | None:
    """Draw a shape whose placement keeps every earlier object ≥ MIN_VISIBLE visible."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    lo, hi = (math.log(f * size) for f in RADIUS_RANGE)
    for _ in range(15):
        radius = math.exp(rng.uniform(lo, hi))
        aspect = rng.uniform(0.8, 1.25)
        inner = rng.uniform(0.45, 0.7) if shape == "ring" else rng.uniform(0.38, 0.55)
        cx, cy = rng.uniform(0, size, 2)
        alpha = shape_alpha(
            shape, size, size, cx, cy, radius, rng.uniform(0, 2 * np.pi), aspect, inner
        )
        mask = alpha >= 0.5
        area = int(mask.sum())
        if area < 12 or area < MIN_IN_FRAME * shape_area(shape, radius, aspect, inner):
            continue
        hidden = np.bincount(instances[mask], minlength=len(areas) + 1)[1:]
        visible = np.bincount(instances.ravel(), minlength=len(areas) + 1)[1:]
        if np.all(visible - hidden >= MIN_VISIBLE * np.asarray(areas, dtype=float)):
            return shape, alpha
    return None


def render_scene(rng: np.random.Generator, size: int, top_strokes: bool = True) -> Scene:
    """Render one size×size scene from `rng` (the only source of randomness).

    top_strokes: in half the scenes, draw 1-2 thin lines over the objects at the end.
    """
    canvas = background(rng, size)
    instances = np.zeros((size, size), dtype=np.int32)
    _clutter(rng, canvas, instances, int(rng.integers(1, 7)))
    labels: list[int] = []
    areas: list[int] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        placed = _place(rng, size, instances, areas)
        if placed is None:
            continue
        shape, alpha = placed
        mask = alpha >= 0.5
        fill, win = _fill_for(rng, alpha)
        behind = canvas[mask].mean(axis=0)
        for _ in range(4):  # avoid a fill that vanishes into what lies behind it
            if np.linalg.norm(fill[mask[win]].mean(axis=0) - behind) >= 40:
                break
            fill, win = _fill_for(rng, alpha)
        _paint(canvas, alpha, fill, win)
        instances[mask] = len(labels) + 1
        labels.append(SHAPES.index(shape) + 1)
        areas.append(int(mask.sum()))
    # thin strokes over everything: occluders that are not objects
    if rng.random() < 0.5 and top_strokes:
        for _ in range(int(rng.integers(1, 3))):
            points = rng.uniform(0, size, size=(2, 2))
            alpha = segment_alpha(size, size, points, rng.uniform(1.0, 2.0))
            _paint(canvas, alpha, *_fill_for(rng, alpha))
            instances[alpha >= 0.5] = 0
    canvas += rng.normal(0, rng.uniform(2, 10), size=canvas.shape)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        image = np.asarray(
            Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
        )
    return Scene(image=image, instances=instances, labels=labels, areas=areas)


EASY_SHAPES = SHAPES[:3]  # circle, triangle, square: labels 1..3 in both settings
EASY_RADIUS = (0.08, 0.25)  # outer radius, as a fraction of the image side (uniform)
EASY_NOISE = 0.15 * 255.0  # per-pixel background noise (std) around mid-grey


EASY_CLUTTER = (1, 4)  # distractors per scene in the "clutter" setting (inclusive)
EASY_CLUTTER_RADIUS = (0.06, 0.2)  # a blob's radius, as a fraction of the side: object-sized


def clutter_count(object_scale: float) -> tuple[int, int]:
    """How many distractors a cluttered scene draws (inclusive range): EASY_CLUTTER, times
    1 / object_scale² so that their number per area stays that of a full-scale scene."""
    lo, hi = EASY_CLUTTER
    return round(lo / object_scale**2), round(hi / object_scale**2)


def render_easy_scene(
    rng: np.random.Generator, size: int, clutter: bool = False, object_scale: float = 1.0
) -> Scene:
    """The easy setting: 1-3 upright, flat-coloured circles, triangles or squares on
    per-pixel Gaussian noise around mid-grey; no clutter, photos, strokes or blur.

    clutter: first paint 1-4 distractors (label 0) on the noise: object-sized irregular
    blobs or thick strokes, flat-coloured from the objects' palette, so colour and contrast
    do not tell an object from background and only shape does (the "clutter" setting).
    Objects may overlap (a later one hides an earlier one, or a distractor); each keeps at
    least MIN_VISIBLE of its pixels, as in `render_scene`.
    object_scale (0, 1]: objects and distractors are drawn as in a scene of side
    ``object_scale * size`` (a stroke spans a window of that side); distractors keep their
    number per area (`clutter_count`), objects stay 1-3 per scene, so background takes a
    larger share of the image. 1 draws exactly the full-scale scenes.
    """
    canvas = 127.5 + rng.normal(0, EASY_NOISE, size=(size, size, 3)).astype(np.float32)
    instances = np.zeros((size, size), dtype=np.int32)
    side = object_scale * size  # the side of the full-scale scene objects are drawn for
    if clutter:
        lo, hi = clutter_count(object_scale)
        for _ in range(int(rng.integers(lo, hi + 1))):
            if rng.random() < 0.5:
                radius = rng.uniform(*EASY_CLUTTER_RADIUS) * side
                alpha = blob_alpha(rng, size, size, *rng.uniform(0, size, 2), radius)
            else:
                points = rng.uniform(0, size, size=(int(rng.integers(2, 4)), 2))
                if object_scale != 1.0:  # the stroke within a window of side `side`
                    points = points * object_scale + rng.uniform(0, size - side, 2)
                alpha = segment_alpha(size, size, points, rng.uniform(0.04, 0.1) * side)
            canvas *= 1 - alpha[..., None]
            canvas += alpha[..., None] * random_colour(rng)
    labels: list[int] = []
    areas: list[int] = []
    for _ in range(int(rng.integers(1, 4))):
        label = int(rng.integers(len(EASY_SHAPES)))
        colour = random_colour(rng)
        for _ in range(15):
            radius = rng.uniform(*EASY_RADIUS) * side
            cx, cy = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
            alpha = shape_alpha(EASY_SHAPES[label], size, size, cx, cy, radius)
            mask = alpha >= 0.5
            hidden = np.bincount(instances[mask], minlength=len(areas) + 1)[1:]
            visible = np.bincount(instances.ravel(), minlength=len(areas) + 1)[1:]
            if mask.sum() >= 12 and np.all(
                visible - hidden >= MIN_VISIBLE * np.asarray(areas, dtype=float)
            ):
                break
        else:
            continue
        canvas *= 1 - alpha[..., None]
        canvas += alpha[..., None] * colour
        instances[mask] = len(labels) + 1
        labels.append(label + 1)
        areas.append(int(mask.sum()))
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Scene(image=image, instances=instances, labels=labels, areas=areas)
