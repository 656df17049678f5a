"""Synthetic dataset: real files, read back by the real loaders, deterministic by seed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from maskd.data import build_dataset, synth
from maskd.data.synth_scene import MIN_VISIBLE, render_scene
from maskd.data.synth_shapes import SHAPES, shape_alpha

SIZE = 64
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _dilate(m: np.ndarray, steps: int) -> np.ndarray:
    """4-connected binary dilation by `steps` pixels."""
    out = m.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


@pytest.fixture(scope="module")
def det_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("det") / "d", "detection", 6, 3, SIZE, seed=11)


@pytest.fixture(scope="module")
def seg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seg") / "s"
    return synth.generate(out, "segmentation", 6, 3, SIZE, seed=11)


def test_detection_files_load_with_pycocotools(det_root: Path) -> None:
    for split, count in (("train", 6), ("val", 3)):
        coco = COCO(str(det_root / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == count
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES)
        assert len(list((det_root / split).glob("*.png"))) == count
        assert len(coco.getAnnIds()) > count  # several objects per image
    ds = build_dataset("coco", det_root, "train")
    assert len(ds) == 6 and ds.num_classes == 6
    image, target = ds[0]
    assert image.shape == (3, SIZE, SIZE) and target["labels"].min() >= 1


def test_boxes_tightly_enclose_the_visible_object(det_root: Path) -> None:
    coco = COCO(str(det_root / "annotations" / "instances_train.json"))
    contrasts = []
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        pixels = np.asarray(Image.open(det_root / "train" / info["file_name"]), dtype=float)
        seen = np.zeros((SIZE, SIZE), dtype=int)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            m = mask_utils.decode(ann["segmentation"]).astype(bool)
            ys, xs = np.nonzero(m)
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
            assert ann["area"] == m.sum() and ann["iscrowd"] == 0
            seen += m
            around = _dilate(m, 2) & ~m
            if around.any():
                contrasts.append(np.abs(pixels[m].mean(0) - pixels[around].mean(0)).max())
        assert seen.max() <= 1  # occlusion: every pixel belongs to at most one object
    # objects stand out from what surrounds them
    assert np.median(contrasts) > 15


def test_segmentation_masks_agree_with_detection_annotations(
    det_root: Path, seg_root: Path
) -> None:
    names = (seg_root / "classes.txt").read_text().split()
    assert names == ["background", *SHAPES]
    coco = COCO(str(det_root / "annotations" / "instances_val.json"))
    ds = build_dataset("folder", seg_root, "val")
    assert len(ds) == 3 and ds.num_classes == 7
    for i, image_id in enumerate(sorted(coco.getImgIds())):
        expected = np.zeros((SIZE, SIZE), dtype=np.int64)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            expected[mask_utils.decode(ann["segmentation"]).astype(bool)] = ann["category_id"]
        _, mask = ds[i]
        assert np.array_equal(mask.numpy(), expected)
        seg_png = Image.open(seg_root / "val" / "images" / f"{i:06d}.png")
        det_png = Image.open(det_root / "val" / f"{i:06d}.png")
        assert np.array_equal(np.asarray(seg_png), np.asarray(det_png))


def test_no_object_is_mostly_hidden() -> None:
    checked = 0
    for seed in range(120):  # small images are crowded: the rule is needed often
        scene = render_scene(np.random.default_rng(seed), 64, top_strokes=False)
        for k, area in enumerate(scene.areas, start=1):
            visible = int((scene.instances == k).sum())
            assert visible >= MIN_VISIBLE * area, (seed, k, visible, area)
            checked += 1
    assert checked > 400


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, det_root: Path) -> None:
    again = synth.generate(tmp_path / "again", "detection", 6, 3, SIZE, seed=11)
    assert _tree_bytes(again) == _tree_bytes(det_root)
    other = synth.generate(tmp_path / "other", "detection", 6, 3, SIZE, seed=12)
    assert (other / "train" / "000000.png").read_bytes() != (
        det_root / "train" / "000000.png"
    ).read_bytes()
    meta = json.loads((det_root / "synth_meta.json").read_text())
    assert meta["seed"] == 11 and meta["train"] == 6 and meta["classes"] == list(SHAPES)


def test_refuses_to_mix_with_existing_files(tmp_path: Path) -> None:
    out = synth.generate(tmp_path / "d", "detection", 2, 1, SIZE, seed=0)
    with pytest.raises(FileExistsError, match="not empty"):
        synth.generate(out, "detection", 1, 1, SIZE, seed=0)
    synth.generate(out, "detection", 1, 1, SIZE, seed=0, overwrite=True)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["000000.png"]
    (out / "preview.png").write_text("not ours")
    synth.generate(out, "segmentation", 1, 1, SIZE, seed=0, overwrite=True)
    assert (out / "preview.png").read_text() == "not ours"
    assert not (out / "annotations").exists()  # the detection files are gone


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "keypoints"}, "task must be"),
        ({"size": 16}, "at least 32"),
        ({"train": 0, "val": 0}, "not all 0"),
        ({"test": -1}, "must be >= 0"),
        ({"difficulty": "medium"}, "difficulty must be one of"),
        ({"image_format": "bmp"}, "image_format"),
        ({"difficulty": "clutter", "object_scale": 0.0}, "object_scale must be in"),
        ({"difficulty": "clutter", "object_scale": 1.5}, "object_scale must be in"),
        ({"difficulty": "easy", "object_scale": float("nan")}, "object_scale must be in"),
        ({"object_scale": 0.5}, "not 'hard'"),
        ({"difficulty": "clutter", "object_scale": 0.25}, "at least 32 px, got 0.25 \\* 64"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"task": "detection", "train": 1, "val": 1, "size": SIZE, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        synth.generate(tmp_path / "x", **args)


@pytest.mark.parametrize("shape", SHAPES)
def test_rasterised_area_matches_geometry(shape: str) -> None:
    radius, inner = 30.0, 0.5
    alpha = shape_alpha(shape, 100, 100, 50.0, 50.0, radius, angle=0.3, aspect=1.0, inner=inner)
    unit_area = {
        "circle": math.pi,
        "ring": math.pi * (1 - inner**2),
        "square": 1.5**2,
        "cross": 2 * 2 * 0.6 - 0.6**2,
        "triangle": 0.5 * 3 * math.sin(math.radians(120)),  # three unit-radius wedges
        "star": 10 * 0.5 * inner * math.sin(math.radians(36)),
    }[shape]
    assert alpha.sum() == pytest.approx(unit_area * radius**2, rel=0.01)
    assert abs((alpha >= 0.5).sum() - unit_area * radius**2) < 0.03 * unit_area * radius**2


def test_preview_draws_a_grid(tmp_path: Path, det_root: Path, seg_root: Path) -> None:
    for task, root in (("detection", det_root), ("segmentation", seg_root)):
        out = synth.preview(root, task, tmp_path / f"{task}.png", n=3)
        img = np.asarray(Image.open(out).convert("RGB"))
        assert img.shape[0] > 100 and img.shape[1] > 200
        assert img.std() > 10


def test_jpeg_images_for_detection(tmp_path: Path) -> None:
    root = synth.generate(tmp_path / "j", "detection", 2, 1, SIZE, seed=3, image_format="jpg")
    assert sorted(p.name for p in (root / "train").iterdir()) == ["000000.jpg", "000001.jpg"]
    ds = build_dataset("coco", root, "train")
    assert ds[1][0].shape == (3, SIZE, SIZE)
    with pytest.raises(ValueError, match="segmentation images are written as PNG"):
        synth.generate(tmp_path / "s", "segmentation", 1, 1, SIZE, image_format="jpg")


def test_easy_setting_and_test_split(tmp_path: Path) -> None:
    """The easy setting: 3 classes, 1-3 upright flat shapes on grey noise; a third split."""
    import json

    root = synth.generate(tmp_path / "e", "detection", 6, 2, 64, seed=0, test=3, difficulty="easy")
    hard = synth.generate(tmp_path / "h", "detection", 6, 2, 64, seed=0)
    ann = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in ann["categories"]] == ["circle", "triangle", "square"]
    per_image = np.bincount([a["image_id"] for a in ann["annotations"]], minlength=7)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 3
    assert {a["category_id"] for a in ann["annotations"]} <= {1, 2, 3}
    ds = build_dataset("coco", root, "test")
    assert len(ds) == 3 and ds.num_classes == 3
    # background pixels are noise around mid-grey with the documented spread
    img = np.asarray(Image.open(root / "train" / "000000.png")).astype(float)
    from pycocotools import mask as mask_utils

    covered = np.zeros(img.shape[:2], bool)
    for a in ann["annotations"]:
        if a["image_id"] == 1:
            covered |= mask_utils.decode(
                {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"]}
            ).astype(bool)
    bg = img[~covered]
    assert abs(bg.mean() - 127.5) < 6 and abs(bg.std() - 0.15 * 255) < 5
    # the train/val images do not depend on the test count, nor the hard set on the option
    again = synth.generate(tmp_path / "e2", "detection", 6, 2, 64, seed=0, difficulty="easy")
    for name in ("000000.png", "000005.png"):
        assert (again / "train" / name).read_bytes() == (root / "train" / name).read_bytes()
    assert (hard / "train" / "000000.png").read_bytes() != (
        root / "train" / "000000.png"
    ).read_bytes()
    meta = json.loads((root / "synth_meta.json").read_text())
    assert meta["difficulty"] == "easy" and meta["test"] == 3
    seg = synth.generate(tmp_path / "s", "segmentation", 2, 1, 64, seed=0, difficulty="easy")
    assert (seg / "classes.txt").read_text().split() == [
        "background",
        "circle",
        "triangle",
        "square",
    ]


def test_clutter_setting_adds_background_distractors_to_the_easy_scenes(tmp_path: Path) -> None:
    """The clutter setting: the easy classes and annotations, plus 1-4 flat-coloured
    distractors that are labelled background. Their pixels are neither in any object's mask
    nor mid-grey noise: flat colour, which no pixel of an easy scene's background is."""
    from maskd.data.synth_scene import EASY_CLUTTER, render_easy_scene

    root = synth.generate(tmp_path / "c", "detection", 8, 2, 64, seed=0, difficulty="clutter")
    ann = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in ann["categories"]] == ["circle", "triangle", "square"]
    assert json.loads((root / "synth_meta.json").read_text())["difficulty"] == "clutter"
    easy = synth.generate(tmp_path / "e", "detection", 8, 2, 64, seed=0, difficulty="easy")
    assert (easy / "train" / "000000.png").read_bytes() != (
        root / "train" / "000000.png"
    ).read_bytes()
    # every background pixel of an easy scene is grey noise; a cluttered scene has flat
    # background regions: pixels whose 3x3 neighbourhood barely varies, outside every object
    flat_fraction = []
    for index in range(8):
        for clutter in (False, True):
            rng = synth._scene_rng(0, "train", index)
            scene = render_easy_scene(rng, 64, clutter=clutter)
            img = scene.image.astype(float)
            local = (
                np.stack([np.roll(img, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
                .std(axis=0)
                .max(axis=-1)
            )
            objects = _dilate(scene.instances > 0, 2)
            flat = (local < 2.0) & ~objects
            flat_fraction.append((clutter, flat[2:-2, 2:-2].mean()))
            assert len(scene.labels) >= 1 and set(scene.labels) <= {1, 2, 3}
    plain = [f for c, f in flat_fraction if not c]
    cluttered = [f for c, f in flat_fraction if c]
    assert max(plain) == 0.0  # noise of std 38 is never flat over 3x3
    assert min(cluttered) > 0.005  # at least one distractor in every scene
    assert EASY_CLUTTER == (1, 4)


def test_object_scale_draws_full_scale_objects_on_more_background(tmp_path: Path) -> None:
    """object_scale 0.5 at 128 px: objects and distractors the size they have at 64 px
    (boxes measured from the written annotations), distractors four times as many (their
    number per area kept), objects still 1-3, so objects cover a quarter of the share they
    cover at full scale; 1.0 is the full-scale scene, draw for draw."""
    from maskd.data.synth_scene import clutter_count, render_easy_scene

    assert clutter_count(1.0) == (1, 4) and clutter_count(0.5) == (4, 16)
    n = 24
    root = synth.generate(
        tmp_path / "s", "detection", n, 1, 128, seed=0, difficulty="clutter", object_scale=0.5
    )
    full = synth.generate(tmp_path / "f", "detection", n, 1, 128, seed=0, difficulty="clutter")
    small = json.loads((root / "annotations" / "instances_train.json").read_text())
    large = json.loads((full / "annotations" / "instances_train.json").read_text())
    side = [max(a["bbox"][2:]) for a in small["annotations"]]
    # an object's outer radius is 8-25 % of the side it is drawn for (64 px here): a box
    # side of at most 2 x 16 px (+1 for the anti-aliased edge); at full scale up to 64 px
    assert max(side) <= 33 and max(max(a["bbox"][2:]) for a in large["annotations"]) > 33
    per_image = np.bincount([a["image_id"] for a in small["annotations"]], minlength=n + 1)
    assert per_image[1:].min() >= 1 and per_image.max() <= 3
    share = [sum(a["area"] for a in d["annotations"]) / (n * 128 * 128) for d in (small, large)]
    assert 0.15 < share[0] / share[1] < 0.4  # about a quarter (0.5²)
    meta = json.loads((root / "synth_meta.json").read_text())
    assert meta["object_scale"] == 0.5 and "object_scale" not in json.loads(
        (full / "synth_meta.json").read_text()
    )
    # distractor pixels (flat colour outside every object) cover about as much of the image
    # as at full scale, since their number per area is kept
    flat = {}
    for scale in (0.5, 1.0):
        fractions = []
        for index in range(8):
            scene = render_easy_scene(synth._scene_rng(0, "train", index), 128, True, scale)
            img = scene.image.astype(float)
            local = (
                np.stack([np.roll(img, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
                .std(axis=0)
                .max(axis=-1)
            )
            fractions.append(((local < 2.0) & ~_dilate(scene.instances > 0, 2)).mean())
        flat[scale] = float(np.mean(fractions))
    assert 0.5 < flat[0.5] / flat[1.0] < 2.0
    same = render_easy_scene(synth._scene_rng(0, "train", 0), 64, True, 1.0)
    again = render_easy_scene(synth._scene_rng(0, "train", 0), 64, True)
    assert np.array_equal(same.image, again.image)
