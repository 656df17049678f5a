"""Why does (or doesn't) MasKD help in the quality benchmark? Masks, loss scales, gradients.

Reads the benchmark's teacher, token variants and data (``benchmarks/quality.py`` work
folder) and measures, on the validation split only:

- per token variant and FPN level: each token's soft coverage (mean mask value), the share
  of pixels it marks (> 0.5), the mean pairwise Dice between tokens (1 = collapsed onto one
  mask), the share of its mass inside ground-truth boxes against the boxes' share of the
  image, and the token weights' spread;
- at the student's initialisation (seed 0) on one training batch: each distillation term's
  value at weight 1 and the norm of its gradient on the student's parameters, beside the
  task loss's; the same at the end of training for the trained seed-0 students, where their
  cells exist.

    python benchmarks/quality_diagnosis.py --work runs/quality
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from maskd.config_files import load_config
from maskd.data import build_dataset, detection_collate
from maskd.distiller import Distiller
from maskd.learner import TokenLearner
from maskd.losses import dice_diversity, pixel_weights
from maskd.models import build
from maskd.taps import FeatureTaps
from maskd.token_io import load_tokens
from quality import CONFIGS, RESULTS, ROOT, TASKS, TOKEN_VARIANTS, drawn, tuning_report
from quality_logs import read_log
from quality_report import header, write


def _batch(root: Path, split: str, n: int) -> tuple[list[torch.Tensor], list[dict]]:
    ds = build_dataset("coco", root, split)
    return detection_collate([ds[i] for i in range(n)])


def _inside_boxes(targets: list[dict], image: tuple[int, int], grid: tuple[int, int, int]
                  ) -> torch.Tensor:  # fmt: skip
    """``[N, H, W]``: 1 at the positions of an ``H x W`` map of ``image``-sized inputs that a
    ground-truth box reaches (boxes in the transformed images' pixels), else 0: the rows
    from the one holding the box's top edge to the one holding its bottom edge rounded up
    to a whole pixel (a box ending on a cell's first pixel reaches that cell), and so for
    the columns."""
    (h_in, w_in), (n, h, w) = image, grid
    inside = torch.zeros(n, h, w)
    for i, t in enumerate(targets):
        for x1, y1, x2, y2 in t["boxes"].tolist():
            inside[i, int(y1 / h_in * h) : int(-(-y2 // 1) / h_in * h + 1),
                   int(x1 / w_in * w) : int(-(-x2 // 1) / w_in * w + 1)] = 1  # fmt: skip
    return inside


def weight_in_boxes(masks: torch.Tensor, weights: torch.Tensor | None, inside: torch.Tensor
                    ) -> torch.Tensor:  # fmt: skip
    """``[N]``: the share of MasKD's per-pixel loss weight (:func:`maskd.losses.pixel_weights`
    of ``[N, T, H, W]`` masks, ``[N, T]`` token weights or none) that falls where ``inside``
    (``[N, H, W]``, 1 in a box) is 1. FitNet weighs every pixel alike, so its share is the
    boxes' share of the map: the distance between the two is what the masks add."""
    a = pixel_weights(masks, 1, weights)  # [N, H*W]
    return (a * inside.flatten(1)).sum(dim=1) / a.sum(dim=1).clamp_min(1e-12)


def mask_statistics(teacher: torch.nn.Module, tokens: dict, images: list, targets: list) -> dict:
    """Per level: coverage, marked share, Dice, mass inside boxes, weight spread."""
    taps = FeatureTaps(teacher, list(tokens), stop=True)
    with torch.no_grad():
        taps.run(images)
        image_list, tgts = teacher.transform(images, targets)
    h_in, w_in = image_list.tensors.shape[-2:]
    out = {}
    names = [n for path in tokens for n in taps.levels()[path]]
    toks = [t for group in tokens.values() for t in group]
    for name, tok in zip(names, toks, strict=True):
        x = taps.features[name]
        n, _, h, w = x.shape
        with torch.no_grad():
            m = tok(x)  # [N, T, H, W]
            weights = tok.token_weights(x)  # [N, T] or None
        inside = _inside_boxes(tgts, (h_in, w_in), (n, h, w))
        area = m.sum(dim=(2, 3)).clamp_min(1e-12)  # [N, T]
        mass_in = (m * inside[:, None]).sum(dim=(2, 3)) / area
        heaviest = None if weights is None else int(weights.mean(dim=0).argmax())
        out[name] = {
            "size": [h, w],
            "coverage": m.mean(dim=(0, 2, 3)).tolist(),
            "marked": (m > 0.5).float().mean(dim=(0, 2, 3)).tolist(),
            "dice": float(dice_diversity(m)) if m.shape[1] > 1 else None,
            "mass_in_boxes": mass_in.mean(dim=0).tolist(),
            "box_share": float(inside.mean()),
            "weights": None if weights is None else weights.mean(dim=0).tolist(),
            "heaviest": heaviest,
            "loss_weight_in_boxes": float(weight_in_boxes(m, weights, inside).mean()),
            # the same tokens weighted equally (distill.token_weights=equal): what head_notes
            # suggests when the head settles on one token
            "loss_weight_in_boxes_equal": (
                None if weights is None else float(weight_in_boxes(m, None, inside).mean())
            ),
        }
    return out


def class_agnostic(work: Path, spec: dict, cells: list[str], split: str = "val") -> dict:
    """Each trained cell's AP on ``split`` with and without the class labels: whether a gap
    between models is in naming the shapes or in placing and ranking the boxes."""
    ds = build_dataset("coco", work / "data", split)
    out = {}
    for cell in cells:
        role = "teacher" if cell == "teacher" else "student"
        model, _ = build(spec[role], num_classes=3, weights=str(work / cell / "model.pt"),
                         **spec["options"][role])  # fmt: skip
        model.eval()

        def batches(model: torch.nn.Module = model) -> Any:
            for start in range(0, len(ds), 50):
                images, targets = detection_collate(
                    [ds[i] for i in range(start, min(start + 50, len(ds)))]
                )
                with torch.no_grad():
                    yield model(images), targets

        out[cell] = aware_and_agnostic(batches())
    return out


def aware_and_agnostic(batches: Any) -> dict[str, float]:
    """COCO AP of ``(predictions, targets)`` batches as they are and with every box and
    prediction relabelled 1 (class-agnostic), and the recall at 100 detections (percent)."""
    from maskd.metrics import DetectionMetrics

    aware, agnostic = DetectionMetrics(), DetectionMetrics()
    for preds, targets in batches:
        aware.update(preds, targets)
        agnostic.update(*(
            [{**d, "labels": torch.ones_like(d["labels"])} for d in part]
            for part in (preds, targets)
        ))  # fmt: skip
    a, b = aware.compute(), agnostic.compute()
    return {"ap": 100 * float(a["map"]), "ap_agnostic": 100 * float(b["map"]),
            "recall_100": 100 * float(a["mar_100"])}  # fmt: skip


def _agnostic_md(r: dict[str, Any]) -> str:
    lines = ["| cell | AP | class-agnostic AP | recall at 100 |", "|---|---:|---:|---:|"]
    lines += [f"| {c} | {v['ap']:.1f} | {v['ap_agnostic']:.1f} | {v['recall_100']:.1f} |"
              for c, v in r["cells"].items()]  # fmt: skip
    return (
        f"Machine: {r['machine']}\n\nCommand: `{r['command']}`\n\n"
        f"COCO AP on the {r['split']} split, with the class labels and with every box and "
        "prediction relabelled as one class (percent):\n\n" + "\n".join(lines) + "\n"
    )


def _teacher(plan_work: Path, spec: dict) -> tuple[torch.nn.Module, list[str]]:
    """The benchmark's trained teacher (a fresh copy) and its default layers."""
    return build(spec["teacher"], num_classes=3, weights=str(plan_work / "teacher" / "model.pt"),
                 **spec["options"]["teacher"])  # fmt: skip


def _initialised_distiller(plan_work: Path, spec: dict, variants: bool = False
                           ) -> tuple[Any, str, Distiller]:  # fmt: skip
    """The benchmark's teacher and a seed-0 student under MasKD, FitNet, CWD and FGD at
    weight 1 (fresh connectors, as when training starts): (student, FPN path, distiller).
    ``variants``: MasKD also with its tokens weighted equally (``maskd_equal``) and with the
    tokens learned without the head (``maskd_unweighted``, where that variant was trained)."""
    teacher, _ = _teacher(plan_work, spec)
    torch.manual_seed(0)
    student, layers = build(spec["student"], num_classes=3, **spec["options"]["student"])
    fpn = layers[0]
    terms = [{"kind": k, "student": fpn, "teacher": fpn} for k in ("fitnet", "cwd")]
    terms.append({"kind": "fgd", "student": fpn, "teacher": fpn, "detector": "fcos"})
    tokens = load_tokens(plan_work / "tokens" / "tokens.pt")
    maskd = {"kind": "maskd", "student": fpn, "teacher": fpn, "tokens": tokens}
    more = []
    if variants:
        more.append({**maskd, "name": "maskd_equal", "token_weights": "equal"})
        unweighted = plan_work / "tokens_unweighted" / "tokens.pt"
        if unweighted.is_file():
            more.append({**maskd, "name": "maskd_unweighted", "tokens": load_tokens(unweighted)})
    return student, fpn, Distiller(student, teacher, [maskd, *more, *terms]).train()


def _objective_parts(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The distiller's output as the objective's parts: the summed task losses as ``task``,
    then each ``loss_<term>`` (per-level ``<term>/<level>`` values are left out)."""
    task = sum(v for k, v in losses.items() if not k.startswith("loss_") and "/" not in k)
    return {"task": task} | {k: v for k, v in losses.items() if k.startswith("loss_")}


def loss_scales(plan_work: Path, spec: dict, images: list, targets: list) -> dict:
    """Each term at weight 1 (fresh connectors, as when training starts) and its gradient
    norm on the student's parameters, beside the task loss's."""
    student, _, d = _initialised_distiller(plan_work, spec)
    parts = _objective_parts(d(images, targets))
    params = [p for p in student.parameters() if p.requires_grad]
    out = {}
    for name, value in parts.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
        out[name] = {"value": float(value.detach()), "grad_norm": float(norm)}
    return out


def level_shares(plan_work: Path, spec: dict, images: list, targets: list) -> dict:
    """Per FPN level of the student: each term's value at weight 1 (its logged per-level
    diagnostic) and the norm of its gradient on that level's output, beside the task loss's.

    At 64 px the FPN's P6 and P7 are 1 x 1: a spatial softmax (CWD) has nothing to
    distribute there, while per-position losses (FitNet, MasKD) still count them in full.
    """
    student, fpn, d = _initialised_distiller(plan_work, spec, variants=True)
    levels: dict[str, torch.Tensor] = {}
    hook = student.get_submodule(fpn).register_forward_hook(lambda _m, _i, out: levels.update(out))
    try:
        losses = d(images, targets)
    finally:
        hook.remove()
    names = list(levels)
    with torch.no_grad():
        image_list, tgts = student.transform(images, targets)
    size = tuple(image_list.tensors.shape[-2:])
    inside = {n: _inside_boxes(tgts, size, (len(images), *levels[n].shape[-2:])) for n in names}
    parts = _objective_parts(losses)
    out: dict[str, Any] = {
        "levels": {n: list(levels[n].shape[-2:]) for n in names},
        "box_share": {n: float(inside[n].mean()) for n in names},
    }
    for name, value in parts.items():
        grads = torch.autograd.grad(value, [levels[n] for n in names], retain_graph=True,
                                    allow_unused=True)  # fmt: skip
        norms = [0.0 if g is None else float(g.float().norm()) for g in grads]
        total = sum(v * v for v in norms) or 1.0
        term = name.removeprefix("loss_")
        per_level = {}
        for n, norm, g in zip(names, norms, grads, strict=True):
            diag = [v for k, v in losses.items() if k.startswith(f"{term}/") and
                    k.split(":")[-1] == str(n)]  # fmt: skip
            sq = None if g is None else g.float().pow(2).sum(dim=1)  # [N, H, W]
            per_level[n] = {
                "value": float(diag[0]) if diag else None,
                "grad_norm": norm,
                "grad_share": norm * norm / total,
                # the share of this level's squared gradient at positions inside boxes
                "in_boxes": None
                if sq is None or float(sq.sum()) == 0.0
                else float((sq * inside[n]).sum() / sq.sum()),
            }
        out[name] = per_level
    return out


def stage1_shares(plan_work: Path, cfg: dict, spec: dict, images: list, targets: list) -> dict:
    """Stage 1 at its start (tokens initialised with seed 0, the benchmark's ``masks``
    settings ``cfg``): the share of the squared gradient norm that the teacher's task loss
    and the Dice term each put on every level's tokens (and weighting head)."""
    teacher, layers = _teacher(plan_work, spec)
    torch.manual_seed(0)
    learner = TokenLearner(teacher, layers, cfg["num_tokens"], cfg["weighted"],
                           cfg["dice_weight"]).train()  # fmt: skip
    groups = {
        name: list(tokens.parameters())
        for path, group in learner.tokens().items()
        for name, tokens in zip(learner.level_names[path], group, strict=True)
    }
    params = [p for ps in groups.values() for p in ps]
    losses = learner(images, targets)
    parts = {
        "task": sum(v for k, v in losses.items() if k != "loss_dice"),
        "dice": losses["loss_dice"],
    }
    out = {}
    for name, value in parts.items():
        grads = iter(torch.autograd.grad(value, params, retain_graph=True, allow_unused=True))
        sq = {n: sum(0.0 if (g := next(grads)) is None else float(g.float().pow(2).sum())
                     for _ in ps) for n, ps in groups.items()}  # fmt: skip
        total = sum(sq.values()) or 1.0
        out[name] = {n: v / total for n, v in sq.items()}
    return out


def _trained_coverage(plan_work: Path, spec: dict, images: list, targets: list) -> dict:
    """The stage-1 tokens' mean mask value per level (means over tokens and images)."""
    teacher, _ = _teacher(plan_work, spec)
    tokens = load_tokens(plan_work / "tokens" / "tokens.pt")
    stats = mask_statistics(teacher.eval(), tokens, images, targets)
    return {n: sum(v["coverage"]) / len(v["coverage"]) for n, v in stats.items()}


def _levels_md(r: dict[str, Any]) -> str:
    lv = r["levels"]
    names = list(lv["levels"])
    head = " | ".join(f"{n} ({lv['levels'][n][0]}×{lv['levels'][n][1]})" for n in names)
    lines = [
        "Per FPN level of the initialised student (seed 0, one training batch of 16), each "
        "term at weight 1: its per-level value and the share of its squared gradient norm on "
        "the student's FPN outputs that lands on each level. Stage 1 at its start (tokens "
        "initialised, the same batch): the share of the task loss's and the Dice term's "
        "squared gradient norm on each level's tokens. Last row: the trained tokens' mean "
        'mask value on validation images. Rows "in boxes": the share of the term\'s squared '
        "gradient on a level that lies at positions inside ground-truth boxes, beside the "
        "boxes' share of the positions (the share a gradient spread evenly over the positions "
        "would have).",
        "",
        f"| term | | {head} |",
        "|---|---|" + "---:|" * len(names),
    ]
    fmt = lambda v: "" if v is None else f"{v:.3g}"  # noqa: E731
    pct = lambda v: "" if v is None else f"{100 * v:.0f} %"  # noqa: E731
    lines.append("| boxes | share of the positions | "
                 + " | ".join(pct(lv["box_share"][n]) for n in names) + " |")  # fmt: skip
    for term, per in lv.items():
        if term in ("levels", "box_share"):
            continue
        if term != "task":
            lines.append(f"| {term} | value | " + " | ".join(fmt(per[n]["value"]) for n in names)
                         + " |")  # fmt: skip
        lines.append(f"| {term} | gradient share | "
                     + " | ".join(f"{100 * per[n]['grad_share']:.0f} %" for n in names) + " |")  # fmt: skip
        lines.append(f"| {term} | gradient in boxes | "
                     + " | ".join(pct(per[n]["in_boxes"]) for n in names) + " |")  # fmt: skip
    by_level = lambda d: {k.split(":")[-1]: v for k, v in d.items()}  # noqa: E731
    if "stage1" in r:
        for part, shares in r["stage1"].items():
            per = by_level(shares)
            lines.append(f"| stage 1, {part} → tokens | gradient share | "
                         + " | ".join(f"{100 * per[n]:.0f} %" for n in names) + " |")  # fmt: skip
    if "coverage" in r:
        per = by_level(r["coverage"])
        lines.append("| stage-1 tokens (trained), validation images | mean mask value | "
                     + " | ".join(f"{per[n]:.3g}" for n in names) + " |")  # fmt: skip
    return f"Machine: {r['machine']}\n\nCommand: `{r['command']}`\n\n" + "\n".join(lines) + "\n"


def _curve(cell: Path, key: str | None) -> dict[str, Any]:
    """Task and (weighted) distillation loss over the first and last five logged steps of a
    finished cell (its ``result.json`` written); {} for one still training, whose last steps
    are not its last."""
    if not (cell / "result.json").is_file():
        return {}
    log = {name: dict(points) for name, points in read_log(cell).items()}
    steps = sorted(log.get("train/loss", {}))
    task = ("classification", "bbox_regression", "bbox_ctrness")

    def mean(part: list[int], name: str | None) -> float | None:
        if name is None:
            vals = [sum(log[f"train/{t}"][s] for t in task) for s in part]
        else:
            vals = [log[f"train/{name}"][s] for s in part if s in log.get(f"train/{name}", {})]
        return sum(vals) / len(vals) if vals else None

    if not steps:
        return {}
    first, last = steps[:5], steps[-5:]
    return {
        "task_first": mean(first, None),
        "task_last": mean(last, None),
        "distill_first": mean(first, key) if key else None,
        "distill_last": mean(last, key) if key else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="detection")
    parser.add_argument("--work", type=Path, default=Path("runs/quality"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--data-seed", type=int, default=0,
                        help="another draw of the task's data: its work folder "
                        "(<task>_data<seed>, as quality.py --data-seed) and reports")  # fmt: skip
    parser.add_argument("--levels", action="store_true",
                        help="only the per-level values and gradient shares "
                        "(quality_<task>_levels_cpu.{json,md})")  # fmt: skip
    parser.add_argument("--agnostic", nargs="+", metavar="CELL",
                        help="only each named cell's validation AP with and without class "
                        "labels, e.g. teacher student_s0 (quality_<task>_agnostic_cpu)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = TASKS[args.task]
    if "shares" in spec:
        raise SystemExit(f"task {args.task} reuses {spec['shares']}'s teacher, tokens and data: "
                         f"run this with --task {spec['shares']}")  # fmt: skip
    if args.data_seed < 0:
        raise SystemExit(f"--data-seed must be >= 0, got {args.data_seed}")
    name = drawn(args.task, args.data_seed)
    work = args.work / name
    # the cells this run reads: --agnostic names its own; every other report needs the teacher
    for cell in args.agnostic or ["teacher"]:
        if not (work / cell / "model.pt").is_file():
            raise SystemExit(f"no trained {cell} at {work / cell / 'model.pt'}: run "
                             f"benchmarks/quality.py --task {args.task} --data-seed "
                             f"{args.data_seed} first")  # fmt: skip
    if args.agnostic:
        report = {
            **header("quality_agnostic", args.task, "cpu"),
            "split": "val",
            "cells": class_agnostic(work, spec, args.agnostic),
        }
        write(args.out, f"quality_{name}_agnostic_cpu", report, _agnostic_md(report))
        return
    if args.levels:
        train_images, train_targets = _batch(work / "data", "train", 16)
        report = {
            **header("quality_levels", args.task, "cpu"),
            "levels": level_shares(work, spec, train_images, train_targets),
            "stage1": stage1_shares(
                work,
                load_config(CONFIGS / args.task / "learn_masks.yaml")["masks"],
                spec,
                train_images,
                train_targets,
            ),
            "coverage": _trained_coverage(work, spec, *_batch(work / "data", "val", args.images)),
        }
        write(args.out, f"quality_{name}_levels_cpu", report, _levels_md(report))
        return
    images, targets = _batch(work / "data", "val", args.images)
    teacher = _teacher(work, spec)[0].eval()
    masks = {}
    for variant in (*TOKEN_VARIANTS, "tokens_random"):
        path = work / variant / "tokens.pt"
        if path.is_file():
            masks[variant] = mask_statistics(teacher, load_tokens(path), images, targets)
    train_images, train_targets = _batch(work / "data", "train", 16)
    scales = {"initialised": loss_scales(work, spec, train_images, train_targets)}
    tuning = tuning_report(args.task, args.out, "cpu")
    curves = {}
    if tuning.is_file():
        for method, entry in json.loads(tuning.read_text())["methods"].items():
            if entry["chosen"] is not None:
                curve = _curve(work / f"{method}_w{entry['chosen']:g}_s0", f"loss_{method}")
                if curve:  # a draw whose cells live elsewhere, or are not trained yet
                    curves[method] = {"weight": entry["chosen"], **curve}
    curves["student"] = _curve(work / "student_s0", None)
    report = {
        **header("quality_diagnosis", args.task, "cpu"),
        "data_seed": args.data_seed,
        "images": args.images,
        "configs": str((CONFIGS / args.task).relative_to(ROOT)),
        "masks": masks,
        "loss_scales": scales,
        "training": curves,
    }
    write(args.out, f"quality_{name}_diagnosis_cpu", report, _md(report))


def _heaviest(v: dict[str, Any]) -> str:
    """The marked share and mass in boxes of the token with the largest mean weight; blank
    without a weighting head, or in a report written before this was kept."""
    k = v.get("heaviest")
    return "" if k is None else f"{v['marked'][k]:.2f}, {v['mass_in_boxes'][k]:.2f}"


def _weight_in_boxes(v: dict[str, Any], key: str = "loss_weight_in_boxes") -> str:
    share = v.get(key)
    return "" if share is None else f"{share:.2f}"


def _md(r: dict[str, Any]) -> str:
    draw = f" of data seed {r['data_seed']}" if r.get("data_seed") else ""
    lines = [f"Masks of the teacher's tokens on {r.get('images', 32)} validation images{draw}, "
             "per FPN level "
             "(means over tokens; per-token values in the JSON):", "",
             "| tokens | level | coverage | marked > 0.5 | pairwise Dice | mass in boxes | "
             "boxes' share | max token weight | heaviest token: marked, mass in boxes | "
             "MasKD's pixel weight in boxes | the same, tokens weighted equally |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for variant, levels in r["masks"].items():
        for level, v in levels.items():
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            dice = "" if v["dice"] is None else f"{v['dice']:.2f}"
            wmax = "" if v["weights"] is None else f"{max(v['weights']):.2f}"
            lines.append(
                f"| {variant} | {level.split(':')[-1]} | {mean(v['coverage']):.2f} | "
                f"{mean(v['marked']):.2f} | {dice} | {mean(v['mass_in_boxes']):.2f} | "
                f"{v['box_share']:.2f} | {wmax} | {_heaviest(v)} | {_weight_in_boxes(v)} | "
                f"{_weight_in_boxes(v, 'loss_weight_in_boxes_equal')} |"
            )
    lines += ["", "Loss values at weight 1 and gradient norms on the student's parameters "
              "(one training batch of 16):", "", "| student | term | value | gradient norm |",
              "|---|---|---:|---:|"]  # fmt: skip
    for when, parts in r["loss_scales"].items():
        for name, v in parts.items():
            lines.append(f"| {when} | {name} | {v['value']:.4g} | {v['grad_norm']:.4g} |")
    lines += ["", "During training (seed-0 cell at the chosen weight; means of the first and "
              "last five logged steps; the distillation loss with its weight):", "",
              "| row | weight | task loss first → last | distillation loss first → last |",
              "|---|---:|---|---|"]  # fmt: skip
    fmt = lambda v: "" if v is None else f"{v:.3g}"  # noqa: E731
    for row, c in r["training"].items():
        if not c:
            continue
        dist = "" if c["distill_first"] is None else (
            f"{fmt(c['distill_first'])} → {fmt(c['distill_last'])}")  # fmt: skip
        weight = "" if c.get("weight") is None else f"{c['weight']:g}"
        lines.append(
            f"| {row} | {weight} | {fmt(c['task_first'])} → {fmt(c['task_last'])} | {dist} |"
        )
    return f"Machine: {r['machine']}\n\nCommand: `{r['command']}`\n\n" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
