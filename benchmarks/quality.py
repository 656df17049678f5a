"""Does distilling make a better student? Teacher, student alone, peers, MasKD and ablations.

Trains every model of the table from scratch through the ``maskd`` command line, on a
synthetic dataset with three splits (train / val / test), and writes
``benchmarks/results/quality_<task>_<device>.{json,md,png}``:

- the teacher and the stage-1 tokens are trained once and shared by every row;
- every student row has the same data, recipe, step count and seeds; only its
  distillation term differs; each row runs ``--seeds`` seeds (initialisation, data order);
- loss weights are chosen on the validation split by ``--tune`` (the same grid of weights
  for every method, seed 0) and read from its result file; the test split is reported and
  never used to choose anything.

Every trained model is a *cell* with its own folder and ``result.json``; a re-run skips
finished cells, so a run stopped midway (or split over several sittings) ends with the same
table. The student cells' results and the teacher's scores are also kept under
``results/quality_cells/``: from a fresh work folder the teacher and tokens are trained again
only while a student cell still needs them. ``--workers 2`` runs two cells at once, each on
one torch thread. The reports (statistics, pairings, markdown, plot) are
``quality_report.py``'s.

    python benchmarks/quality.py --tune          # the validation sweep (writes *_tuning_*)
    python benchmarks/quality.py                 # the table, with the tuned weights
    python benchmarks/quality.py --data-seed 1   # the table again on another draw of the data
    python benchmarks/quality.py --pool results/quality_<task>_cpu.json \
        results/quality_<task>_data1_cpu.json    # the draws' tables pooled
    python benchmarks/quality.py --pool ... --teacher-bar 5 --variant maskd=maskd_unweighted
                                 # leave out weak teachers; a setting chosen on validation
    python benchmarks/quality.py --quick --work /tmp/q --out /tmp/q/results   # smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from maskd.config_files import load_config
from quality_logs import train_log
from quality_pool import pool, pooled_md
from quality_report import (
    header,
    pairings,
    plot,
    rerender,
    stats,
    summary_md,
    table_md,
    tuning_md,
    write,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ROOT / "configs" / "quality"
METRIC = {"detection": "map", "segmentation": "miou"}
SECOND = {"detection": "map_50", "segmentation": "pixel_acc"}
# data: (train, val, test, size); models and the layer every term distils
TASKS: dict[str, dict[str, Any]] = {
    "detection": {
        "kind": "detection",
        "data": (1500, 200, 300, 64),
        "difficulty": "easy",  # `maskd data synth --difficulty`
        "student": "fcos_resnet18_fpn",
        "teacher": "fcos_resnet50_fpn",
        # model options that change the weights' layout (evaluation builds the same model)
        "options": {
            "student": {"min_size": 64, "max_size": 64},
            "teacher": {"min_size": 64, "max_size": 64},
        },
        "peers": ("fitnet", "cwd", "fgd"),
        # each method's published default weight; the sweep tries it ×0.3, ×1 and ×3
        "defaults": {"fitnet": 1.0, "cwd": 10.0, "fgd": 1.0, "maskd": 10.0},
        "fpn": "backbone.fpn",  # the distilled layer (--levels picks among its levels)
        "ablations": True,
    },
    "segmentation": {
        "kind": "segmentation",
        "data": (1500, 200, 300, 64),
        "difficulty": "easy",
        "student": "lraspp_mobilenet_v3_large",
        "teacher": "deeplabv3_resnet18",
        "options": {"student": {}, "teacher": {"aux_loss": True, "aux_weight": 0.4}},
        "peers": ("fitnet", "cwd", "logits_kd"),
        # CWD: mmrazor's Cityscapes weight 3 (tau 1); MasKD: the authors' segmentation 0.5
        "defaults": {"fitnet": 1.0, "cwd": 3.0, "logits_kd": 1.0, "maskd": 0.5},
        "ablations": False,  # the ablations are a detection table
    },
}
# The detection regime with FCOS's scale ranges divided by 4 for its 64 px images, so that
# objects train P4 as well as P3 (configs/quality/detection_ranges/teacher.yaml says why).
RANGES = [[0, 16], [16, 32], [32, 64], [64, 128], [128, float("inf")]]
TASKS["detection_ranges"] = {
    **TASKS["detection"],
    "options": {
        role: {**options, "regress_ranges": RANGES}
        for role, options in TASKS["detection"]["options"].items()
    },
}
# The same regime at 128 px: objects twice the size (a fraction of the image side) and the
# ranges divided by 2, so every object trains the FPN level it trains at 64 px and only the
# maps grow (P3 is 16 x 16); the test of whether MasKD's masks need more positions to select
# from (configs/quality/detection_ranges128/teacher.yaml).
RANGES_128 = [[0, 32], [32, 64], [64, 128], [128, 256], [256, float("inf")]]
TASKS["detection_ranges128"] = {
    **TASKS["detection"],
    "data": (1500, 200, 300, 128),
    "options": {
        role: {**options, "min_size": 128, "max_size": 128, "regress_ranges": RANGES_128}
        for role, options in TASKS["detection"]["options"].items()
    },
    # the sweep's centres: each method's weight chosen on validation at 64 px
    # (quality_detection_ranges_tuning_cpu.md), so no method needs the grid's extensions
    # to get back to it; the same ×0.3 / ×1 / ×3 rule for every method
    "defaults": {"fitnet": 3.0, "cwd": 90.0, "fgd": 3.0, "maskd": 10.0},
    "defaults_are": "weight chosen in the detection_ranges sweep (64 px)",
    # validation AP moves by up to 18 between weights ×3 apart here (FitNet: 58.7 at 3, 76.8
    # at 9), more than the rows differ: the sweep also tries the best's ×√3 neighbours
    "refine": True,
}
# The 64 px regime of detection_ranges on cluttered scenes: the easy data with 1-4
# object-sized distractors under the objects (`maskd data synth --difficulty clutter`), so a
# term that imitates every position also imitates background that looks like objects, the
# case MasKD's masks are meant for (configs/quality/detection_clutter/teacher.yaml).
TASKS["detection_clutter"] = {
    **TASKS["detection_ranges"],
    "difficulty": "clutter",
    # the sweep's centres: each method's weight chosen on validation in detection_ranges
    "defaults": {"fitnet": 3.0, "cwd": 90.0, "fgd": 3.0, "maskd": 10.0},
    "defaults_are": "weight chosen in the detection_ranges sweep",
}
# detection_clutter with the students' learning-rate warm-up chosen on validation
# (quality_warmup.py: the student alone at 50-200 steps) and every weight swept again under
# it: the same data, teacher and tokens, reused (configs/quality/detection_clutter_warmup).
TASKS["detection_clutter_warmup"] = {**TASKS["detection_clutter"], "shares": "detection_clutter"}
# detection_clutter_warmup with the teacher warmed up over the same 100 steps (its own teacher
# and tokens, configs/quality/detection_clutter_stable): no model trains on the recipe whose
# early training spiked. The weights are those chosen in detection_clutter_warmup's sweep,
# fixed before this task ran (the same student recipe; only the teacher differs).
TASKS["detection_clutter_stable"] = {
    **TASKS["detection_clutter"],
    "weights_from": "detection_clutter_warmup",
}
# detection_clutter_stable's scenes at 128 px with objects and distractors the size they have
# at 64 px (`maskd data synth --object_scale 0.5`): distractors keep their number per area,
# objects stay 1-3 per image, so the boxes cover about a quarter of the share of P3 they cover
# at 64 px (on a 16 x 16 map), nearer COCO's mostly-background maps. The test of whether
# MasKD's masks select, and help, once most of a map is background. Scale ranges stay
# those of the 64 px regimes (the objects' pixel sizes did not change); the weights are
# detection_clutter_warmup's, fixed before this task ran (configs/quality/detection_sparse).
TASKS["detection_sparse"] = {
    **TASKS["detection_clutter"],
    "data": (1500, 200, 300, 128),
    "object_scale": 0.5,
    "options": {
        role: {**options, "min_size": 128, "max_size": 128}
        for role, options in TASKS["detection_clutter"]["options"].items()
    },
    "weights_from": "detection_clutter_warmup",
}
# detection_sparse with the students' warm-up chosen on its own validation split by the student
# alone (quality_warmup.py, fixed before it ran): the same data, teacher and tokens, reused,
# and the same weights (configs/quality/detection_sparse_warmup).
TASKS["detection_sparse_warmup"] = {**TASKS["detection_sparse"], "shares": "detection_sparse"}
# detection_sparse_warmup on the cheaper trainer settings (every model in channels-last
# layout, the distilled rows' teacher trunk cached per sample; values equal up to rounding):
# its own data, teacher and tokens, the same weights (configs/quality/detection_sparse_fast).
TASKS["detection_sparse_fast"] = {
    k: v for k, v in TASKS["detection_sparse_warmup"].items() if k != "shares"
}
# The second detector family: RetinaNet with anchors a quarter of torchvision's for the same
# 64 px images, and the authors' RetinaNet recipe for MasKD, which adds an L1 KD term on the
# box-regression head (configs/quality/detection_retina/distill.yaml).
ANCHORS = [8, 16, 32, 64, 128]
TASKS["detection_retina"] = {
    **TASKS["detection"],
    "student": "retinanet_resnet18_fpn",
    "teacher": "retinanet_resnet50_fpn",
    "options": {
        "student": {"min_size": 64, "max_size": 64, "anchor_sizes": ANCHORS},
        "teacher": {"min_size": 64, "max_size": 64, "anchor_sizes": ANCHORS},
    },
    # MasKD: the authors' RetinaNet weight 7; the others as for FCOS
    "defaults": {"fitnet": 1.0, "cwd": 10.0, "fgd": 1.0, "maskd": 7.0},
    "head_kd": True,  # the MasKD rows keep distill.yaml's head term; the peers drop it
}
# the Lightning precisions a --precision diagnostic may name
PRECISIONS = ("64-true", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
QUICK = {"data": (16, 8, 8, 64), "teacher_steps": 4, "student_steps": 2, "tokens_steps": 2}
SEEDS = 3  # the protocol's seeds per student row
TUNE_FACTORS = (0.3, 1.0, 3.0)
TUNE_STEP = 3.0
MAX_EXTENSIONS = 2
REFINE_STEP = math.sqrt(TUNE_STEP)


@dataclass
class Row:
    """One row of the table: how its students are trained."""

    name: str
    label: str
    method: str | None = None  # "maskd", a peer term kind, or None (student alone)
    tokens: str = "tokens"  # which stage-1 variant (MasKD rows)
    overrides: list[str] = field(default_factory=list)
    term: dict[str, Any] = field(default_factory=dict)  # merged into a peer's terms
    ablation: bool = False
    opt_in: bool = False  # trained only when --rows names it
    only_if: str | None = None  # a task key this row needs (e.g. a recipe with head KD)


ROWS = [
    Row("student", "student alone"),
    Row("fitnet", "FitNet", "fitnet"),
    Row("cwd", "CWD", "cwd"),
    Row("fgd", "FGD", "fgd"),
    Row("logits_kd", "logits KD", "logits_kd"),
    Row("maskd", "MasKD", "maskd"),
    Row("maskd_nodice", "MasKD, no Dice term in stage 1", "maskd", "tokens_nodice", ablation=True),
    Row(
        "maskd_unweighted", "MasKD, unweighted tokens", "maskd", "tokens_unweighted", ablation=True
    ),
    Row("maskd_t1", "MasKD, T = 1", "maskd", "tokens_t1", ablation=True),
    Row(
        "maskd_nocustom",
        "MasKD, custom mask off",
        "maskd",
        overrides=["--distill.custom_mask_warmup=null"],
        ablation=True,
    ),
    Row(
        "maskd_random", "MasKD, untrained (random) tokens", "maskd", "tokens_random", ablation=True
    ),
    Row("maskd_ones", "MasKD, all-ones masks (= FitNet at MasKD's weight)", "ones", ablation=True),
    Row(
        "maskd_nohead",
        "MasKD, the same tokens weighted equally in stage 2 (the head's weights unused)",
        "maskd",
        "tokens_nohead",
        ablation=True,
    ),
    Row(
        "maskd_nohkd",
        "MasKD without the head KD term (tasks whose MasKD recipe has one)",
        "maskd",
        overrides=["--distill.head_kd=null"],
        ablation=True,
        only_if="head_kd",
    ),
    # a peer's other published setting, for --pool --variant (chosen on validation)
    Row("cwd_t4", "CWD, tau 4", "cwd", term={"tau": 4.0}, ablation=True, opt_in=True),
    Row(
        "maskd_long",
        "MasKD, stage 1 at the authors' 2,000 steps",
        "maskd",
        "tokens_long",
        ablation=True,
    ),
]
TOKEN_VARIANTS = {
    "tokens": [],
    "tokens_nodice": ["--masks.dice_weight=0.0"],
    "tokens_unweighted": ["--masks.weighted=false"],
    "tokens_t1": ["--masks.num_tokens=1"],
    "tokens_long": ["--trainer.max_steps=2000"],
}


def task_rows(spec: dict[str, Any]) -> list[Row]:
    """The rows a task's table has: its peers, MasKD and (where it has them) the ablations."""
    methods = {None, "maskd", "ones", *spec["peers"]}
    return [
        r
        for r in ROWS
        if r.method in methods
        and (spec["ablations"] or not r.ablation)
        and (r.only_if is None or spec.get(r.only_if))
    ]


@dataclass
class Cell:
    """One unit of work: trains (or writes) one thing into its own folder."""

    name: str
    deps: list[str]
    commands: list[tuple[list[str], str | None]]  # (command, file that marks it done)
    done_file: str = "result.json"
    finish: Any = None  # callable(cell_dir) -> None, writes done_file
    keep: bool = False  # a trained student: its result is also kept under results/
    home: Path | None = None  # the work folder it lives in, if not the run's (shared cells)


def _maskd(*args: str) -> list[str]:
    return [sys.executable, "-m", "maskd.cli", *args]


# exit statuses that say nothing about the cell's training: its run folder was busy
# (maskd's 75), or it was stopped by a signal (negative: killed; 128 + N: maskd stopped
# cleanly on signal N). Such a cell stays unfinished, to resume, instead of being recorded.
_FOLDER_BUSY = 75  # maskd.engine.run_lock.RunFolderInUse.exit_code (not imported: Lightning)


def _is_a_result(returncode: int) -> bool:
    """Whether a failed cell's exit status is its outcome (e.g. a diverged run), to record."""
    return returncode > 0 and returncode != _FOLDER_BUSY and not 128 < returncode < 160


def _run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env)


def drawn(task: str, data_seed: int) -> str:
    """The work folder's name of ``task`` on the draw of its data made with ``data_seed``
    (seed 0: the task's own name)."""
    return f"{task}_data{data_seed}" if data_seed else task


class Plan:
    """The cells of one task and the settings they share."""

    def __init__(self, task: str, args: argparse.Namespace) -> None:
        self.task = task
        self.spec = TASKS[task]
        self.kind = self.spec["kind"]  # detection | segmentation
        self.args = args
        self.quick = args.quick
        # another draw of the same kind of data: every model is new, so its own work folder,
        # kept cells and report; the weights stay those chosen on the data of seed 0
        self.data_seed: int = getattr(args, "data_seed", 0)
        self.work = args.work / drawn(task, self.data_seed)
        # a task that only changes the students' recipe reuses another's data, teacher and
        # tokens (their folder and configs): the same models, not trained again
        shares = self.spec.get("shares", task)
        self.shared = args.work / drawn(shares, self.data_seed)
        self.shared_cfg = CONFIGS / shares
        self.data = self.shared / "data"
        # committed results of student cells, and the teacher's scores (of the shared folder's)
        self.kept = args.out / "quality_cells" / self.work.name
        self.shared_kept = args.out / "quality_cells" / self.shared.name
        self.cfg = CONFIGS / task
        self.trainer = [
            f"--trainer.accelerator={args.accelerator}",
            "--trainer.progress_bar=false",
        ]
        self.resume = ["--run.resume=auto"]  # a cell stopped midway continues
        # a diagnostic schedule: every student cell runs this many steps (its own cells)
        self.student_steps: int | None = getattr(args, "student_steps", None)
        # a diagnostic warm-up: every student cell warms its learning rate up this many steps
        self.warmup_steps: int | None = getattr(args, "warmup_steps", None)
        # a diagnostic precision: every student cell trains in this Lightning precision
        self.precision: str | None = getattr(args, "precision", None)
        # a diagnostic level set: every distilled cell distils only these FPN levels
        self.levels: list[str] | None = getattr(args, "levels", None)
        if self.levels and "fpn" not in self.spec:
            raise SystemExit(f"--levels selects FPN levels; the {task} task has no FPN")
        if self.quick:
            self.trainer += [
                "--trainer.checkpoint_every_n_steps=1",
                "--trainer.log_every_n_steps=1",
            ]

    @property
    def diagnostic(self) -> bool:
        """Whether the plan's cells are a diagnostic variant of the table's (own report)."""
        return bool(self.student_steps or self.warmup_steps or self.precision or self.levels)

    def suffix(self, distilled: bool = True) -> str:
        """What a diagnostic schedule, warm-up, precision or level set adds to cell and report
        names."""
        suffix = f"_steps{self.student_steps}" if self.student_steps else ""
        suffix += f"_warmup{self.warmup_steps}" if self.warmup_steps else ""
        suffix += f"_precision{self.precision}" if self.precision else ""
        if self.levels and distilled:  # the student alone distils nothing: its cells stay
            suffix += f"_lv{'-'.join(self.levels)}"
        return suffix

    def cell(self, row: Row, weight: float | None, seed: int) -> str:
        """The name of a row's cell in this plan (:func:`cell_name` with :meth:`suffix`)."""
        return cell_name(row, weight, seed, self.suffix(row.method is not None))

    def report_stem(self, seeds: int) -> str:
        """The table report's file name: a diagnostic's suffix, and more seeds than the
        protocol's three give reports of their own beside the table's (the cells shared)."""
        more = f"_seeds{seeds}" if seeds > SEEDS else ""
        if self.data_seed:
            more = f"_data{self.data_seed}{more}"
        return f"quality_{self.task}{self.suffix()}{more}_{self.args.accelerator}"

    def home(self, name: str) -> Path:
        """The work folder of cell ``name``: the data, teacher and tokens are the shared ones."""
        shared = name in ("data", "teacher") or name.startswith("tokens")
        return self.shared if shared else self.work

    def read(self, name: str) -> dict[str, Any]:
        """A cell's result, from the work folder or from the kept copy."""
        path = self.home(name) / name / "result.json"
        return json.loads((path if path.is_file() else self.kept / f"{name}.json").read_text())

    def teacher_record(self) -> Path:
        """Where the teacher's scores and fingerprints are kept beside the student cells."""
        return self.shared_kept / "teacher.json"

    def teacher_result(self) -> dict[str, Any]:
        """The teacher's scores, with the fingerprints of its data and its own weights.

        Read from its folder where it is there (and kept: :meth:`teacher_record`), else
        from the kept record, so a table whose student cells are all kept is reported from
        a fresh work folder without training the teacher again."""
        folder, record = self.shared / "teacher", self.teacher_record()
        if (folder / "result.json").is_file() and (folder / "model.pt").is_file():
            result = json.loads((folder / "result.json").read_text())
            result["inputs"] = self.fingerprints(["teacher"])
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(result, indent=1) + "\n")
        if not record.is_file():
            raise SystemExit(f"no teacher scores in {folder} or {record}: train the teacher first")
        return json.loads(record.read_text())

    # ---- the shared parts -------------------------------------------------------------
    def _steps(self, kind: str) -> list[str]:
        return [f"--trainer.max_steps={QUICK[kind + '_steps']}"] if self.quick else []

    def _eval(self, role: str, weights: Path, out: Path, split: str) -> list[str]:
        return _maskd(
            "evaluate",
            f"--model.name={self.spec[role]}",
            f"--model.options={json.dumps(self.spec['options'][role])}",
            f"--model.weights={weights}",
            f"--data.root={self.data}",
            f"--data.kind={'coco' if self.kind == 'detection' else 'folder'}",
            f"--data.val_split={split}",
            "--data.val_batch_size=50",
            f"--out={out}",
            *self.trainer[:1],
        )

    def _model_cell(self, name: str, deps: list[str], train: list[str], role: str,
                    splits: tuple[str, ...]) -> Cell:  # fmt: skip
        folder = self.home(name) / name
        cmds = [(train, "done.json")] + [
            (self._eval(role, folder / "model.pt", folder / f"{s}.json", s), f"{s}.json")
            for s in splits
        ]

        def finish(d: Path) -> None:
            result: dict[str, Any] = {s: json.loads((d / f"{s}.json").read_text()) for s in splits}
            result["inputs"] = self.fingerprints(deps)
            if name != "teacher":  # kept: the analyses of its losses outlive the work folder
                result["train_log"] = train_log(d)
            (d / "result.json").write_text(json.dumps(result, indent=1) + "\n")

        return Cell(name, deps, cmds, finish=finish, keep=name != "teacher", home=self.home(name))

    def fingerprints(self, deps: list[str]) -> dict[str, str]:
        """SHA-256 (first 16 hex digits) of what a cell was trained from: the data, and the
        teacher and tokens where it used them. Two cells of one table must agree on these."""
        own = {self.data / "log.txt", self.data / "done.txt"}  # the cell's log and marker
        files = [p for p in self.data.rglob("*") if p.is_file() and p not in own]
        out = {"data": _digest(sorted(files))}
        for dep in deps:
            if dep == "teacher":
                out["teacher"] = _digest([self.shared / "teacher" / "model.pt"])
            elif dep.startswith("tokens"):
                out[dep] = _digest([self.shared / dep / "tokens.pt"])
        return out

    def data_cell(self) -> Cell:
        train, val, test, size = QUICK["data"] if self.quick else self.spec["data"]
        cmd = _maskd(
            "data", "synth", "--out", str(self.data), "--task", self.kind,
            "--train", str(train), "--val", str(val), "--test", str(test), "--size", str(size),
            "--seed", str(self.data_seed), "--difficulty", self.spec["difficulty"],
            "--overwrite", "true", "--preview", "8",
        )  # fmt: skip
        if "object_scale" in self.spec:
            cmd += ["--object_scale", str(self.spec["object_scale"])]

        def finish(d: Path) -> None:
            (d / "done.txt").write_text("ok\n")

        return Cell(
            "data", [], [(cmd, None)], done_file="done.txt", finish=finish, home=self.shared
        )

    def teacher_cell(self) -> Cell:
        cmd = _maskd(
            "train", "--config", str(self.shared_cfg / "teacher.yaml"),
            f"--data.root={self.data}", f"--run.out={self.shared / 'teacher'}", *self.trainer,
            *self._steps("teacher"), *self.resume,
        )  # fmt: skip
        cell = self._model_cell("teacher", ["data"], cmd, "teacher", ("val", "test"))
        scores = cell.finish

        def finish(d: Path) -> None:
            scores(d)
            self.teacher_result()  # kept at once, beside the student cells

        cell.finish = finish
        return cell

    def token_cells(self, variants: set[str]) -> list[Cell]:
        cells = []
        teacher = self.shared / "teacher" / "model.pt"
        for variant in sorted(variants):
            out = self.shared / variant
            deps = ["teacher"]
            if variant == "tokens_random":
                cmd = [sys.executable, __file__, "--random-tokens", str(out / "tokens.pt"),
                       "--task", self.task]  # fmt: skip
            elif variant == "tokens_nohead":
                deps = ["tokens"]
                src = self.shared / "tokens" / "tokens.pt"
                cmd = [sys.executable, __file__, "--without-head", str(src), str(out / "tokens.pt")]
            else:
                cmd = _maskd(
                    "learn-masks", "--config", str(self.shared_cfg / "learn_masks.yaml"),
                    f"--teacher.weights={teacher}", f"--data.root={self.data}",
                    f"--run.out={out}", *TOKEN_VARIANTS[variant], *self.trainer,
                    *self._steps("tokens"), *self.resume,
                )  # fmt: skip

            def finish(d: Path) -> None:
                (d / "done.txt").write_text("ok\n")

            cells.append(Cell(variant, deps, [(cmd, "tokens.pt")], done_file="done.txt",
                              finish=finish, home=self.shared))  # fmt: skip
        return cells

    def student_cell(self, row: Row, seed: int, weight: float | None, name: str,
                     splits: tuple[str, ...]) -> Cell:  # fmt: skip
        out = self.work / name
        common = [f"--data.root={self.data}", f"--run.out={out}", f"--run.seed={seed}"]
        common += [*self.trainer, *self._steps("student"), *self.resume]
        if self.student_steps:
            common += [f"--trainer.max_steps={self.student_steps}"]
        if self.warmup_steps:
            common += [f"--optim.warmup_steps={self.warmup_steps}"]
        if self.precision:
            common += [f"--trainer.precision={self.precision}"]
        if row.method is None:
            cmd = _maskd("train", "--config", str(self.cfg / "student.yaml"), *common)
            return self._model_cell(name, ["data"], cmd, "student", splits)
        cmd = _maskd(
            "distill", "--config", str(self.cfg / "distill.yaml"),
            f"--teacher.weights={self.shared / 'teacher' / 'model.pt'}", *common, *row.overrides,
        )  # fmt: skip
        if load_config(self.cfg / "distill.yaml")["distill"].get("teacher_cache"):
            # the cells of a draw share one teacher: they share its cached outputs too
            cmd += [f"--distill.teacher_cache_dir={self.shared / 'teacher_cache'}"]
        deps = ["teacher"]
        if row.method == "maskd":
            cmd += [f"--distill.tokens={self.shared / row.tokens / 'tokens.pt'}"]
            cmd += [f"--distill.loss_weight={weight}"]
            if self.levels:
                cmd += [f"--distill.levels={json.dumps({self.spec['fpn']: self.levels})}"]
            warmup = load_config(self.cfg / "distill.yaml")["distill"]
            warmup = warmup.get("custom_mask_warmup")
            if (
                self.student_steps
                and warmup
                and "--distill.custom_mask_warmup=null" not in (row.overrides)
            ):  # the custom mask starts at the same fraction of the schedule
                fraction = warmup / _config_steps(self, quick=False)
                cmd += [f"--distill.custom_mask_warmup={round(fraction * self.student_steps)}"]
            deps.append(row.tokens)
        else:
            kind = "fitnet" if row.method == "ones" else row.method
            method_cfg = load_config(self.cfg / f"{kind}.yaml")["distill"]
            terms = [{**t, **row.term, "weight": weight} for t in method_cfg["terms"]]
            if self.levels:
                terms = [{**t, "levels": self.levels} for t in terms]
            cmd += ["--distill.tokens=null", f"--distill.terms={json.dumps(terms)}"]
            if self.spec.get("head_kd") and row.method != "ones":  # a peer's own recipe
                cmd += ["--distill.head_kd=null"]
        return self._model_cell(name, deps, cmd, "student", splits)


# ---- scheduling -----------------------------------------------------------------------------
def is_done(cell: Cell, work: Path, kept: Path) -> bool:
    """Whether ``cell`` is finished: its marker in its folder, or (a student cell) its kept
    result."""
    folder = (cell.home or work) / cell.name
    return (folder / cell.done_file).is_file() or (
        cell.keep and (kept / f"{cell.name}.json").is_file()
    )


def run_cells(
    cells: list[Cell],
    work: Path,
    workers: int,
    kept: Path,
    more: Callable[[set[str]], list[Cell]] | None = None,
) -> None:
    """Run the unfinished cells, each once its dependencies are done, ``workers`` at a time.

    A student cell whose result was kept under ``kept`` (committed with the results) is
    done, even in a fresh work folder. A cell whose command fails records the error as its
    result (a diverged run is a result too) and the others go on; one whose run folder was
    busy or that a signal stopped records nothing and stops the run (``_is_a_result``), so
    it resumes next time. ``more(done)`` is asked
    for further cells whenever one finishes (and at the start): a sweep grows as soon as
    the cells it depends on are done, while the others keep the workers busy.
    """
    by_name: dict[str, Cell] = {}
    done: set[str] = set()
    pending: list[Cell] = []
    running: dict[Future, Cell] = {}

    def add(new: list[Cell]) -> None:
        for cell in new:
            if cell.name in by_name:
                continue
            by_name[cell.name] = cell
            folder = (cell.home or work) / cell.name
            result = folder / "result.json"
            kept_file = kept / f"{cell.name}.json"
            if cell.keep and result.is_file() and not kept_file.is_file():
                # finished before results were kept
                kept.mkdir(parents=True, exist_ok=True)
                kept_file.write_text(result.read_text())
            if is_done(cell, work, kept):
                done.add(cell.name)
            else:
                pending.append(cell)

    def grow() -> None:
        while more is not None:
            new = [c for c in more(done) if c.name not in by_name]
            if not new:
                return
            add(new)  # asked again: a new cell may be done already (a resumed sweep)

    def execute(cell: Cell) -> None:
        folder = (cell.home or work) / cell.name
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        try:
            for cmd, marker in cell.commands:
                if marker is None or not (folder / marker).is_file():
                    _run(cmd, folder / "log.txt")
            cell.finish(folder)
        except subprocess.CalledProcessError as err:
            if not cell.keep or not _is_a_result(err.returncode):
                raise
            lines = (folder / "log.txt").read_text().strip().splitlines()
            error = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1])
            (folder / "result.json").write_text(json.dumps({"error": error}) + "\n")
        if cell.keep:
            kept.mkdir(parents=True, exist_ok=True)
            (kept / f"{cell.name}.json").write_text((folder / "result.json").read_text())
            # the resume state (~160 MB at 64 px) is only needed while the cell trains;
            # model.pt stays for inspection
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        print(f"[{datetime.now():%H:%M:%S}] {cell.name} done in "
              f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip

    add(cells)
    grow()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while pending or running:
            ready = [c for c in pending if all(d in done or d not in by_name for d in c.deps)]
            for cell in ready[: workers - len(running)]:
                pending.remove(cell)
                running[pool.submit(execute, cell)] = cell
            if not running:
                raise RuntimeError(f"cells {[c.name for c in pending]} wait on missing cells")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                cell = running.pop(future)
                future.result()  # a failed cell stops the run; its log says why
                done.add(cell.name)
            grow()


# ---- tuning and the table -------------------------------------------------------------------
def tuning_methods(plan: Plan) -> list[str]:
    return [*plan.spec["peers"], "maskd"]


def cell_name(row: Row, weight: float | None, seed: int, suffix: str = "") -> str:
    """``student_s0``, ``maskd_w10_s1``, ``cwd_w90_steps1000_s0``, ``fitnet_w3_lv0-1-2_s0``
    (``suffix``: a diagnostic schedule or level set): same settings, same cell."""
    if weight is None:
        return f"{row.name}{suffix}_s{seed}"
    return f"{row.name}_w{weight:g}{suffix}_s{seed}"


def centre_first(
    grid: dict[str, list[float]], centres: dict[str, float]
) -> list[tuple[str, float]]:
    """The sweep's ``(method, weight)`` cells in the order they run: every method's centre
    first, then the weights ×3 away, and so on (methods in ``grid`` order at each distance),
    so a sweep stopped midway has already compared the methods at their centres."""
    cells = [(m, w) for m, weights in grid.items() for w in weights]
    # steps of ×3 from the centre (the grid's ×0.3 counts as one)
    return sorted(cells, key=lambda mw: round(abs(math.log(mw[1] / centres[mw[0]], TUNE_STEP))))


def next_weight(scores: dict[float, float]) -> float | None:
    """The sweep's next weight for one method (validation score per weight tried): one
    ×``TUNE_STEP`` step beyond the best where the best is the largest or smallest weight
    tried, else ``None``. Weights whose run diverged (NaN) count as tried, never as best."""
    finite = {w: v for w, v in scores.items() if v == v}
    if not finite:
        return None
    best = max(finite, key=lambda w: finite[w])
    if best == max(scores):
        return round(best * TUNE_STEP, 6)
    if best == min(scores):
        return round(best / TUNE_STEP, 6)
    return None


def refine_weights(scores: dict[float, float]) -> list[float]:
    """The best weight's two neighbours ×``REFINE_STEP`` (√3) each way, to three significant
    digits (validation score per weight tried; NaN, a diverged run, is never the best);
    those already tried are left out."""
    finite = {w: v for w, v in scores.items() if v == v}
    if not finite:
        return []
    best = max(finite, key=lambda w: finite[w])
    near = [float(f"{best / REFINE_STEP:.3g}"), float(f"{best * REFINE_STEP:.3g}")]
    return [w for w in near if not any(math.isclose(w, t) for t in scores)]


def tune(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """Seed 0 of every method at its default weight ×0.3, ×1, ×3; the best on validation.

    Where a method's best weight is the largest (smallest) one tried, the grid grows by one
    more ×3 step that way, at most ``MAX_EXTENSIONS`` times: the same rule for every method.
    A task with ``refine`` then tries the best's neighbours ×√3 each way, once. These cells
    are also the table's seed-0 cells at the chosen weight (the test split is evaluated too,
    and never read here). The data, teacher and tokens are made only once a cell still has to
    train: a sweep whose cells are all kept is reported again without training its teacher.
    """
    rows = {r.method: r for r in task_rows(plan.spec) if r.method and not r.ablation}
    factors = (1.0,) if plan.quick else TUNE_FACTORS
    base = [plan.data_cell(), plan.teacher_cell(), *plan.token_cells({"tokens"})]
    grid = {m: [plan.spec["defaults"][m] * f for f in factors] for m in tuning_methods(plan)}
    metric = METRIC[plan.kind]

    def scores(method: str) -> dict[float, float]:
        return {w: _score(plan.read(cell_name(rows[method], w, 0)), "val", metric)
                for w in grid[method]}  # fmt: skip

    def cell(method: str, w: float) -> Cell:
        name = cell_name(rows[method], w, 0)
        return plan.student_cell(rows[method], 0, w, name, ("val", "test"))

    def with_base(new: list[Cell]) -> list[Cell]:
        waiting = any(not is_done(c, plan.work, plan.kept) for c in new)
        return [*base, *new] if waiting else new

    grown = dict.fromkeys(grid, 0)
    refine = bool(plan.spec.get("refine")) and not plan.quick
    refined: set[str] = set()

    def extend(done: set[str]) -> list[Cell]:
        """More weights for each method whose cells so far are done: one ×3 step while its
        best is at an edge; then, where the task refines, the best's ×√3 neighbours."""
        new: list[list[float]] = []
        for method, weights in grid.items():
            if plan.quick or any(cell_name(rows[method], w, 0) not in done for w in weights):
                new.append([])
                continue
            w = next_weight(scores(method)) if grown[method] < MAX_EXTENSIONS else None
            if w is not None:
                grown[method] += 1
                more = [w]
            elif refine and method not in refined:
                refined.add(method)
                more = refine_weights(scores(method))
            else:
                more = []
            weights[:] = sorted([*weights, *more])
            new.append(more)
        # one weight of every method before a second of any
        methods = list(grid)
        rounds = max(map(len, new), default=0)
        return with_base([cell(methods[i], ws[k]) for k in range(rounds)
                          for i, ws in enumerate(new) if k < len(ws)])  # fmt: skip

    cells = with_base([cell(m, w) for m, w in centre_first(grid, plan.spec["defaults"])])
    run_cells(cells, plan.work, args.workers, plan.kept, more=extend)
    results: dict[str, Any] = {}
    for method in grid:
        by_weight = scores(method)
        finite = {w: v for w, v in by_weight.items() if v == v}
        best = max(finite, key=lambda w: finite[w]) if finite else None
        results[method] = {
            "val": {f"{w:g}": v for w, v in by_weight.items()},
            "chosen": best,
            "default": plan.spec["defaults"][method],
        }
    report = {
        **header("quality_tuning", plan.task, args.accelerator),
        "metric": f"val {metric}",
        "protocol": (
            f"seed 0, validation split; each method's "
            f"{plan.spec.get('defaults_are', 'default weight')} x0.3, x1, x3, and one more "
            f"x{TUNE_STEP:g} step beyond the best while it is at an edge (at most "
            f"{MAX_EXTENSIONS})"
            + (f"; then the best's neighbours x{REFINE_STEP:.3g} each way" if refine else "")
        ),
        "methods": results,
    }
    write(args.out, f"quality_{plan.task}_tuning_{args.accelerator}", report, tuning_md(report))
    return report


def tuning_report(task: str, out: Path, device: str) -> Path:
    """The sweep whose choices ``task``'s table uses: its own, or the one it names."""
    return out / f"quality_{TASKS[task].get('weights_from', task)}_tuning_{device}.json"


def chosen_weights(plan: Plan, args: argparse.Namespace) -> dict[str, float]:
    path = tuning_report(plan.task, args.out, args.tuning_device or args.accelerator)
    if not path.is_file():
        raise SystemExit(f"no tuning results at {path}: run with --tune first")
    methods = json.loads(path.read_text())["methods"]
    missing = [m for m, v in methods.items() if v["chosen"] is None]
    if missing:
        raise SystemExit(f"tuning found no weight that trains for {missing}; see {path}")
    return {m: float(v["chosen"]) for m, v in methods.items()}


def table(plan: Plan, args: argparse.Namespace) -> dict[str, Any] | None:
    seeds = list(range(1 if plan.quick else args.seeds))
    rows = [r for r in task_rows(plan.spec) if args.ablations or not r.ablation]
    rows = [r for r in rows if not r.opt_in or r.name in (args.rows or ())]
    if plan.quick:  # one cell of each kind
        rows = [r for r in rows if not r.ablation or r.name == "maskd_random"]
    if args.rows:  # a diagnostic schedule's report also needs its own student alone
        keep = {*args.rows, *(["student"] if plan.diagnostic else [])}
        rows = [r for r in rows if r.name in keep]
    weights: dict[str, float] = {}
    if any(r.method for r in rows):
        weights = chosen_weights(plan, args)
        weights["ones"] = weights["maskd"]
    variants = {r.tokens for r in rows if r.method == "maskd"}
    students = []
    for row in rows:
        for seed in seeds:
            w = weights.get(row.method) if row.method else None
            name = plan.cell(row, w, seed)
            students.append(plan.student_cell(row, seed, w, name, ("val", "test")))
    # the data, teacher and tokens are made where a cell still needs them; the report reads
    # the teacher's scores, from its kept record once every cell that needs it is kept
    waiting = [c for c in students if not is_done(c, plan.work, plan.kept)]
    reads_teacher = any(r.method for r in rows) or not args.rows
    train_teacher = any("teacher" in c.deps for c in waiting) or (
        reads_teacher and not plan.teacher_record().is_file()
    )
    cells = [plan.data_cell()] if waiting or train_teacher else []
    if train_teacher:
        cells += [plan.teacher_cell(), *plan.token_cells(variants)]
    run_cells(cells + students, plan.work, args.workers, plan.kept)
    # read once (it hashes the teacher's weights); also keeps the record of a teacher
    # trained before records were kept
    teacher = plan.teacher_result() if reads_teacher else None
    main_rows = {r.name for r in task_rows(plan.spec) if not r.ablation}
    partial = args.rows and not main_rows <= set(args.rows)
    if partial and not (plan.diagnostic and any(r.method for r in rows)):
        return None  # part of the table: its cells are trained, the report waits for the rest
    assert teacher is not None  # a report has a distilled row, so it read the teacher
    return _report(plan, args, rows, seeds, weights, teacher)


def _score(result: dict[str, Any], split: str, metric: str) -> float:
    """The split's metric, or NaN for a cell whose training failed (diverged)."""
    return float("nan") if "error" in result else float(result[split][metric])


def _config_steps(plan: Plan, quick: bool = True) -> int:
    """The student recipe's step count (``--quick``'s unless ``quick`` is False)."""
    if plan.quick and quick:
        return QUICK["student_steps"]
    return load_config(plan.cfg / "student.yaml")["trainer"]["max_steps"]


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _check_inputs(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The fingerprints the table's cells agree on; a mix of data or teachers is refused.

    Cells kept from before fingerprints were recorded are counted, not checked."""
    seen: dict[str, set[str]] = {}
    unrecorded = sorted(name for name, r in results.items() if "inputs" not in r)
    for r in results.values():
        for key, value in r.get("inputs", {}).items():
            seen.setdefault(key, set()).add(value)
    mixed = {k: sorted(v) for k, v in seen.items() if len(v) > 1}
    if mixed:
        raise SystemExit(
            f"the table's cells were trained from different inputs {mixed}: retrain the cells "
            "of one of them (delete their kept results) so every row shares one teacher"
        )
    return {"fingerprints": {k: next(iter(v)) for k, v in seen.items()},
            "cells_without_fingerprints": unrecorded}  # fmt: skip


def _report(plan: Plan, args: argparse.Namespace, rows: list[Row], seeds: list[int],
            weights: dict[str, float],
            teacher_result: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The table's report; ``teacher_result``: :meth:`Plan.teacher_result`."""
    key, second = METRIC[plan.kind], SECOND[plan.kind]
    teacher, teacher_val = teacher_result["test"], teacher_result["val"][key]
    sizes = QUICK["data"] if plan.quick else plan.spec["data"]
    steps = plan.student_steps
    student = Row("student", "student alone")
    base = [100 * _score(plan.read(plan.cell(student, None, s)), "test", key) for s in seeds]
    base_mean = statistics.fmean(base)
    gap = 100 * teacher[key] - base_mean
    cells = {plan.cell(r, weights.get(r.method) if r.method else None, s): None
             for r in rows for s in seeds}  # fmt: skip
    inputs = _check_inputs({"teacher": teacher_result, **{name: plan.read(name) for name in cells}})
    out_rows = []
    for row in rows:
        w = weights.get(row.method) if row.method else None
        results = [plan.read(plan.cell(row, w, s)) for s in seeds]
        values = [100 * _score(r, "test", key) for r in results]
        diffs = [v - b for v, b in zip(values, base, strict=True)]
        mean, std = stats(values)
        d_mean, d_std = stats(diffs)
        out_rows.append(
            {
                "row": row.name,
                "label": row.label,
                "ablation": row.ablation,
                "weight": weights.get(row.method) if row.method else None,
                "test": values,
                "test_second": [100 * _score(r, "test", second) for r in results],
                "val": [100 * _score(r, "val", key) for r in results],
                "errors": [r["error"] for r in results if "error" in r],
                "mean": mean,
                "std": std,
                "diff_to_student": diffs,
                "diff_mean": d_mean,
                "diff_std": d_std,
                "gap_closed": (mean - base_mean) / gap if gap else None,
                "beats_student_every_seed": all(d > 0 for d in diffs),  # False with NaN
            }
        )
    sweep = tuning_report(plan.task, args.out, args.tuning_device or args.accelerator)
    borrowed = "weights_from" in plan.spec
    report = {
        **header("quality", plan.task, args.accelerator),
        "data": {
            **dict(zip(("train", "val", "test", "size"), sizes, strict=True)),
            "difficulty": plan.spec["difficulty"],
            **({"object_scale": plan.spec["object_scale"]} if "object_scale" in plan.spec else {}),
            "seed": plan.data_seed,
        },
        "teacher": {
            "model": plan.spec["teacher"],
            "test": 100 * teacher[key],
            "val": 100 * teacher_val,
        },
        "inputs": inputs,
        "student_model": plan.spec["student"],
        "student_steps": steps or _config_steps(plan),
        "warmup_steps": plan.warmup_steps,
        "precision": plan.precision,
        "levels": plan.levels,
        # a sweep of another task chose the weights (none: the task's own sweep)
        "weights_from": sweep.with_suffix(".md").name if weights and borrowed else None,
        "metric": f"test {key}",
        "seeds": seeds,
        "rows": out_rows,
        **pairings(out_rows),
    }
    stem = plan.report_stem(len(seeds))
    write(args.out, stem, report, table_md(report))
    plot(report, args.out / f"{stem}.png")
    return report


def random_tokens(path: Path, task: str) -> None:
    """Untrained tokens (their initialisation, seed 0) for every level the row distils."""
    import torch

    from maskd.data.synth import classes
    from maskd.models import build
    from maskd.taps import probe_levels
    from maskd.token_io import save_tokens
    from maskd.tokens import ReceptiveTokens

    spec = TASKS[task]
    num_classes = len(classes(spec["difficulty"])) + (spec["kind"] == "segmentation")  # + bg
    teacher, layers = build(spec["teacher"], num_classes=num_classes, **spec["options"]["teacher"])
    feats, levels = probe_levels(teacher, layers)
    torch.manual_seed(0)
    cfg = load_config(CONFIGS / task / "learn_masks.yaml")["masks"]
    tokens = {
        layer: [
            ReceptiveTokens(feats[n].shape[1], cfg["num_tokens"], cfg["weighted"]) for n in names
        ]
        for layer, names in levels.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tokens(path, tokens)


def without_head(src: Path, dst: Path) -> None:
    """The tokens of ``src`` with their weighting heads dropped: the same masks, each token
    weighted equally in stage 2 (``1 / T``), to test what the head's choice does."""
    from maskd.token_io import load_tokens, save_tokens

    out = {
        layer: [tok.without_head() for tok in levels] for layer, levels in load_tokens(src).items()
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_tokens(dst, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="detection")
    parser.add_argument("--tune", action="store_true", help="run the validation sweep")
    parser.add_argument("--seeds", type=int, default=SEEDS,
                        help="seeds per student row (more than 3: report "
                        "quality_<task>_seeds<N>_<device>, the cells shared)")  # fmt: skip
    parser.add_argument("--ablations", type=int, default=1, help="0: main rows only")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--tuning-device", default=None, help="read *_tuning_<this>.json")
    parser.add_argument("--quick", action="store_true", help="tiny data, a few steps, 1 seed")
    parser.add_argument("--rows", nargs="+", choices=[r.name for r in ROWS],
                        help="train only these rows' cells (no report, unless they include "
                        "every main row: the table with just these ablations)")  # fmt: skip
    parser.add_argument("--student-steps", type=int, default=None,
                        help="diagnostic: every student cell trains this many steps (own cells "
                        "and report quality_<task>_steps<N>_<device>; with --rows, a report "
                        "of those rows)")  # fmt: skip
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="diagnostic: every student cell warms its learning rate up over "
                        "this many steps (own cells and report quality_<task>_warmup<N>_"
                        "<device>; with --rows, a report of those rows)")  # fmt: skip
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="diagnostic: every student cell trains in this Lightning precision, "
                        "e.g. 32-true (own cells and report quality_<task>_precision<P>_"
                        "<device>; teacher and tokens are the table's)")  # fmt: skip
    parser.add_argument("--levels", nargs="+", default=None,
                        help="diagnostic (detection): every distilled cell distils only these "
                        "FPN levels, e.g. 0 1 2 (own cells and report "
                        "quality_<task>_lv0-1-2_<device>; the student alone's cells are the "
                        "table's)")  # fmt: skip
    parser.add_argument("--data-seed", type=int, default=0,
                        help="replicate the table on another draw of the task's data (a new "
                        "teacher and tokens, the weights chosen on seed 0's validation; own "
                        "cells and report quality_<task>_data<N>_<device>)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("runs/quality"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--random-tokens", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--without-head", type=Path, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--rerender", type=Path, metavar="JSON",
                        help="rewrite a table report's .md and .png from its .json (the "
                        "measured values, machine, command and date stay; what is derived "
                        "from them is computed again)")  # fmt: skip
    parser.add_argument("--summary", type=Path, nargs="+", metavar="JSON",
                        help="print one markdown line per table report: every main row's "
                        "mean and MasKD against the best peer (the README's overview)")  # fmt: skip
    parser.add_argument("--pool", type=Path, nargs="+", metavar="JSON",
                        help="pool one task's table reports of several draws (--data-seed) into "
                        "quality_<task>_draws<N>_<device>.{json,md} under --out: each row's "
                        "mean over draws of its test mean, MasKD paired with each peer by "
                        "draw, and the target read off the pooled means")  # fmt: skip
    parser.add_argument("--variant", nargs="+", default=[], metavar="ROW=VARIANT",
                        help="with --pool: a main row's other setting (an ablation row of "
                        "the tables, e.g. maskd=maskd_unweighted); it replaces the row in "
                        "every draw if its validation mean on data seed 0's table is higher "
                        "(report ..._variants_<device>)")  # fmt: skip
    parser.add_argument("--teacher-bar", type=float, metavar="POINTS",
                        help="with --pool: leave out (and name) each draw whose teacher is less "
                        "than POINTS above its student alone; the report is "
                        "quality_<task>_draws<N>_bar<POINTS>_<device>, N the draws "
                        "given")  # fmt: skip
    args = parser.parse_args()
    if (args.teacher_bar is not None or args.variant) and not args.pool:
        raise SystemExit("--teacher-bar and --variant only apply to --pool")
    if args.pool:
        variants = dict(v.partition("=")[::2] for v in args.variant)
        if any(not v for v in [*variants, *variants.values()]):
            raise SystemExit(f"--variant takes ROW=VARIANT pairs, not {args.variant}")
        report = pool(args.pool, args.teacher_bar, variants)
        given = len(report["draws"]) + len(report["left_out"])
        bar = "" if args.teacher_bar is None else f"_bar{args.teacher_bar:g}"
        bar += "_variants" if variants else ""
        stem = f"quality_{report['task']}_draws{given}{bar}_{report['accelerator']}"
        write(args.out, stem, report, pooled_md(report))
        return
    if args.summary:
        print(summary_md(args.summary, ROOT), end="")
        return
    if args.rerender:
        rerender(args.rerender)
        return
    if args.random_tokens:
        random_tokens(args.random_tokens, args.task)
        return
    if args.without_head:
        without_head(*args.without_head)
        return
    plan = Plan(args.task, args)
    if args.tune and (plan.diagnostic or args.data_seed):
        raise SystemExit("--tune picks the table's weights: run it without --levels, "
                         "--student-steps, --warmup-steps, --precision and --data-seed")  # fmt: skip
    if args.tune and "weights_from" in plan.spec:
        raise SystemExit(f"the {args.task} task's weights are those chosen in "
                         f"{plan.spec['weights_from']}'s sweep: run --tune on that task")  # fmt: skip
    if args.tune:
        tune(plan, args)
    else:
        table(plan, args)


if __name__ == "__main__":
    main()
