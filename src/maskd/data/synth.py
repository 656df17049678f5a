"""A synthetic dataset written to disk in the formats the real loaders read.

`generate(out, task, train, val, size, seed, test=0, difficulty="hard")` renders scenes
(`synth_scene`) and writes
- detection: COCO layout — `out/{train,val,test}/NNNNNN.png` and
  `out/annotations/instances_{train,val,test}.json` (boxes, areas and RLE masks of the
  visible part of each object); read it with `build_dataset("coco", out, split)`;
- segmentation: folder layout — `out/classes.txt`, `out/{split}/images/NNNNNN.png`,
  `out/{split}/masks/NNNNNN.png` (palette PNG of class indices, 0 = background);
  read it with `build_dataset("folder", out, split)`.
plus `out/synth_meta.json` recording the arguments. Same arguments → identical bytes.
The class list and what the scenes contain are described in docs/synthetic_data.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from maskd.data.preview import preview
from maskd.data.synth_scene import EASY_SHAPES, Scene, photos, render_easy_scene, render_scene
from maskd.data.synth_shapes import SHAPES
from maskd.errors import UserValueError

__all__ = ["CLASSES", "DIFFICULTIES", "classes", "generate", "preview", "render_scene"]

CLASSES = SHAPES  # detection labels 1..6 / segmentation classes 1..6 (0 = background)
FORMAT_VERSION = 1
_SPLITS = ("train", "val", "test")  # the index seeds each split's scenes: append only
_OWN_ENTRIES = ("train", "val", "test", "annotations", "classes.txt", "synth_meta.json")
# "hard": photo backgrounds, clutter, 6 classes, occlusion; "easy": 3 classes on noise;
# "clutter": the easy scenes with object-sized distractors painted under the objects
DIFFICULTIES = ("hard", "easy", "clutter")


def classes(difficulty: str = "hard") -> tuple[str, ...]:
    """The class names a dataset of this difficulty uses (labels 1..len)."""
    return CLASSES if difficulty == "hard" else EASY_SHAPES


def _render(
    rng: np.random.Generator, size: int, difficulty: str, object_scale: float = 1.0
) -> Scene:
    if difficulty == "hard":
        return render_scene(rng, size)
    return render_easy_scene(rng, size, clutter=difficulty == "clutter", object_scale=object_scale)


def _palette() -> list[int]:
    colours = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
               (245, 130, 48), (145, 30, 180)]  # fmt: skip
    flat = [c for rgb in colours for c in rgb]
    flat += [255, 255, 255] * (256 - len(colours))
    return flat


def _save_image(image: np.ndarray, path: Path, image_format: str) -> None:
    if image_format == "png":
        Image.fromarray(image).save(path, format="PNG", compress_level=6)
    else:
        Image.fromarray(image).save(path, format="JPEG", quality=92, subsampling=0)


def _coco_annotations(scene: Scene, image_id: int, first_id: int) -> list[dict[str, Any]]:
    """One annotation per object with visible pixels; bbox/area/RLE of the visible part."""
    anns = []
    for k, label in enumerate(scene.labels, start=1):
        visible = scene.instances == k
        if not visible.any():
            continue
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        ys, xs = np.nonzero(visible)
        x0, y0 = int(xs.min()), int(ys.min())
        anns.append(
            {
                "id": first_id + len(anns),
                "image_id": image_id,
                "category_id": int(label),
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                "area": int(visible.sum()),
                "iscrowd": 0,
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
            }
        )
    return anns


def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # one independent stream per image: a split's images do not depend on the other's count
    return np.random.default_rng([seed, _SPLITS.index(split), index])


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserValueError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output directory {out} is not empty (pass overwrite=True)")
        # only what this module writes goes; other files (a preview, notes) stay
        for name in _OWN_ENTRIES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def generate(
    out: str | Path,
    task: str = "detection",
    train: int = 200,
    val: int = 50,
    size: int = 128,
    seed: int = 0,
    image_format: str = "png",
    overwrite: bool = False,
    test: int = 0,
    difficulty: str = "hard",
    object_scale: float = 1.0,
) -> Path:
    """Render `train` + `val` (+ `test`) scenes of size×size px and write them under `out`.

    task: "detection" (COCO layout) or "segmentation" (folder layout); see the module
    docstring. image_format: "png" or "jpg" (detection images; masks are always PNG).
    A non-empty `out` is refused unless `overwrite=True`, which first deletes the entries
    this function writes (`train/`, `val/`, `annotations/`, `classes.txt`,
    `synth_meta.json`) and leaves any other file alone. `test` > 0 adds a third split
    (independent of the other two; the train and val images do not change with it).
    difficulty: "hard" (the default scenes), "easy" or "clutter" (the easy scenes with
    distractors; see `synth_scene.render_easy_scene`).
    object_scale (0, 1], easy and clutter only, with object_scale * size >= 32: objects and
    distractors are drawn at the size they have in an image of side ``object_scale * size``;
    distractors keep their number per area and objects stay 1-3 per image, so background
    covers more of it.
    Returns `out`.
    """
    if difficulty not in DIFFICULTIES:
        raise UserValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    if task not in ("detection", "segmentation"):
        raise UserValueError(f"task must be 'detection' or 'segmentation', got {task!r}")
    if image_format not in ("png", "jpg"):
        raise UserValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if task == "segmentation" and image_format != "png":
        raise UserValueError("segmentation images are written as PNG (lossless, like the masks)")
    if not 0.0 < object_scale <= 1.0:  # also refuses NaN
        raise UserValueError(f"object_scale must be in (0, 1], got {object_scale}")
    if object_scale != 1.0 and difficulty == "hard":
        raise UserValueError("object_scale applies to the easy and clutter settings, not 'hard'")
    if size < 32:
        raise UserValueError(f"size must be at least 32 px, got {size}")
    if size * object_scale < 32:  # the side objects are drawn for, as small as size may be
        raise UserValueError(
            f"object_scale * size must be at least 32 px, got {object_scale} * {size}"
        )
    if train < 0 or val < 0 or test < 0 or train + val + test == 0:
        raise UserValueError(
            f"train, val and test must be >= 0 and not all 0, got {train}, {val}, {test}"
        )
    out = Path(out)
    _prepare_out(out, overwrite)
    counts = {"train": train, "val": val, "test": test}
    names = classes(difficulty)
    if task == "segmentation":
        (out / "classes.txt").write_text("\n".join(("background", *names)) + "\n")
    for split in _SPLITS:
        if split == "test" and not test:
            continue
        if task == "detection":
            _write_detection_split(
                out, split, counts[split], size, seed, image_format, difficulty, object_scale
            )
        else:
            _write_segmentation_split(
                out, split, counts[split], size, seed, difficulty, object_scale
            )
    _write_json(
        out / "synth_meta.json",
        {
            "generator": "maskd.data.synth",
            "format_version": FORMAT_VERSION,
            "task": task,
            "train": train,
            "val": val,
            "test": test,
            "difficulty": difficulty,
            "size": size,
            "seed": seed,
            "image_format": image_format,
            "classes": list(names),
            "backgrounds": [name for name, _ in photos()] if difficulty == "hard" else [],
            # only when set: full-scale datasets keep the bytes (and fingerprints) they had
            **({"object_scale": object_scale} if object_scale != 1.0 else {}),
        },
    )
    return out


def _write_detection_split(
    out: Path,
    split: str,
    count: int,
    size: int,
    seed: int,
    image_format: str,
    difficulty: str,
    object_scale: float,
) -> None:
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        scene = _render(_scene_rng(seed, split, index), size, difficulty, object_scale)
        name = f"{index:06d}.{image_format}"
        _save_image(scene.image, image_dir / name, image_format)
        image_id = index + 1
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        annotations += _coco_annotations(scene, image_id, len(annotations) + 1)
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"}
        for i, name in enumerate(classes(difficulty))
    ]
    info = {"description": f"maskd synthetic shapes, {split} split", "seed": seed}
    _write_json(
        out / "annotations" / f"instances_{split}.json",
        {
            "info": info,
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        },
    )


def _write_segmentation_split(
    out: Path, split: str, count: int, size: int, seed: int, difficulty: str, object_scale: float
) -> None:
    image_dir, mask_dir = out / split / "images", out / split / "masks"
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    palette = _palette()
    for index in range(count):
        scene = _render(_scene_rng(seed, split, index), size, difficulty, object_scale)
        lut = np.asarray([0, *scene.labels], dtype=np.uint8)
        mask = Image.fromarray(lut[scene.instances])  # mode L
        mask.putpalette(palette)  # L → P, indices unchanged
        _save_image(scene.image, image_dir / f"{index:06d}.png", "png")
        mask.save(mask_dir / f"{index:06d}.png", format="PNG")
