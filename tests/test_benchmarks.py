"""The benchmarks: teacher gap and quality end to end through the command line, and the
quality reports' and diagnostics' parts on values computed here."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "teacher_gap.py"


def test_teacher_gap_writes_curves_and_final_scores(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--task", "segmentation", "--size", "32"]
    cmd += ["--train", "4", "--val", "2", "--steps", "2", "--eval-every", "1"]
    cmd += ["--batch-size", "2", "--models", "lraspp_mobilenet_v3_large"]
    cmd += ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "out" / "teacher_gap_segmentation_cpu.json").read_text())
    (row,) = report["rows"]
    run = tmp_path / "work" / "segmentation" / "lraspp_mobilenet_v3_large"
    final = json.loads((run / "metrics.json").read_text())
    assert row["final"] == final
    steps = [s for s, _ in row["curve"]]
    assert steps == sorted(steps) and steps[-1] == 2 and len(steps) >= 2
    assert row["curve"][-1][1] == final["val/miou"]
    md = (tmp_path / "out" / "teacher_gap_segmentation_cpu.md").read_text()
    assert "`lraspp_mobilenet_v3_large`" in md and f"{100 * final['val/miou']:.1f}" in md


QUALITY = SCRIPT.with_name("quality.py")


def test_quality_quick_runs_every_kind_of_cell_and_resumes(tmp_path):
    """``quality.py --quick``: tuning then the table, one cell of each kind, from result files."""
    work, out = tmp_path / "work", tmp_path / "out"
    base = [sys.executable, str(QUALITY), "--quick", "--work", str(work), "--out", str(out)]
    subprocess.run([*base, "--tune"], check=True, capture_output=True, text=True, timeout=900)
    tuning = json.loads((out / "quality_detection_tuning_cpu.json").read_text())
    defaults = {"fitnet": 1, "cwd": 10, "fgd": 1, "maskd": 10}  # x1 only in --quick
    assert sorted(tuning["methods"]) == sorted(defaults)
    for method, entry in tuning["methods"].items():
        cell = work / "detection" / f"{method}_w{defaults[method]}_s0" / "result.json"
        assert entry["val"] == {str(defaults[method]): json.loads(cell.read_text())["val"]["map"]}
        assert entry["chosen"] == defaults[method]
    subprocess.run(base, check=True, capture_output=True, text=True, timeout=900)
    report = json.loads((out / "quality_detection_cpu.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"student", "fitnet", "cwd", "fgd", "maskd", "maskd_random"}
    kept = out / "quality_cells" / "detection"
    for name, row in rows.items():
        cell = "student_s0" if name == "student" else f"{name}_w{row['weight']:g}_s0"
        result = json.loads((work / "detection" / cell / "result.json").read_text())
        assert json.loads((kept / f"{cell}.json").read_text()) == result
        # a finished cell keeps its model, not its resume state (one written every step here)
        assert (work / "detection" / cell / "model.pt").is_file()
        assert not (work / "detection" / cell / "checkpoints").exists()
        assert row["test"] == [100 * result["test"]["map"]]
        # its losses are kept with it: the log's, step for step
        log = next((work / "detection" / cell).glob("csv/version_*/metrics.csv")).read_text()
        logged = [ln.split(",") for ln in log.splitlines()]
        col = logged[0].index("train/loss")
        assert [float(r[col]) for r in logged[1:] if r[col]] == [
            v for v in result["train_log"]["train/loss"] if v is not None
        ]
        assert row["diff_to_student"] == [row["test"][0] - rows["student"]["test"][0]]
    assert rows["maskd"]["weight"] == tuning["methods"]["maskd"]["chosen"]
    # every cell names what it was trained from; the report checks they agree
    teacher = hashlib.sha256(b"model.pt" + (work / "detection/teacher/model.pt").read_bytes())
    assert report["inputs"]["fingerprints"]["teacher"] == teacher.hexdigest()[:16]
    assert report["inputs"]["cells_without_fingerprints"] == []
    maskd_cell = json.loads((kept / f"maskd_w{rows['maskd']['weight']:g}_s0.json").read_text())
    assert set(maskd_cell["inputs"]) == {"data", "teacher", "tokens"}
    assert set(json.loads((kept / "student_s0.json").read_text())["inputs"]) == {"data"}
    assert (out / "quality_detection_cpu.png").stat().st_size > 1000
    md = (out / "quality_detection_cpu.md").read_text()
    assert "| MasKD, untrained (random) tokens |" in md and "teacher (fcos_resnet50_fpn)" in md
    # a second run finds every cell finished and trains nothing; so does a fresh work folder,
    # the students' results and the teacher's scores being kept
    again = subprocess.run(base, check=True, capture_output=True, text=True, timeout=120)
    assert " done in " not in again.stdout
    teacher_record = json.loads((kept / "teacher.json").read_text())
    fingerprints = report["inputs"]["fingerprints"]
    assert teacher_record["inputs"] == {k: fingerprints[k] for k in ("data", "teacher")}
    assert 100 * teacher_record["test"]["map"] == pytest.approx(report["teacher"]["test"])
    shutil.rmtree(work)
    again = subprocess.run(base, check=True, capture_output=True, text=True, timeout=120)
    assert " done in " not in again.stdout and not (work / "detection" / "teacher").exists()
    assert json.loads((out / "quality_detection_cpu.json").read_text())["rows"] == report["rows"]
    # --rows: some rows' cells only; every main row plus some ablations: the report with those
    report_file = out / "quality_detection_cpu.json"
    some = [*base, "--rows", "student", "maskd"]
    subprocess.run(some, check=True, capture_output=True, text=True, timeout=120)
    assert "--rows" not in json.loads(report_file.read_text())["command"]  # not rewritten
    without_random = [*base, "--rows", "student", "fitnet", "cwd", "fgd", "maskd"]
    subprocess.run(without_random, check=True, capture_output=True, text=True, timeout=120)
    rewritten = json.loads(report_file.read_text())
    assert "--rows student fitnet cwd fgd maskd" in rewritten["command"]
    assert [r["row"] for r in rewritten["rows"]] == ["student", "fitnet", "cwd", "fgd", "maskd"]
    assert rewritten["rows"] == [rows[r["row"]] for r in rewritten["rows"]]


def test_within_noise_uses_the_t_interval():
    sys.path.insert(0, str(QUALITY.parent))
    from quality_report import within_noise

    assert within_noise([1.0])  # one seed tells nothing
    assert not within_noise([1.0, 1.1, 0.9])  # mean 1.0, std 0.1: far from 0
    assert within_noise([1.0, -0.2, 0.5])  # mean 0.43, std 0.6: 4.30 * 0.6 / sqrt(3) = 1.49


def test_versus_peers_pairs_maskd_with_each_peer_by_seed():
    sys.path.insert(0, str(QUALITY.parent))
    from quality_report import versus_md, versus_peers

    def row(name, test, ablation=False):
        return {"row": name, "label": name.upper(), "ablation": ablation, "test": test}

    rows = [
        row("student", [10.0, 11.0, 12.0]),
        row("cwd", [30.0, 31.0, 29.0]),
        row("fitnet", [20.0, 20.5, 21.0]),
        row("maskd", [29.0, 32.0, 30.0]),
        row("maskd_t1", [1.0, 2.0, 3.0], ablation=True),
    ]
    versus = versus_peers(rows)
    assert list(versus) == ["cwd", "fitnet"]  # peers only: no student, MasKD or ablation
    assert versus["cwd"]["diffs"] == [-1.0, 1.0, 1.0]
    assert versus["cwd"]["ahead_in"] == 2 and versus["cwd"]["within_noise"]
    assert abs(versus["cwd"]["mean"] - 1 / 3) < 1e-12
    assert versus["fitnet"]["diffs"] == [9.0, 11.5, 9.0] and not versus["fitnet"]["within_noise"]
    md = versus_md(versus)
    assert "| CWD | -1.0, +1.0, +1.0 | +0.3 ± 1.2 | 2 of 3 seeds | within noise |" in md
    assert "| FITNET | +9.0, +11.5, +9.0 | +9.8 ± 1.4 | 3 of 3 seeds | ahead |" in md
    rows[1]["test"][0] = float("nan")  # a diverged CWD seed: the report still writes
    assert "a seed diverged" in versus_md(versus_peers(rows))
    assert versus_peers(rows[:3]) == {}  # no MasKD row, nothing to compare
    ablations = versus_peers(rows, ablations=True)
    assert list(ablations) == ["maskd_t1"] and ablations["maskd_t1"]["diffs"] == [28.0, 30.0, 27.0]
    assert "| ablation | per seed |" in versus_md(ablations, "ablation")


def test_rerender_adds_the_pairing_to_a_committed_report(tmp_path):
    """The committed segmentation table, written before the pairing existed, gains it."""
    src = QUALITY.parent / "results" / "quality_segmentation_cpu.json"
    report = json.loads(src.read_text())
    report.pop("maskd_vs_peers", None)
    path = tmp_path / "quality_segmentation_cpu.json"
    path.write_text(json.dumps(report))
    subprocess.run([sys.executable, str(QUALITY), "--rerender", str(path)], check=True)
    rows = {r["row"]: r for r in report["rows"]}
    back = json.loads(path.read_text())
    assert back["rows"] == report["rows"] and back["date"] == report["date"]
    md = path.with_suffix(".md").read_text()
    for peer in ("fitnet", "cwd", "logits_kd"):
        diffs = [a - b for a, b in zip(rows["maskd"]["test"], rows[peer]["test"], strict=True)]
        assert back["maskd_vs_peers"][peer]["diffs"] == diffs
        assert f"| {rows[peer]['label']} | " + ", ".join(f"{d:+.1f}" for d in diffs) in md
    assert path.with_suffix(".png").stat().st_size > 1000
    path.write_text(json.dumps({"benchmark": "loss_kernel"}))
    bad = subprocess.run([sys.executable, str(QUALITY), "--rerender", str(path)],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "not a quality table report" in bad.stderr


def test_without_head_keeps_the_masks_and_drops_the_weights(tmp_path):
    sys.path.insert(0, str(QUALITY.parent))
    from maskd.token_io import load_tokens, save_tokens
    from maskd.tokens import ReceptiveTokens
    from quality import without_head

    torch.manual_seed(0)
    levels = [ReceptiveTokens(8, 3, weighted=True), ReceptiveTokens(8, 3, weighted=True)]
    save_tokens(tmp_path / "tokens.pt", {"backbone.fpn": levels})
    without_head(tmp_path / "tokens.pt", tmp_path / "nohead" / "tokens.pt")
    bare = load_tokens(tmp_path / "nohead" / "tokens.pt")["backbone.fpn"]
    x = torch.randn(2, 8, 5, 5)
    for tok, got in zip(levels, bare, strict=True):
        assert tok.token_weights(x) is not None and got.token_weights(x) is None
        expected = torch.sigmoid(torch.einsum("tc,nchw->nthw", tok.mask_token, x))
        assert torch.allclose(got(x), expected, atol=1e-6)
        assert torch.equal(got(x), tok(x))


def test_quality_quick_segmentation_has_its_own_peers_and_no_ablations(tmp_path):
    """The segmentation table: logits KD instead of FGD, the authors' MasKD setting."""
    work, out = tmp_path / "work", tmp_path / "out"
    base = [sys.executable, str(QUALITY), "--quick", "--task", "segmentation"]
    base += ["--work", str(work), "--out", str(out)]
    subprocess.run([*base, "--tune"], check=True, capture_output=True, text=True, timeout=900)
    tuning = json.loads((out / "quality_segmentation_tuning_cpu.json").read_text())
    assert sorted(tuning["methods"]) == ["cwd", "fitnet", "logits_kd", "maskd"]
    subprocess.run(base, check=True, capture_output=True, text=True, timeout=900)
    report = json.loads((out / "quality_segmentation_cpu.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == {"student", "fitnet", "cwd", "logits_kd", "maskd"}
    result = json.loads((work / "segmentation" / "student_s0" / "result.json").read_text())
    assert rows["student"]["test"] == [100 * result["test"]["miou"]]
    assert report["teacher"]["model"] == "deeplabv3_resnet18"
    assert "mIoU" in (out / "quality_segmentation_cpu.md").read_text()
    # a diagnostic schedule: its own cells (student alone included) and its own report
    steps = [*base, "--rows", "maskd", "--student-steps", "5"]
    subprocess.run(steps, check=True, capture_output=True, text=True, timeout=900)
    report = json.loads((out / "quality_segmentation_steps5_cpu.json").read_text())
    assert report["student_steps"] == 5
    assert [r["row"] for r in report["rows"]] == ["student", "maskd"]
    for cell in ("student_steps5_s0", f"maskd_w{rows['maskd']['weight']:g}_steps5_s0"):
        done = json.loads((work / "segmentation" / cell / "done.json").read_text())
        assert done["global_step"] == 5, done
    log = (work / "segmentation" / cell / "log.txt").read_text()
    assert "--trainer.max_steps=5" in log and "custom_mask_warmup" not in log  # off here


def test_quality_report_names_say_what_differs_from_the_table(tmp_path):
    import argparse

    sys.path.insert(0, str(QUALITY.parent))
    from quality import Plan

    args = argparse.Namespace(quick=False, work=tmp_path, out=tmp_path, accelerator="cpu")
    plan = Plan("detection_ranges", args)
    assert plan.report_stem(3) == "quality_detection_ranges_cpu"
    assert plan.report_stem(5) == "quality_detection_ranges_seeds5_cpu"
    args.levels = ["0", "1"]
    assert (
        Plan("detection_ranges", args).report_stem(5) == "quality_detection_ranges_lv0-1_seeds5_cpu"
    )


def test_quality_diagnostic_schedule_scales_the_custom_mask_warmup(tmp_path):
    """--student-steps: MasKD's custom mask starts at the recipe's fraction (200 of 500)."""
    import argparse

    import yaml

    sys.path.insert(0, str(QUALITY.parent))
    from quality import CONFIGS, ROWS, Plan, cell_name

    recipe = yaml.safe_load((CONFIGS / "detection" / "distill.yaml").read_text())
    steps = yaml.safe_load((CONFIGS / "detection" / "student.yaml").read_text())
    fraction = recipe["distill"]["custom_mask_warmup"] / steps["trainer"]["max_steps"]
    args = argparse.Namespace(quick=False, work=tmp_path, out=tmp_path, accelerator="cpu",
                              student_steps=1000)  # fmt: skip
    plan = Plan("detection", args)
    rows = {r.name: r for r in ROWS}
    name = plan.cell(rows["maskd"], 10.0, 0)
    assert name == "maskd_w10_steps1000_s0"
    train = plan.student_cell(rows["maskd"], 0, 10.0, name, ("val",)).commands[0][0]
    assert "--trainer.max_steps=1000" in train
    assert f"--distill.custom_mask_warmup={round(fraction * 1000)}" in train
    off = plan.student_cell(rows["maskd_nocustom"], 0, 10.0, "x", ("val",)).commands[0][0]
    assert not any(a.startswith("--distill.custom_mask_warmup=") and a[-4:] != "null" for a in off)
    plain = plan.student_cell(rows["student"], 0, None, "student_steps1000_s0", ("val",))
    assert "--trainer.max_steps=1000" in plain.commands[0][0]
    assert cell_name(rows["student"], None, 2) == "student_s2"  # the table's own names stay


def test_quality_retina_task_gives_head_kd_to_the_maskd_recipe_only(tmp_path):
    """detection_retina: the MasKD rows keep distill.yaml's head term (the authors' RetinaNet
    recipe), the peers run without it, and one ablation row drops it from MasKD."""
    import argparse

    sys.path.insert(0, str(QUALITY.parent))
    from maskd.config_files import load_config
    from maskd.models import build
    from quality import CONFIGS, ROWS, TASKS, Plan, task_rows

    recipe = load_config(CONFIGS / "detection_retina" / "distill.yaml")
    assert recipe["distill"]["head_kd"] == "retinanet_l1"
    for role in ("student", "teacher"):  # the configs build the models the task names
        spec = TASKS["detection_retina"]
        assert recipe[role]["name"] == spec[role]
        options = {k: v for k, v in recipe[role]["options"].items() if v is not None}
        assert options == spec["options"][role]
        model, _ = build(spec[role], num_classes=3, **options)
        assert model.anchor_generator.sizes[0] == (8, 10, 12)
    args = argparse.Namespace(quick=False, work=tmp_path, out=tmp_path, accelerator="cpu")
    plan = Plan("detection_retina", args)
    rows = {r.name: r for r in ROWS}
    without = "--distill.head_kd=null"
    for name, dropped in [("maskd", False), ("maskd_ones", False), ("maskd_nohkd", True),
                          ("fitnet", True), ("cwd", True), ("fgd", True)]:  # fmt: skip
        cmd = plan.student_cell(rows[name], 0, 7.0, "x", ("val",)).commands[0][0]
        assert (without in cmd) == dropped, name
    assert "maskd_nohkd" in [r.name for r in task_rows(TASKS["detection_retina"])]
    assert "maskd_nohkd" not in [r.name for r in task_rows(TASKS["detection_ranges"])]
    fcos = Plan("detection_ranges", args).student_cell(rows["cwd"], 0, 7.0, "x", ("val",))
    assert without not in fcos.commands[0][0]


def test_quality_level_set_reaches_every_distilled_term(tmp_path):
    """--levels: each distilled cell's command distils those FPN levels; the student's stay."""
    import argparse

    sys.path.insert(0, str(QUALITY.parent))
    from maskd.engine.jobs import DistillArgs, distill_terms
    from quality import ROWS, Plan

    args = argparse.Namespace(quick=False, work=tmp_path, out=tmp_path, accelerator="cpu",
                              levels=["0", "1", "2"])  # fmt: skip
    plan = Plan("detection_ranges", args)
    rows = {r.name: r for r in ROWS}
    assert plan.cell(rows["student"], None, 1) == "student_s1"
    assert plan.cell(rows["cwd"], 90.0, 1) == "cwd_w90_lv0-1-2_s1"
    assert plan.suffix() == "_lv0-1-2"
    for name in ("maskd", "maskd_ones", "fitnet", "cwd", "fgd"):
        cmd = plan.student_cell(rows[name], 0, 3.0, "x", ("val",)).commands[0][0]
        given = dict(a.removeprefix("--distill.").split("=", 1) for a in cmd
                     if a.startswith("--distill."))  # fmt: skip
        options = {"tokens": None if given["tokens"] == "null" else given["tokens"]}
        options |= {k: json.loads(given[k]) for k in ("terms", "levels") if k in given}
        terms = distill_terms(DistillArgs(**options), "detection", "fcos_resnet18_fpn",
                              {"backbone.fpn": "backbone.fpn"})  # fmt: skip
        assert [t["levels"] for t in terms] == [["0", "1", "2"]], (name, terms)
    plain = plan.student_cell(rows["student"], 0, None, "student_s0", ("val",)).commands[0][0]
    assert not any("levels" in a for a in plain)
    with pytest.raises(SystemExit, match="the segmentation task has no FPN"):
        Plan("segmentation", args)


def test_quality_report_refuses_cells_of_different_teachers():
    sys.path.insert(0, str(QUALITY.parent))
    from quality import _check_inputs

    a = {"inputs": {"data": "d1", "teacher": "t1"}}
    b = {"inputs": {"data": "d1", "teacher": "t2"}}
    old = {"val": {}}  # kept before fingerprints: counted, not checked
    assert _check_inputs({"a": a, "old": old}) == {
        "fingerprints": {"data": "d1", "teacher": "t1"},
        "cells_without_fingerprints": ["old"],
    }
    with pytest.raises(SystemExit, match=r"different inputs \{'teacher': \['t1', 't2'\]\}"):
        _check_inputs({"a": a, "b": b})


def test_quality_128px_sweep_is_centred_on_the_64px_choices():
    """detection_ranges128's grid centres are the weights the 64 px sweep chose (as its
    comment says), and its tuning report says what the centres are."""
    sys.path.insert(0, str(QUALITY.parent))
    from quality import RESULTS, TASKS

    chosen = json.loads((RESULTS / "quality_detection_ranges_tuning_cpu.json").read_text())
    want = {m: float(v["chosen"]) for m, v in chosen["methods"].items()}
    assert TASKS["detection_ranges128"]["defaults"] == want
    assert "detection_ranges sweep" in TASKS["detection_ranges128"]["defaults_are"]


@pytest.mark.parametrize(
    ("task", "ranges", "size"),
    [("detection_ranges", "RANGES", 64), ("detection_ranges128", "RANGES_128", 128)],
)
def test_quality_detection_ranges_is_the_detection_regime_with_scale_ranges(task, ranges, size):
    """Every config of a ranges regime is the detection one plus the ranges (and the image
    size) on each FCOS, and the evaluation builds the models the configs train."""
    sys.path.insert(0, str(QUALITY.parent))
    import quality
    from maskd.config_files import load_config
    from quality import CONFIGS, TASKS

    want_ranges = getattr(quality, ranges)
    regime, base = CONFIGS / task, CONFIGS / "detection"
    assert sorted(p.name for p in regime.iterdir()) == sorted(p.name for p in base.iterdir())
    for path in regime.iterdir():
        got, want = load_config(path), load_config(base / path.name)
        for role in ("model", "student", "teacher"):
            if role in want:
                options = got[role]["options"]
                assert options.pop("regress_ranges") == want_ranges, (path.name, role)
                assert want[role]["options"]["min_size"] == 64
                want[role]["options"].update(min_size=size, max_size=size)
        assert got == want, path.name
    # every length doubles at 128 px: the ranges too, so each object keeps its level
    assert [[a * size / 64 for a in r] for r in quality.RANGES] == want_ranges
    assert TASKS[task]["data"] == (1500, 200, 300, size)
    options = TASKS[task]["options"]
    assert options["teacher"] == load_config(regime / "teacher.yaml")["model"]["options"]
    student = load_config(regime / "student.yaml")["model"]["options"]
    student.pop("box_regression_bias")  # an initial value: evaluation loads the weights
    assert options["student"] == student


def test_class_agnostic_ap_ignores_only_the_labels():
    """quality_diagnosis.aware_and_agnostic: boxes in the right places with the wrong names
    score 0 AP as they are and 100 AP class-agnostic; right names score 100 both ways."""
    sys.path.insert(0, str(QUALITY.parent))
    from quality_diagnosis import aware_and_agnostic

    boxes = [torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[20.0, 20, 40, 40]])]
    targets = [
        {"boxes": b, "labels": torch.tensor([k])} for b, k in zip(boxes, (1, 2), strict=True)
    ]

    def preds(labels):
        return [{"boxes": b, "scores": torch.tensor([0.9]), "labels": torch.tensor([k])}
                for b, k in zip(boxes, labels, strict=True)]  # fmt: skip

    swapped = aware_and_agnostic([(preds((2, 1)), targets)])
    assert swapped["ap"] == pytest.approx(0.0) and swapped["recall_100"] == pytest.approx(0.0)
    assert swapped["ap_agnostic"] == pytest.approx(100.0)
    right = aware_and_agnostic([(preds((1, 2)), targets)])
    assert right["ap"] == pytest.approx(100.0) and right["ap_agnostic"] == pytest.approx(100.0)


def test_inside_boxes_marks_the_cells_a_box_reaches():
    """quality_diagnosis._inside_boxes on an 8 x 8 map of 64 px images (8 px cells): a box
    from (10, 16) to (32, 20.5) reaches columns 1-4 (its right edge, pixel 32, opens column 4)
    and row 2 (its bottom edge rounds up to pixel 21); an image without boxes stays empty."""
    sys.path.insert(0, str(QUALITY.parent))
    from quality_diagnosis import _inside_boxes

    targets = [{"boxes": torch.tensor([[10.0, 16.0, 32.0, 20.5]])}, {"boxes": torch.zeros(0, 4)}]
    inside = _inside_boxes(targets, (64, 64), (2, 8, 8))
    want = torch.zeros(2, 8, 8)
    want[0, 2, 1:5] = 1
    assert torch.equal(inside, want)


@pytest.mark.parametrize("weighted", [True, False])
def test_weight_in_boxes_is_maskd_loss_on_the_boxes_over_its_loss_everywhere(weighted):
    """quality_diagnosis.weight_in_boxes: per sample, MasKD's loss when the student differs
    from the teacher by 1 in every channel inside the boxes and nowhere else, over its loss
    when it differs by 1 everywhere; all-ones masks give the boxes' share (FitNet's)."""
    sys.path.insert(0, str(QUALITY.parent))
    from maskd.losses import masked_distillation_loss
    from quality_diagnosis import weight_in_boxes

    g = torch.Generator().manual_seed(0)
    n, t, c, h, w = 3, 4, 5, 6, 7
    masks = torch.rand(n, t, h, w, generator=g, dtype=torch.float64) ** 3
    weights = torch.rand(n, t, generator=g, dtype=torch.float64).softmax(1) if weighted else None
    inside = (torch.rand(n, h, w, generator=g) > 0.7).double()
    got = weight_in_boxes(masks, weights, inside)
    zero = torch.zeros(1, c, h, w, dtype=torch.float64)
    for i in range(n):
        wi = None if weights is None else weights[i : i + 1]
        on_boxes = inside[i].expand(1, c, h, w)
        loss_in = masked_distillation_loss(on_boxes, zero, masks[i : i + 1], wi)
        loss_all = masked_distillation_loss(torch.ones_like(zero), zero, masks[i : i + 1], wi)
        assert float(got[i]) == pytest.approx(float(loss_in / loss_all), rel=1e-9)
    ones = weight_in_boxes(torch.ones(n, t, h, w, dtype=torch.float64), weights, inside)
    assert torch.allclose(ones, inside.mean(dim=(1, 2)))


def test_mask_statistics_weight_in_boxes_with_the_heads_weights_and_equal_ones():
    """quality_diagnosis.mask_statistics on a one-level stand-in teacher: MasKD's pixel weight
    in the boxes with the head's token weights and with every token weighted equally, each
    summed by hand from the masks (a_p = sum_k w_k m_k(p)^2 / sum_q m_k(q)); a head-free token
    set has no equal-weight value of its own."""
    from collections import OrderedDict
    from types import SimpleNamespace

    sys.path.insert(0, str(QUALITY.parent))
    from maskd.tokens import ReceptiveTokens
    from quality_diagnosis import _inside_boxes, mask_statistics

    class FPN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)

        def forward(self, x: torch.Tensor) -> OrderedDict:
            return OrderedDict([("0", self.conv(x))])

    class Teacher(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = torch.nn.Module()
            self.backbone.fpn = FPN()

        def transform(self, images: list, targets: list) -> tuple:
            return SimpleNamespace(tensors=torch.stack(images)), targets

        def forward(self, images: list) -> OrderedDict:
            return self.backbone.fpn(torch.stack(images))

    torch.manual_seed(0)
    teacher = Teacher().eval()
    images = [torch.rand(3, 32, 32) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 12.0, 16.0]])},
               {"boxes": torch.tensor([[16.0, 8.0, 32.0, 20.0]])}]  # fmt: skip
    head, free = ReceptiveTokens(8, 3, weighted=True), ReceptiveTokens(8, 3, weighted=False)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 1)  # a head far from equal weights
        x = teacher(images)["0"]
        masks, weights = head(x), head.token_weights(x)  # [2, 3, 8, 8], [2, 3]
    inside = _inside_boxes(targets, (32, 32), (2, 8, 8))

    def by_hand(w: torch.Tensor) -> float:
        a = (w[:, :, None, None] * masks**2 / masks.sum(dim=(2, 3), keepdim=True)).sum(1)
        return float(((a * inside).sum(dim=(1, 2)) / a.sum(dim=(1, 2))).mean())

    v = mask_statistics(teacher, {"backbone.fpn": [head]}, images, targets)["backbone.fpn:0"]
    assert v["loss_weight_in_boxes"] == pytest.approx(by_hand(weights), rel=1e-5)
    assert v["loss_weight_in_boxes_equal"] == pytest.approx(by_hand(torch.ones(2, 3)), rel=1e-5)
    assert abs(v["loss_weight_in_boxes"] - v["loss_weight_in_boxes_equal"]) > 1e-3
    u = mask_statistics(teacher, {"backbone.fpn": [free]}, images, targets)["backbone.fpn:0"]
    assert u["weights"] is None and u["loss_weight_in_boxes_equal"] is None


def test_quality_sweep_runs_the_centres_first():
    sys.path.insert(0, str(QUALITY.parent))
    from quality import centre_first

    grid = {"fitnet": [0.9, 3.0, 9.0, 27.0], "cwd": [27.0, 90.0, 270.0], "maskd": [3.0, 10.0, 30.0]}
    centres = {"fitnet": 3.0, "cwd": 90.0, "maskd": 10.0}
    assert centre_first(grid, centres) == [
        ("fitnet", 3.0), ("cwd", 90.0), ("maskd", 10.0),  # ×1
        ("fitnet", 0.9), ("fitnet", 9.0), ("cwd", 27.0), ("cwd", 270.0),  # ×3 away (0.3 ≈ 1/3)
        ("maskd", 3.0), ("maskd", 30.0),
        ("fitnet", 27.0),  # ×9 away
    ]  # fmt: skip


def test_run_cells_grows_while_other_cells_still_run(tmp_path):
    """``run_cells(more=...)``: a cell that ``more`` adds once ``a`` is done starts while
    ``b`` still runs (``b`` finishes only after it), and a cell found done on disk lets
    ``more`` go on growing without running it again."""
    import threading

    sys.path.insert(0, str(QUALITY.parent))
    from quality import Cell, run_cells

    ran: list[str] = []
    c_done = threading.Event()

    def finish(name: str, wait_for: threading.Event | None = None, sets=None):
        def write(folder: Path) -> None:
            if wait_for is not None:
                assert wait_for.wait(timeout=30), f"{name} was not run alongside the rest"
            ran.append(name)
            (folder / "result.json").write_text("{}")
            if sets is not None:
                sets.set()

        return write

    cells = [
        Cell("a", [], [], finish=finish("a")),
        Cell("b", [], [], finish=finish("b", wait_for=c_done)),
    ]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "result.json").write_text("{}")  # a resumed run: d is already done

    def more(done: set[str]) -> list[Cell]:
        new = []
        if "a" in done:
            new.append(Cell("c", [], [], finish=finish("c", sets=c_done)))
            new.append(Cell("d", [], [], finish=finish("d")))
        if "d" in done:
            new.append(Cell("e", ["c"], [], finish=finish("e")))
        return new

    run_cells(cells, tmp_path, workers=2, kept=tmp_path / "kept", more=more)
    # b waits for c; e (after c) may finish before or after b
    assert ran.index("c") < ran.index("b") and ran.index("c") < ran.index("e")
    assert sorted(ran) == ["a", "b", "c", "e"]
    assert all((tmp_path / n / "result.json").is_file() for n in "abcde")


@pytest.mark.parametrize(("status", "recorded"), [(1, True), (75, False), (143, False)])
def test_run_cells_records_a_failure_only_when_it_is_the_cells_outcome(tmp_path, status, recorded):
    """A cell that fails (status 1, e.g. a diverged run) keeps its error as its result; one
    whose run folder was busy (maskd's 75) or that a signal stopped (128 + 15) keeps
    nothing and stops the run, so the next run trains it."""
    sys.path.insert(0, str(QUALITY.parent))
    from quality import Cell, run_cells

    code = f"import sys; print('maskd: error: status {status}'); sys.exit({status})"
    cell = Cell("s", [], [([sys.executable, "-c", code], None)], keep=True)
    kept = tmp_path / "kept"
    if recorded:
        run_cells([cell], tmp_path, workers=1, kept=kept)
        want = {"error": f"maskd: error: status {status}"}
        assert json.loads((tmp_path / "s" / "result.json").read_text()) == want
        assert json.loads((kept / "s.json").read_text()) == want
    else:
        with pytest.raises(subprocess.CalledProcessError) as err:
            run_cells([cell], tmp_path, workers=1, kept=kept)
        assert err.value.returncode == status
        assert not (tmp_path / "s" / "result.json").exists() and not (kept / "s.json").exists()


def test_sweep_steps_beyond_a_best_weight_at_an_edge_only():
    sys.path.insert(0, str(QUALITY.parent))
    from quality import TUNE_STEP, next_weight

    nan = float("nan")
    assert next_weight({0.9: 51.2, 3.0: 58.7, 9.0: 76.8}) == pytest.approx(9.0 * TUNE_STEP)
    assert next_weight({0.9: 76.6, 3.0: 74.5, 9.0: 67.3}) == pytest.approx(0.9 / TUNE_STEP)
    assert next_weight({27.0: 67.2, 90.0: 75.2, 270.0: 64.6}) is None
    # a diverged run is a weight tried: the best finite one inside the grid stops it
    assert next_weight({1.0: 5.0, 3.0: 7.0, 9.0: nan}) is None
    assert next_weight({1.0: nan, 3.0: nan}) is None


def test_refinement_tries_the_best_weights_neighbours_root_three_each_way():
    sys.path.insert(0, str(QUALITY.parent))
    from quality import REFINE_STEP, refine_weights

    assert pytest.approx(3**0.5) == REFINE_STEP
    assert refine_weights({3.0: 70.5, 10.0: 75.4, 30.0: 72.3}) == [5.77, 17.3]
    assert refine_weights({27.0: 67.2, 90.0: 75.2, 270.0: 64.6}) == [52.0, 156.0]
    # a neighbour already tried is not tried again; NaN (diverged) is never the best
    assert refine_weights({5.77: 1.0, 10.0: 2.0, float("nan"): 0.0}) == [17.3]
    assert refine_weights({1.0: float("nan")}) == []


@pytest.mark.parametrize("refine", [True, False])
def test_tune_extends_at_edges_then_refines_around_the_best(tmp_path, refine):
    """``tune`` on a stand-in plan whose validation score peaks at a known weight per
    method: the ×3 grid grows at an edge, then (``refine``) the best's ×√3 neighbours run,
    once, and the best weight of all those tried is chosen."""
    import argparse
    import math

    sys.path.insert(0, str(QUALITY.parent))
    import quality
    from quality import Cell

    peaks = {"fitnet": 40.0, "maskd": 14.0}

    def score(method: str, w: float) -> float:
        return -(math.log(w / peaks[method]) ** 2)

    trained: list[str] = []

    class StandIn:
        task, kind, quick = "standin", "detection", False
        work, kept = tmp_path / "work", tmp_path / "kept"

        def __init__(self) -> None:
            self.spec = {"peers": ("fitnet",), "defaults": {"fitnet": 3.0, "maskd": 10.0},
                         "ablations": False, "refine": refine}  # fmt: skip

        def data_cell(self) -> Cell:
            return Cell("data", [], [], finish=lambda d: (d / "result.json").write_text("{}"))

        def teacher_cell(self) -> Cell:
            return Cell(
                "teacher", ["data"], [], finish=lambda d: (d / "result.json").write_text("{}")
            )

        def token_cells(self, variants: set[str]) -> list[Cell]:
            return []

        def read(self, name: str) -> dict:
            return json.loads((self.work / name / "result.json").read_text())

        def student_cell(self, row, seed, w, name, splits) -> Cell:
            def finish(d: Path) -> None:
                trained.append(name)
                v = score(row.method, w)
                (d / "result.json").write_text(json.dumps({"val": {"map": v}, "test": {"map": v}}))

            return Cell(name, ["teacher"], [], finish=finish)

    args = argparse.Namespace(workers=1, out=tmp_path / "out", accelerator="cpu")
    report = quality.tune(StandIn(), args)
    tried = {m: sorted(float(w) for w in v["val"]) for m, v in report["methods"].items()}
    # fitnet: 0.9 / 3 / 9, best at the top edge twice (27, 81), then 27 is inside
    # maskd: 3 / 10 / 30, best 10 inside at once
    grid = {"fitnet": [0.9, 3.0, 9.0, 27.0, 81.0], "maskd": [3.0, 10.0, 30.0]}
    if refine:
        grid = {"fitnet": sorted([*grid["fitnet"], 15.6, 46.8]),
                "maskd": sorted([*grid["maskd"], 5.77, 17.3])}  # fmt: skip
    assert tried == grid  # the report keys weights as "%g"
    for m, weights in grid.items():
        best = max(weights, key=lambda w: score(m, w))
        assert report["methods"][m]["chosen"] == pytest.approx(best)
    assert [report["methods"][m]["chosen"] for m in grid] == (
        [46.8, 17.3] if refine else [27.0, 10.0]
    )
    assert ("x1.73 each way" in report["protocol"]) is refine
    assert len(trained) == len(set(trained)) == sum(map(len, grid.values()))


def test_summary_line_pairs_maskd_with_the_peer_of_best_mean(tmp_path):
    sys.path.insert(0, str(QUALITY.parent))
    from quality_report import pairings, summary_md

    def row(name: str, test: list[float], ablation: bool = False) -> dict:
        mean = sum(test) / len(test)
        std = (sum((v - mean) ** 2 for v in test) / (len(test) - 1)) ** 0.5
        return {"row": name, "label": {"cwd": "CWD", "fitnet": "FitNet"}.get(name, name),
                "ablation": ablation, "test": test, "mean": mean, "std": std}  # fmt: skip

    rows = [row("student", [10.0, 12.0, 14.0]), row("fitnet", [20.0, 21.0, 22.0]),
            row("cwd", [30.0, 33.0, 36.0]), row("maskd", [31.0, 32.0, 39.0]),
            row("maskd_random", [90.0, 90.0, 90.0], ablation=True)]  # fmt: skip
    report = {"task": "det", "data": {"size": 64}, "metric": "test map", "seeds": [0, 1, 2],
              "teacher": {"model": "big", "test": 40.04}, "student_model": "small",
              "rows": rows, **pairings(rows)}  # fmt: skip
    path = tmp_path / "results" / "quality_det_cpu.json"
    path.parent.mkdir()
    path.write_text(json.dumps(report))
    header, _, line = summary_md([path], tmp_path).splitlines()
    assert header.split(" | ")[4:8] == ["student alone", "FitNet", "CWD", "MasKD"]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == "[det, 64 px](results/quality_det_cpu.md): AP"
    assert cells[1:4] == ["big → small", "3", "40.0"]
    assert cells[4:8] == ["12.0 ± 2.0", "21.0 ± 1.0", "33.0 ± 3.0", "34.0 ± 4.4"]
    # against CWD (best peer mean 33): diffs +1, -1, +3 -> mean +1.0, std 2.0, ahead in 2
    assert cells[8] == "+1.0 ± 2.0 vs CWD, ahead in 2 of 3: within noise"


def test_quality_detection_clutter_is_detection_ranges_on_cluttered_data(tmp_path):
    """detection_clutter changes only the data: every config resolves to detection_ranges',
    the models and options are the same, the data cell asks for the clutter setting, and the
    sweep is centred on the weights detection_ranges' sweep chose."""
    import argparse

    sys.path.insert(0, str(QUALITY.parent))
    from maskd.config_files import load_config
    from quality import CONFIGS, RESULTS, TASKS, Plan

    regime, base = CONFIGS / "detection_clutter", CONFIGS / "detection_ranges"
    assert sorted(p.name for p in regime.iterdir()) == sorted(p.name for p in base.iterdir())
    for path in regime.iterdir():
        assert load_config(path) == load_config(base / path.name), path.name
    spec, ranges = TASKS["detection_clutter"], TASKS["detection_ranges"]
    assert {
        k: v for k, v in spec.items() if k not in ("difficulty", "defaults", "defaults_are")
    } == {k: v for k, v in ranges.items() if k not in ("difficulty", "defaults")}
    assert (spec["difficulty"], ranges["difficulty"]) == ("clutter", "easy")
    chosen = json.loads((RESULTS / "quality_detection_ranges_tuning_cpu.json").read_text())
    assert spec["defaults"] == {m: float(v["chosen"]) for m, v in chosen["methods"].items()}
    args = argparse.Namespace(
        quick=False, work=tmp_path, out=tmp_path, accelerator="cpu", student_steps=None
    )
    cmd = Plan("detection_clutter", args).data_cell().commands[0][0]
    assert cmd[cmd.index("--difficulty") + 1] == "clutter"
    cmd = Plan("detection_ranges", args).data_cell().commands[0][0]
    assert cmd[cmd.index("--difficulty") + 1] == "easy"


def test_quality_data_seed_replicates_on_its_own_draw(tmp_path, monkeypatch):
    """--data-seed N draws the data with seed N into a work folder, kept cells and report of
    its own (nothing of seed 0's is reused), names the seed in the reports, and may not
    choose weights: the sweep belongs to seed 0's validation split."""
    import argparse

    sys.path.insert(0, str(QUALITY.parent))
    import quality
    from quality import Plan
    from quality_report import summary_md, table_md

    def plan(seed: int) -> Plan:
        args = argparse.Namespace(quick=False, work=tmp_path / "w", out=tmp_path / "o",
                                  accelerator="cpu", student_steps=None, data_seed=seed)  # fmt: skip
        return Plan("detection_clutter", args)

    first, other = plan(0), plan(1)
    for p, seed in ((first, "0"), (other, "1")):
        cmd = p.data_cell().commands[0][0]
        assert cmd[cmd.index("--seed") + 1] == seed
        assert cmd[cmd.index("--out") + 1] == str(p.data)
    assert other.work == tmp_path / "w" / "detection_clutter_data1" != first.work
    assert other.kept == tmp_path / "o" / "quality_cells" / "detection_clutter_data1"
    assert (first.report_stem(3), other.report_stem(3), other.report_stem(5)) == (
        "quality_detection_clutter_cpu",
        "quality_detection_clutter_data1_cpu",
        "quality_detection_clutter_data1_seeds5_cpu",
    )
    src = json.loads(
        (QUALITY.parent / "results" / "quality_detection_clutter_cpu.json").read_text()
    )
    assert "drawn with seed" not in table_md(src)
    src["data"]["seed"] = 1
    assert "64 px, drawn with seed 1; 1500 train" in table_md(src)
    path = tmp_path / "results" / "quality_x_cpu.json"
    path.parent.mkdir()
    path.write_text(json.dumps(src))
    assert "| [detection_clutter, 64 px, data seed 1](results/quality_x_cpu.md)" in summary_md(
        [path], tmp_path
    )
    argv = ["quality.py", "--task", "detection_clutter", "--tune", "--data-seed", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--work", str(tmp_path / "w")])
    with pytest.raises(SystemExit, match="--data-seed"):
        quality.main()
    assert not (tmp_path / "w").exists()


def _draw_report(
    seed: int, teacher: float, tests: dict[str, list[float]], val: dict | None = None
) -> dict:
    """A table report of one draw with the fields ``--pool`` reads, from per-seed scores
    (rows ``maskd_*`` and ``cwd_*`` are ablations; validation = test unless in ``val``)."""
    sys.path.insert(0, str(QUALITY.parent))
    from quality_report import pairings, stats

    base = tests["student"]
    rows = []
    for name, test in tests.items():
        mean, std = stats(test)
        rows.append({"row": name, "label": name.upper(), "ablation": "_" in name,
                     "val": (val or {}).get(name, test),
                     "weight": None if name == "student" else 1.0, "test": test, "mean": mean,
                     "std": std, "gap_closed": (mean - stats(base)[0]) / (teacher - stats(base)[0]),
                     "beats_student_every_seed": all(a > b for a, b in zip(test, base, strict=True))})  # fmt: skip
    return {"benchmark": "quality", "task": "det", "metric": "test map", "seeds": [0, 1],
            "student_steps": 500, "levels": None, "machine": {"cpu_count": 2},
            "date": "d", "data": {"size": 64, "seed": seed}, "teacher": {"test": teacher},
            "rows": rows, **pairings(rows)}  # fmt: skip


def test_pool_averages_each_row_over_draws_and_reads_the_target_off_the_pooled_means(
    tmp_path, monkeypatch
):
    """``--pool``: a row's score is the mean over draws of its mean over seeds, MasKD is
    paired with each peer by draw, and the target holds only if MasKD's pooled mean leads
    every peer's (here CWD leads on one draw and MasKD on the pooled means)."""
    sys.path.insert(0, str(QUALITY.parent))
    import quality
    import quality_pool

    draws = {
        2: (30.0, {"student": [10.0, 12.0], "cwd": [20.0, 22.0], "maskd": [23.0, 25.0],
                   "maskd_t1": [0.0, 0.0]}),
        0: (20.0, {"student": [8.0, 10.0], "cwd": [19.0, 19.0], "maskd": [17.0, 18.0],
                   "maskd_t1": [0.0, 0.0]}),
    }  # fmt: skip
    paths = []
    for seed, (teacher, tests) in draws.items():
        paths.append(tmp_path / f"quality_det_data{seed}_cpu.json")
        paths[-1].write_text(json.dumps(_draw_report(seed, teacher, tests)))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["quality.py", "--pool", *map(str, paths), "--out", str(out)])
    quality.main()
    report = json.loads((out / "quality_det_draws2_cpu.json").read_text())
    assert [d["data_seed"] for d in report["draws"]] == [0, 2]  # in draw order
    rows = {row["row"]: row for row in report["rows"]}
    assert list(rows) == ["student", "cwd", "maskd"]  # main rows only
    assert rows["maskd"]["test"] == [17.5, 24.0] and rows["maskd"]["mean"] == 20.75
    assert rows["cwd"]["test"] == [19.0, 21.0] and rows["cwd"]["mean"] == 20.0
    assert rows["student"]["mean"] == 10.0 and report["teacher"]["mean"] == 25.0
    cwd = report["maskd_vs_peers"]["cwd"]
    assert cwd["diffs"] == [-1.5, 3.0] and cwd["ahead_in"] == 1 and cwd["within_noise"]
    target = report["target"]
    assert target["gap_closed"] == (20.75 - 10.0) / (25.0 - 10.0)
    assert target["leads_every_peer"] and target["beats_student_every_seed_of_every_draw"]
    assert target["met"]
    md = (out / "quality_det_draws2_cpu.md").read_text()
    assert "| MASKD | 17.5 | 24.0 | 20.8 ± 4.6 |" in md
    assert "| CWD | -1.5, +3.0 | +0.8 ± 3.2 | 1 of 2 draws | within noise |" in md
    assert "Target (met): MasKD closes 72 %" in md and "(quality_det_data0_cpu.md)" in md
    assert [d["teacher_gap"] for d in report["draws"]] == [11.0, 19.0] and "bar" not in md

    # CWD's pooled mean ahead: not met, though MasKD leads on one draw
    draws[2][1]["cwd"][:] = [25.0, 27.0]
    paths[0].write_text(json.dumps(_draw_report(2, *draws[2])))
    report = quality.pool(paths)
    assert report["maskd_vs_peers"]["cwd"]["mean"] < 0 and not report["target"]["met"]
    # a draw whose teacher is under the regime's bar (5 points over the student) is named
    paths[1].write_text(json.dumps(_draw_report(0, 13.0, draws[0][1])))
    md = quality_pool.pooled_md(quality.pool(paths))
    assert "the regime's bar), pooled by the rule as every draw: data seed 0 (+4.0)." in md


def test_pool_with_a_teacher_bar_leaves_out_and_names_the_draws_under_it(tmp_path, monkeypatch):
    """``--pool --teacher-bar 5``: a draw whose teacher is less than 5 points above its
    student alone is listed with its gap and kept out of every pooled number."""
    sys.path.insert(0, str(QUALITY.parent))
    import quality

    tests = {
        0: (20.0, {"student": [8.0, 10.0], "cwd": [19.0, 19.0], "maskd": [17.0, 18.0]}),
        1: (13.0, {"student": [9.0, 9.0], "cwd": [30.0, 30.0], "maskd": [0.0, 0.0]}),  # +4.0
        2: (30.0, {"student": [10.0, 12.0], "cwd": [20.0, 22.0], "maskd": [23.0, 25.0]}),
    }
    paths = []
    for seed, (teacher, scores) in tests.items():
        paths.append(tmp_path / f"quality_det_data{seed}_cpu.json")
        paths[-1].write_text(json.dumps(_draw_report(seed, teacher, scores)))
    out = tmp_path / "out"
    argv = ["quality.py", "--pool", *map(str, paths), "--teacher-bar", "5", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    quality.main()
    report = json.loads((out / "quality_det_draws3_bar5_cpu.json").read_text())
    assert [d["data_seed"] for d in report["draws"]] == [0, 2]
    assert report["left_out"] == [{"data_seed": 1, "report": "quality_det_data1_cpu.json",
                                   "teacher": 13.0, "student": 9.0, "teacher_gap": 4.0}]  # fmt: skip
    rows = {row["row"]: row for row in report["rows"]}
    # the left-out draw's MasKD 0 and CWD 30 would flip the lead; they are not pooled
    assert rows["maskd"]["mean"] == (17.5 + 24.0) / 2 and rows["cwd"]["mean"] == 20.0
    assert report["teacher"]["mean"] == 25.0 and report["target"]["met"]
    md = (out / "quality_det_draws3_bar5_cpu.md").read_text()
    assert "2 draws of its data (1 more left out, below)" in md
    assert ("Left out by the rule (the teacher less than 5 points above the student alone): "
            "[data seed 1](quality_det_data1_cpu.md), teacher 13.0, student alone 9.0 (+4.0)."
            in md)  # fmt: skip
    assert "is left out." in md and "| data seed 1 |" not in md
    # without the bar every draw is pooled, and the bar alone is refused
    assert len(quality.pool(paths)["draws"]) == 3
    with pytest.raises(
        SystemExit,
        match=r"leaves 1 draw\(s\) to pool; left out: data seed 0 \(\+11\.0\), data seed 1",
    ):
        quality.pool(paths, teacher_bar=11.5)
    monkeypatch.setattr(sys, "argv", ["quality.py", "--teacher-bar", "5"])
    with pytest.raises(SystemExit, match="--teacher-bar and --variant only apply to --pool"):
        quality.main()


def test_pool_variant_is_chosen_on_data_seed_0s_validation_and_stands_in_every_draw(
    tmp_path, monkeypatch
):
    """``--pool --variant maskd=maskd_unweighted cwd=cwd_t4``: a variant replaces its row in
    every draw only if its validation mean on data seed 0 is higher (test never chooses)."""
    sys.path.insert(0, str(QUALITY.parent))
    import quality
    import quality_pool

    draw0 = {"student": [8.0, 10.0], "cwd": [19.0, 19.0], "cwd_t4": [30.0, 30.0],
             "maskd": [17.0, 18.0], "maskd_unweighted": [19.0, 21.0]}  # fmt: skip
    val0 = {"cwd": [15.0, 15.0], "cwd_t4": [14.0, 14.0], "maskd": [14.0, 14.0],
            "maskd_unweighted": [15.0, 17.0]}  # fmt: skip
    draw1 = {"student": [10.0, 12.0], "cwd": [20.0, 22.0], "maskd": [23.0, 25.0],
             "maskd_unweighted": [22.0, 22.0]}  # fmt: skip
    paths = [tmp_path / "quality_det_cpu.json", tmp_path / "quality_det_data1_cpu.json"]
    paths[0].write_text(json.dumps(_draw_report(0, 20.0, draw0, val0)))
    paths[1].write_text(json.dumps(_draw_report(1, 30.0, draw1)))
    out = tmp_path / "out"
    argv = ["quality.py", "--pool", *map(str, paths), "--out", str(out),
            "--variant", "maskd=maskd_unweighted", "cwd=cwd_t4"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    quality.main()
    report = json.loads((out / "quality_det_draws2_variants_cpu.json").read_text())
    rows = {row["row"]: row for row in report["rows"]}
    assert list(rows) == ["student", "cwd", "maskd"]
    assert rows["maskd"]["test"] == [20.0, 22.0] and rows["maskd"]["label"] == "MASKD_UNWEIGHTED"
    assert rows["cwd"]["test"] == [19.0, 21.0]  # tau 4's test 30 is not what chooses
    assert report["maskd_vs_peers"]["cwd"]["diffs"] == [1.0, 1.0]
    v = report["variants"]
    assert v["maskd"]["val"] == {"maskd": 14.0, "maskd_unweighted": 16.0}
    assert v["maskd"]["chosen"] == "maskd_unweighted" and v["cwd"]["chosen"] == "cwd"
    md = (out / "quality_det_draws2_variants_cpu.md").read_text()
    assert ("Variant for maskd: MASKD_UNWEIGHTED (maskd_unweighted), validation on data seed 0 "
            "16.0 against 14.0: chosen" in md)  # fmt: skip
    assert "Variant for cwd: CWD_T4 (cwd_t4), validation on data seed 0 14.0 against 15.0: " \
        "not chosen." in md  # fmt: skip
    assert quality.pool(paths)["rows"][2]["test"] == [17.5, 24.0]  # without --variant

    def refused(match: str, variants: dict, reports: list[Path] = paths) -> None:
        with pytest.raises(SystemExit, match=match):
            quality_pool.pool(reports, variants=variants)

    del draw1["maskd_unweighted"]
    paths[1].write_text(json.dumps(_draw_report(1, 30.0, draw1)))
    refused(
        r"data1_cpu\.json: no row maskd_unweighted, chosen for maskd", {"maskd": "maskd_unweighted"}
    )
    refused(r"fgd is not a main row of", {"fgd": "maskd_unweighted"})
    refused(r"has no ablation row maskd_t1", {"maskd": "maskd_t1"})
    refused(r"has no ablation row cwd", {"maskd": "cwd"})
    # a draw left out by the teacher bar needs no variant row
    weak = tmp_path / "quality_det_data3_cpu.json"
    weak.write_text(json.dumps(_draw_report(3, 12.0, draw1)))  # 1.0 above the student alone
    paths[1].write_text(
        json.dumps(_draw_report(1, 30.0, {**draw1, "maskd_unweighted": [22.0, 22.0]}))
    )
    report = quality_pool.pool([*paths, weak], 5.0, {"maskd": "maskd_unweighted"})
    assert [d["data_seed"] for d in report["left_out"]] == [3]
    assert report["rows"][2]["test"] == [20.0, 22.0]
    third = tmp_path / "quality_det_data2_cpu.json"
    third.write_text(json.dumps(_draw_report(2, 30.0, draw1)))
    refused(r"data seed 0's validation .* pool its table too", {"cwd": "cwd_t4"}, [paths[1], third])
    monkeypatch.setattr(
        sys, "argv", ["quality.py", "--pool", *map(str, paths), "--variant", "maskd"]
    )
    with pytest.raises(SystemExit, match="ROW=VARIANT pairs"):
        quality.main()


def test_a_peer_variant_row_is_trained_only_when_named_and_merges_its_term_settings(tmp_path):
    """``cwd_t4`` is opt-in (no table trains it unless ``--rows`` names it) and its cells
    run CWD's terms with tau 4 at CWD's weight."""
    sys.path.insert(0, str(QUALITY.parent))
    import quality

    row = next(r for r in quality.ROWS if r.name == "cwd_t4")
    assert row.opt_in and row.ablation and row.term == {"tau": 4.0}
    assert row in quality.task_rows(quality.TASKS["detection_clutter"])
    args = argparse.Namespace(quick=False, work=tmp_path, out=tmp_path, accelerator="cpu")
    plan = quality.Plan("detection_clutter", args)
    cell = plan.student_cell(row, 0, 27.0, quality.cell_name(row, 27.0, 0), ("val", "test"))
    cmd = next(c for c, _ in cell.commands if any("--distill.terms=" in a for a in c))
    terms = json.loads(next(a for a in cmd if a.startswith("--distill.terms="))[16:])
    assert cell.name == "cwd_t4_w27_s0"
    assert [(t["kind"], t["tau"], t["weight"]) for t in terms] == [("cwd", 4.0, 27.0)]


def test_pool_refuses_reports_that_are_not_draws_of_one_table(tmp_path):
    sys.path.insert(0, str(QUALITY.parent))
    from quality_pool import pool

    tests = {"student": [1.0, 2.0], "cwd": [3.0, 4.0], "maskd": [5.0, 6.0]}

    def write(name: str, seed: int, **change) -> Path:
        report = {**_draw_report(seed, 9.0, tests), **change}
        (tmp_path / name).write_text(json.dumps(report))
        return tmp_path / name

    a = write("a.json", 0)
    with pytest.raises(SystemExit, match="at least two draws"):
        pool([a])
    with pytest.raises(SystemExit, match=r"b\.json and .*a\.json are both of data seed 0"):
        pool([a, write("b.json", 0)])
    with pytest.raises(SystemExit, match=r"c\.json: its seeds is \[0, 1, 2\]"):
        pool([a, write("c.json", 1, seeds=[0, 1, 2])])
    with pytest.raises(SystemExit, match=r"d\.json: its task is 'seg'"):
        pool([a, write("d.json", 1, task="seg")])
    with pytest.raises(SystemExit, match=r"e\.json: made on gpu"):
        pool([a, write("e.json", 1, machine={"gpu": "H200"})])
    with pytest.raises(SystemExit, match=r"f\.json: main rows \['maskd', 'student'\]"):
        rows = [r for r in _draw_report(1, 9.0, tests)["rows"] if r["row"] != "cwd"]
        pool([a, write("f.json", 1, rows=rows)])
    with pytest.raises(SystemExit, match=r"h\.json: a table without the student alone or MasKD"):
        rows = [r for r in _draw_report(1, 9.0, tests)["rows"] if r["row"] != "maskd"]
        pool([a, write("h.json", 1, rows=rows)])
    with pytest.raises(SystemExit, match=r"g\.json: not a quality table report"):
        pool([a, write("g.json", 1, benchmark="quality_tuning")])


def _log(path: Path, rows: list[tuple[int, float | None]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["epoch,step,train/classification,train/loss"]
    lines += [f"0,{s},{'' if v is None else v},1.0" for s, v in rows]
    path.write_text("\n".join(lines) + "\n")


def test_spikes_peak_ratio_reads_every_log_version_and_flags_a_diverged_loss(tmp_path):
    """quality_logs.curve merges a resumed cell's logs (the later version's value stands
    where both log a step, versions ordered by number, not name); peak_ratio is the largest
    value before the window over the first; a NaN in the window is an infinite ratio."""
    sys.path.insert(0, str(QUALITY.parent))
    import quality_spikes
    from quality_logs import curve

    cell = tmp_path / "cwd_w27_s1"
    _log(cell / "csv/version_0/metrics.csv", [(9, 0.5), (19, None), (29, 0.9), (39, 0.8)])
    _log(cell / "csv/version_10/metrics.csv", [(39, 1.6), (49, 0.4), (159, 9.0)])
    _log(cell / "csv/version_2/metrics.csv", [(39, 7.0), (149, 0.2)])
    points = curve(cell, quality_spikes.KEY)
    assert points == [(9, 0.5), (29, 0.9), (39, 1.6), (49, 0.4), (149, 0.2), (159, 9.0)]
    assert quality_spikes.peak_ratio(points, 150) == pytest.approx(1.6 / 0.5)
    assert quality_spikes.peak_ratio(points, 160) == pytest.approx(9.0 / 0.5)
    assert quality_spikes.peak_ratio([(9, 0.5), (19, float("nan"))], 150) == float("inf")
    with pytest.raises(FileNotFoundError, match="student_s0"):
        curve(tmp_path / "student_s0", quality_spikes.KEY)


def test_a_kept_train_log_stands_in_for_a_cells_gone_log(tmp_path):
    """train_log keeps every train/* loss but the per-layer ones, aligned on the logged
    steps (a resumed cell's later version standing); once the cell's folder is gone the
    spikes analysis reads the kept copy and finds the same peak ratio."""
    sys.path.insert(0, str(QUALITY.parent))
    import quality_spikes
    from quality import Plan
    from quality_logs import train_log

    args = argparse.Namespace(quick=False, work=tmp_path / "w", out=tmp_path / "o",
                              accelerator="cpu")  # fmt: skip
    plan = Plan("detection", args)
    cell = plan.work / "cwd_w27_s0"
    (cell / "csv/version_0").mkdir(parents=True)
    (cell / "csv/version_0/metrics.csv").write_text(
        "epoch,step,lr-SGD/pg1,train/classification,train/loss_cwd,train/cwd/fpn:0\n"
        "0,9,0.01,0.5,3.0,1.0\n0,19,,2.0,,\n0,29,,0.7,2.0,0.5\n"
    )
    (cell / "csv/version_1").mkdir()
    (cell / "csv/version_1/metrics.csv").write_text(
        "epoch,step,train/classification,train/loss_cwd\n0,29,0.6,2.5\n0,39,0.4,\n"
    )
    kept = train_log(cell)
    assert kept == {
        "step": [9, 19, 29, 39],
        "train/classification": [0.5, 2.0, 0.6, 0.4],
        "train/loss_cwd": [3.0, None, 2.5, None],
    }
    from_log = quality_spikes.cell_curve(plan, "cwd_w27_s0")
    assert from_log == [(9, 0.5), (19, 2.0), (29, 0.6), (39, 0.4)]
    plan.kept.mkdir(parents=True)
    (plan.kept / "cwd_w27_s0.json").write_text(json.dumps({"train_log": kept}))
    shutil.rmtree(cell)
    assert quality_spikes.cell_curve(plan, "cwd_w27_s0") == from_log
    assert quality_spikes.peak_ratio(from_log, 150) == pytest.approx(4.0)
    (plan.kept / "cwd_w27_s0.json").write_text(json.dumps({"test": {}}))  # kept before logs
    with pytest.raises(FileNotFoundError, match="nor one kept in its result"):
        quality_spikes.cell_curve(plan, "cwd_w27_s0")


def test_spikes_summary_pairs_spiked_cells_with_the_rows_others_on_their_draw(tmp_path):
    """collect names each table cell as quality.py does and reads its draw's folder;
    summarise counts spiked cells and, per draw with both kinds, compares their means."""
    sys.path.insert(0, str(QUALITY.parent))
    import quality_spikes

    ratios = {  # (draw, row cell) -> (peak, test)
        (0, "student_s0"): (3.0, 10.0), (0, "student_s1"): (1.0, 14.0),
        (0, "cwd_w27_s0"): (1.0, 20.0), (0, "cwd_w27_s1"): (2.0, 16.0),
        (1, "student_s0"): (4.0, 11.0), (1, "student_s1"): (5.0, 12.0),
        (1, "cwd_w27_s0"): (1.2, 19.0), (1, "cwd_w27_s1"): (1.5, 18.0),
    }  # fmt: skip
    reports = []
    for draw in (0, 1):
        folder = tmp_path / ("detection_clutter" if draw == 0 else "detection_clutter_data1")
        for (d, name), (peak, _) in ratios.items():
            if d == draw:
                _log(folder / name / "csv/version_0/metrics.csv", [(9, 0.5), (59, 0.5 * peak)])
        rows = [
            {"row": "student", "label": "student alone", "weight": None,
             "test": [ratios[draw, f"student_s{s}"][1] for s in (0, 1)]},
            {"row": "cwd", "label": "CWD", "weight": 27.0,
             "test": [ratios[draw, f"cwd_w27_s{s}"][1] for s in (0, 1)]},
        ]  # fmt: skip
        data = {"seed": draw} if draw else {}
        reports.append({"task": "detection_clutter", "data": data, "seeds": [0, 1], "rows": rows})
    cells = quality_spikes.collect(reports, tmp_path, window=150)
    assert [(c["draw"], c["cell"]) for c in cells] == list(ratios)
    for c in cells:
        assert c["ratio"] == pytest.approx(ratios[c["draw"], c["cell"]][0])
        assert c["test"] == ratios[c["draw"], c["cell"]][1]
    student, cwd = quality_spikes.summarise(cells, threshold=1.5)
    assert (student["cells"], student["spiked"]) == (4, 3)
    assert student["spiked_minus_other"] == [10.0 - 14.0]  # draw 1: no unspiked cell
    assert (cwd["cells"], cwd["spiked"]) == (4, 2)  # 1.5 counts as spiked
    assert cwd["spiked_minus_other"] == [16.0 - 20.0, 18.0 - 19.0]
    md = quality_spikes.spikes_md({"machine": {}, "command": "c", "window": 150,
                                   "threshold": 1.5, "draws": [0, 1],
                                   "rows": [student, cwd], "sweep": [], "cells": cells})  # fmt: skip
    # CWD minus the student alone, paired by draw and seed: the student alone spiked on
    # (0, s0), (1, s0), (1, s1); not on (0, s1)
    assert cwd["over_baseline_spiked"] == [20.0 - 10.0, 19.0 - 11.0, 18.0 - 12.0]
    assert cwd["over_baseline_other"] == [16.0 - 14.0]
    assert student["over_baseline_spiked"] == student["over_baseline_other"] == []
    assert (
        "| CWD | 4 | 2 | 1.35 | -4.0, -1.0 (mean -2.5, 2 draws) | +8.0 ± 2.0 (3) | +2.0 (1) |" in md
    )
    assert "| student alone | 4 | 3 | 3.50 | -4.0 (mean -4.0, 1 draws) |  |  |" in md


def test_spikes_counts_a_cell_without_a_log_apart_and_pairs_nothing_with_it(tmp_path, capsys):
    """A cell kept before results kept their losses, its folder gone, has no peak ratio: it
    counts in its row's cells and is listed by name, but not in the spike counts, the
    median or the split by the student alone's spikes; the report still gets written."""
    sys.path.insert(0, str(QUALITY.parent))
    import quality_spikes

    folder = tmp_path / "detection_sparse"
    peaks = {"student_s1": 3.0, "student_s2": 1.0,
             "cwd_w27_s0": 2.0, "cwd_w27_s1": 1.0, "cwd_w27_s2": 1.2}  # fmt: skip
    for name, peak in peaks.items():  # student_s0: no folder and nothing kept
        _log(folder / name / "csv/version_0/metrics.csv", [(9, 0.5), (59, 0.5 * peak)])
    rows = [{"row": "student", "label": "student alone", "weight": None, "test": [10.0, 11.0, 14.0]},
            {"row": "cwd", "label": "CWD", "weight": 27.0, "test": [20.0, 16.0, 18.0]}]  # fmt: skip
    report = {"task": "detection_sparse", "data": {}, "seeds": [0, 1, 2], "rows": rows}
    cells = quality_spikes.collect([report], tmp_path, window=150)
    assert "student_s0" in capsys.readouterr().err
    assert [c["ratio"] for c in cells][:3] == [None, pytest.approx(3.0), pytest.approx(1.0)]
    student, cwd = quality_spikes.summarise(cells, threshold=1.5)
    assert (student["cells"], student["no_log"], student["spiked"]) == (3, 1, 1)
    assert student["median_ratio"] == pytest.approx(2.0)
    assert student["spiked_minus_other"] == [11.0 - 14.0]
    assert (cwd["cells"], cwd["no_log"], cwd["spiked"]) == (3, 0, 1)
    # seed 0's student alone has no ratio: CWD's seed 0 goes in neither column
    assert cwd["over_baseline_spiked"] == [16.0 - 11.0]
    assert cwd["over_baseline_other"] == [18.0 - 14.0]
    md = quality_spikes.spikes_md({"machine": {}, "command": "c", "window": 150,
                                   "threshold": 1.5, "draws": [0],
                                   "rows": [student, cwd], "sweep": [], "cells": cells})  # fmt: skip
    assert "| student alone | 3 (1 without a log) | 1 | 2.00 |" in md
    assert "| CWD | 3 | 1 | 1.20 |" in md
    assert "their folders gone; no ratio): student_s0 (data seed 0)." in md
    none = quality_spikes.summarise([c for c in cells if c["cell"] == "student_s0"], 1.5)
    assert none[0]["median_ratio"] is None and "| n/a |" in quality_spikes.spikes_md(
        {"machine": {}, "command": "c", "window": 150, "threshold": 1.5, "draws": [0],
         "rows": none, "sweep": [], "cells": cells[:1]})  # fmt: skip


def test_spikes_rerender_splits_a_committed_reports_gains_by_the_student_alones_spikes(tmp_path):
    """--rerender rewrites a committed spikes report from its stored cells: the counts stay,
    and each row's gain over the student alone is split by whether the student alone's cell
    on that draw and seed spiked; a file of another benchmark is refused by name."""
    src = QUALITY.parent / "results" / "quality_detection_clutter_spikes_cpu.json"
    report = json.loads(src.read_text())
    path = tmp_path / src.name
    path.write_text(json.dumps(report))
    script = QUALITY.parent / "quality_spikes.py"
    subprocess.run([sys.executable, str(script), "--rerender", str(path)], check=True)
    back = json.loads(path.read_text())
    assert back["cells"] == report["cells"] and back["command"] == report["command"]
    student = {(c["draw"], c["seed"]): c for c in report["cells"] if c["row"] == "student"}
    spiked = {k for k, c in student.items() if c["ratio"] >= report["threshold"]}
    assert 0 < len(spiked) < len(student)  # both kinds, so both columns are exercised
    for old, new in zip(report["rows"], back["rows"], strict=True):
        assert {k: new[k] for k in old} == old
        mine = [c for c in report["cells"] if c["row"] == old["row"]]
        if old["row"] == "student":
            assert new["over_baseline_spiked"] == new["over_baseline_other"] == []
            continue
        for key, on_spiked in (("over_baseline_spiked", True), ("over_baseline_other", False)):
            want = [c["test"] - student[c["draw"], c["seed"]]["test"] for c in mine
                    if ((c["draw"], c["seed"]) in spiked) == on_spiked]  # fmt: skip
            assert new[key] == pytest.approx(want), (old["row"], key)
    assert path.with_suffix(".md").read_text().count("± ") >= len(back["rows"]) - 1
    path.write_text(json.dumps({"benchmark": "quality"}))
    bad = subprocess.run([sys.executable, str(script), "--rerender", str(path)],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "not a quality_spikes report" in bad.stderr


def test_quality_diagnostic_warmup_gives_every_cell_its_own_name_and_the_warmup(tmp_path):
    """--warmup-steps: every student cell, the student alone's too, warms up over N steps and
    has its own name; the report is the diagnostic's own, on its draw; --tune refuses it."""
    import argparse

    import yaml

    sys.path.insert(0, str(QUALITY.parent))
    from quality import CONFIGS, ROWS, Plan
    from quality_report import table_md

    recipe = yaml.safe_load((CONFIGS / "detection" / "student.yaml").read_text())
    assert recipe["optim"]["warmup_steps"] != 200  # a change, not the recipe's own value
    args = argparse.Namespace(quick=False, work=tmp_path, out=tmp_path, accelerator="cpu",
                              warmup_steps=200, data_seed=1)  # fmt: skip
    plan = Plan("detection_clutter", args)
    assert plan.diagnostic
    rows = {r.name: r for r in ROWS}
    for row, weight, name in [("student", None, "student_warmup200_s1"),
                              ("cwd", 27.0, "cwd_w27_warmup200_s1"),
                              ("maskd_unweighted", 30.0, "maskd_unweighted_w30_warmup200_s1")]:  # fmt: skip
        assert plan.cell(rows[row], weight, 1) == name
        cmd = plan.student_cell(rows[row], 1, weight, name, ("val",)).commands[0][0]
        assert "--optim.warmup_steps=200" in cmd and "--run.seed=1" in cmd
        assert str(tmp_path / "detection_clutter_data1" / name) in " ".join(cmd)
    assert plan.report_stem(3) == "quality_detection_clutter_warmup200_data1_cpu"
    data = {"train": 1, "val": 1, "test": 1, "size": 64, "seed": 1}
    teacher = {"model": "t", "test": 20.0, "val": 19.0}
    md = table_md({"machine": {}, "command": "c", "date": "d", "data": data, "rows": [],
                   "teacher": teacher, "maskd_vs_peers": {}, "maskd_vs_ablations": {},
                   "student_model": "s", "student_steps": 500, "warmup_steps": 200,
                   "seeds": [0], "metric": "test map", "levels": None})  # fmt: skip
    assert "learning rate warmed up over 200 steps" in md
    tune = [sys.executable, str(QUALITY), "--task", "detection_clutter", "--tune",
            "--warmup-steps", "200", "--work", str(tmp_path), "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(tune, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--warmup-steps" in done.stderr


def test_quality_diagnostic_precision_gives_every_cell_its_own_name_and_precision(tmp_path):
    """--precision: every student cell, the student alone's too, trains in that precision and
    has its own name, beside the table's teacher and tokens; the report says it; a precision
    Lightning does not have is refused before anything runs."""
    import argparse

    import yaml

    sys.path.insert(0, str(QUALITY.parent))
    from quality import CONFIGS, ROWS, Plan
    from quality_report import table_md

    recipe = yaml.safe_load((CONFIGS / "detection_sparse_fast" / "student.yaml").read_text())
    assert recipe["trainer"]["precision"] == "bf16-mixed"  # the diagnostic changes it
    args = argparse.Namespace(quick=False, work=tmp_path, out=tmp_path, accelerator="cpu",
                              precision="32-true", data_seed=1)  # fmt: skip
    plan = Plan("detection_sparse_fast", args)
    assert plan.diagnostic
    rows = {r.name: r for r in ROWS}
    shared = tmp_path / "detection_sparse_fast_data1"
    for row, weight, name in [("student", None, "student_precision32-true_s2"),
                              ("fgd", 9.0, "fgd_w9_precision32-true_s2"),
                              ("maskd", 10.0, "maskd_w10_precision32-true_s2")]:  # fmt: skip
        assert plan.cell(rows[row], weight, 2) == name
        cmd = plan.student_cell(rows[row], 2, weight, name, ("val",)).commands[0][0]
        # the override comes after --config, so it wins over the recipe's bf16-mixed
        assert cmd.index("--trainer.precision=32-true") > cmd.index("--config")
        assert str(shared / name) in " ".join(cmd)
        if row != "student":
            assert f"--teacher.weights={shared / 'teacher' / 'model.pt'}" in cmd
    assert plan.report_stem(3) == "quality_detection_sparse_fast_precision32-true_data1_cpu"
    data = {"train": 1, "val": 1, "test": 1, "size": 128, "seed": 1}
    teacher = {"model": "t", "test": 20.0, "val": 19.0}
    md = table_md({"machine": {}, "command": "c", "date": "d", "data": data, "rows": [],
                   "teacher": teacher, "maskd_vs_peers": {}, "maskd_vs_ablations": {},
                   "student_model": "s", "student_steps": 500, "precision": "32-true",
                   "seeds": [0], "metric": "test map", "levels": None})  # fmt: skip
    assert "precision 32-true, seeds" in md
    bad = [sys.executable, str(QUALITY), "--task", "detection_sparse_fast", "--precision",
           "fp32", "--work", str(tmp_path), "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(bad, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--precision" in done.stderr and "32-true" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing was written
    tune = [sys.executable, str(QUALITY), "--task", "detection_sparse_fast", "--tune",
            "--precision", "32-true", "--work", str(tmp_path), "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(tune, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--precision" in done.stderr


def test_spikes_reads_a_warmup_diagnostics_own_cells(tmp_path):
    """A --warmup-steps report's cells carry the warm-up in their names, as quality.py
    names them."""
    sys.path.insert(0, str(QUALITY.parent))
    import quality_spikes
    from quality import ROWS, Plan

    args = argparse.Namespace(quick=False, work=tmp_path, out=tmp_path, accelerator="cpu",
                              warmup_steps=200, data_seed=2)  # fmt: skip
    plan = Plan("detection_clutter", args)
    rows = {r.name: r for r in ROWS}
    names = [plan.cell(rows["student"], None, 0), plan.cell(rows["cwd"], 27.0, 0)]
    for name, peak in zip(names, (1.2, 3.0), strict=True):
        _log(plan.work / name / "csv/version_0/metrics.csv", [(9, 1.0), (219, peak)])
    report = {"task": "detection_clutter", "data": {"seed": 2}, "seeds": [0],
              "warmup_steps": 200, "rows": [
                  {"row": "student", "label": "student alone", "weight": None, "test": [15.0]},
                  {"row": "cwd", "label": "CWD", "weight": 27.0, "test": [19.0]}]}  # fmt: skip
    cells = quality_spikes.collect([report], tmp_path, window=300)
    assert [c["cell"] for c in cells] == names
    assert [c["ratio"] for c in cells] == pytest.approx([1.2, 3.0])
    (tmp_path / "r.json").write_text(json.dumps({**report, "machine": {}}))
    cmd = [sys.executable, str(QUALITY.with_name("quality_spikes.py")), str(tmp_path / "r.json"),
           "--work", str(tmp_path), "--out", str(tmp_path / "out"), "--window", "300"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    own = tmp_path / "out" / "quality_detection_clutter_warmup200_data2_spikes_cpu.json"
    out = json.loads(own.read_text())  # its own name, beside other draws' reports
    assert [r["spiked"] for r in out["rows"]] == [0, 1]


def test_warmup_choice_reads_the_table_cells_at_the_recipes_own_warmup(tmp_path):
    """quality_warmup.py: the recipe's own warm-up is the table's student cells (no new
    name), the others ``student_warmup<N>_s<seed>``; the highest mean validation score is
    chosen (a diverged cell never, the shorter on a tie); the test split is not read."""
    sys.path.insert(0, str(QUALITY.parent))
    import quality_warmup

    assert quality_warmup.choose({50: [0.1, 0.3], 100: [0.2, 0.2], 200: [0.1, 0.25]}) == 50
    assert quality_warmup.choose({50: [0.1, 0.1], 100: [0.5, float("nan")]}) == 50
    assert quality_warmup.choose({50: [float("nan")]}) is None

    args = argparse.Namespace(quick=False, work=tmp_path, out=tmp_path / "out",
                              accelerator="cpu", warmups=[50, 200], seeds=2, workers=1)  # fmt: skip
    work = tmp_path / "detection_clutter"
    (work / "data").mkdir(parents=True)
    (work / "data" / "done.txt").write_text("ok\n")
    kept = tmp_path / "out" / "quality_cells" / "detection_clutter"
    kept.mkdir(parents=True)
    val = {"student_s0": 0.14, "student_s1": 0.12,
           "student_warmup200_s0": 0.15, "student_warmup200_s1": 0.16}  # fmt: skip
    for name, v in val.items():  # done cells: nothing trains; test far higher, never read
        (kept / f"{name}.json").write_text(json.dumps({"val": {"map": v}, "test": {"map": 0.9}}))
    _log(work / "student_s0" / "csv/version_0/metrics.csv", [(9, 1.0), (59, 2.5)])
    report = quality_warmup.run("detection_clutter", args)
    assert report["chosen"] == 200
    assert report["warmups"]["50"]["cells"] == ["student_s0", "student_s1"]
    assert report["warmups"]["200"]["val"] == [0.15, 0.16]
    assert report["warmups"]["50"]["peak_ratio"] == [pytest.approx(2.5), None]  # s1: no log
    md = (tmp_path / "out" / "quality_detection_clutter_warmup_choice_cpu.md").read_text()
    assert "| 200 (chosen) | 15.0, 16.0 | 15.5 | n/a, n/a |" in md
    assert "| 50 | 14.0, 12.0 | 13.0 | 2.50, n/a |" in md


def test_quality_task_sharing_anothers_models_reuses_its_data_teacher_and_tokens(tmp_path):
    """detection_clutter_warmup: the data, teacher and tokens are detection_clutter's (its
    folder and configs, on the same draw); only the student cells are its own, with its own
    recipe; run_cells finds a shared cell done in the shared folder."""
    sys.path.insert(0, str(QUALITY.parent))
    from quality import CONFIGS, ROWS, Plan, run_cells

    args = argparse.Namespace(quick=False, work=tmp_path, out=tmp_path / "out",
                              accelerator="cpu", data_seed=1)  # fmt: skip
    plan = Plan("detection_clutter_warmup", args)
    shared, own = tmp_path / "detection_clutter_data1", tmp_path / "detection_clutter_warmup_data1"
    base = Plan("detection_clutter", args)
    assert plan.data_cell().commands == base.data_cell().commands
    assert plan.teacher_cell().commands[0] == base.teacher_cell().commands[0]
    assert [c.commands for c in plan.token_cells({"tokens", "tokens_nohead"})] == [
        c.commands for c in base.token_cells({"tokens", "tokens_nohead"})
    ]
    assert {c.home for c in [plan.data_cell(), plan.teacher_cell()]} == {shared}
    rows = {r.name: r for r in ROWS}
    cmd = " ".join(
        plan.student_cell(rows["maskd"], 0, 30.0, "maskd_w30_s0", ("val",)).commands[0][0]
    )
    assert f"--teacher.weights={shared / 'teacher' / 'model.pt'}" in cmd
    assert f"--distill.tokens={shared / 'tokens' / 'tokens.pt'}" in cmd
    assert f"--run.out={own / 'maskd_w30_s0'}" in cmd and f"--data.root={shared / 'data'}" in cmd
    assert str(CONFIGS / "detection_clutter_warmup" / "distill.yaml") in cmd
    assert plan.kept == tmp_path / "out" / "quality_cells" / "detection_clutter_warmup_data1"
    assert plan.report_stem(3) == "quality_detection_clutter_warmup_data1_cpu"

    (shared / "data").mkdir(parents=True)
    (shared / "data" / "done.txt").write_text("ok\n")
    (shared / "teacher").mkdir()
    (shared / "teacher" / "result.json").write_text(json.dumps({"test": {"map": 0.2}}))
    assert plan.read("teacher") == {"test": {"map": 0.2}}
    student = plan.student_cell(rows["student"], 0, None, "student_s0", ("val",))
    student.commands = []  # nothing to train here: finish writes the result
    student.finish = lambda d: (d / "result.json").write_text("{}")
    run_cells([plan.data_cell(), plan.teacher_cell(), student], plan.work, 1, plan.kept)
    assert (own / "student_s0" / "result.json").is_file()  # the shared cells were done
    assert not (own / "data").exists() and not (own / "teacher").exists()


def test_spikes_reads_a_student_steps_diagnostics_own_cells(tmp_path):
    """A report whose step count is not the recipe's is a --student-steps diagnostic: its
    cells and spikes report carry the steps; at the recipe's own count they are the table's."""
    sys.path.insert(0, str(QUALITY.parent))
    import quality_spikes
    from maskd.config_files import load_config
    from quality import CONFIGS, ROWS

    recipe = load_config(CONFIGS / "detection" / "student.yaml")["trainer"]["max_steps"]
    student = next(r for r in ROWS if r.name == "student")
    for steps, name, stem in [
        (1000, "student_steps1000_s0", "quality_detection_steps1000_cpu"),
        (recipe, "student_s0", "quality_detection_cpu"),
        (None, "student_s0", "quality_detection_cpu"),  # reports before the key existed
    ]:
        report = {"task": "detection", "data": {"seed": 0}, "student_steps": steps}
        plan = quality_spikes._plan(report, tmp_path)
        assert plan.cell(student, None, 0) == name and plan.report_stem(3) == stem


def test_quality_detection_clutter_warmup_changes_only_the_students_warmup():
    """detection_clutter_warmup: its configs are detection_clutter's with the students'
    warm-up the one quality_warmup.py chose on validation (its committed report); the task is
    detection_clutter's but for sharing its models."""
    _assert_only_the_students_warmup_differs("detection_clutter", table_warmup=50)


def _assert_only_the_students_warmup_differs(base_task: str, table_warmup: int) -> None:
    """<base_task>_warmup's configs are base_task's with the students' warm-up the one
    quality_warmup.py chose on validation (its committed report, never the table's own), and
    its task is base_task's but for sharing base_task's models."""
    sys.path.insert(0, str(QUALITY.parent))
    from maskd.config_files import load_config
    from quality import CONFIGS, RESULTS, TASKS

    task = f"{base_task}_warmup"
    choice = json.loads((RESULTS / f"quality_{task}_choice_cpu.json").read_text())
    chosen = choice["chosen"]
    assert choice["task"] == base_task and chosen != table_warmup
    regime, base = CONFIGS / task, CONFIGS / base_task
    assert sorted(p.name for p in regime.iterdir()) == [
        "cwd.yaml", "distill.yaml", "fgd.yaml", "fitnet.yaml", "student.yaml"
    ]  # fmt: skip
    for path in regime.iterdir():
        mine, theirs = load_config(path), load_config(base / path.name)
        if path.name in ("student.yaml", "distill.yaml"):
            assert theirs["optim"]["warmup_steps"] == table_warmup
            assert mine["optim"].pop("warmup_steps") == chosen
            theirs["optim"].pop("warmup_steps")
        assert mine == theirs, path.name
    spec = dict(TASKS[task])
    assert spec.pop("shares") == base_task and spec == TASKS[base_task]


def test_quality_detection_clutter_stable_warms_the_teacher_up_too(tmp_path):
    """detection_clutter_stable: the teacher's config is detection_clutter's with the
    students' chosen warm-up, the students' are detection_clutter_warmup's unchanged, and the
    weights are read from detection_clutter_warmup's sweep (named in the report; a sweep of
    its own is refused)."""
    sys.path.insert(0, str(QUALITY.parent))
    from maskd.config_files import load_config
    from quality import CONFIGS, RESULTS, TASKS, Plan, chosen_weights, table_md

    chosen = json.loads((RESULTS / "quality_detection_clutter_warmup_choice_cpu.json").read_text())
    regime = CONFIGS / "detection_clutter_stable"
    teacher, base = (
        load_config(regime / "teacher.yaml"),
        load_config(CONFIGS / "detection_clutter" / "teacher.yaml"),
    )
    assert base["optim"].pop("warmup_steps") == 50
    assert teacher["optim"].pop("warmup_steps") == chosen["chosen"] and teacher == base
    same = {"learn_masks.yaml": "detection_clutter"}
    for path in regime.iterdir():
        if path.name != "teacher.yaml":
            other = CONFIGS / same.get(path.name, "detection_clutter_warmup") / path.name
            assert load_config(path) == load_config(other), path.name
    spec = dict(TASKS["detection_clutter_stable"])
    assert spec.pop("weights_from") == "detection_clutter_warmup"
    assert spec == TASKS["detection_clutter"]

    args = argparse.Namespace(quick=False, work=tmp_path, out=tmp_path / "out",
                              accelerator="cpu", tuning_device=None)  # fmt: skip
    plan = Plan("detection_clutter_stable", args)
    assert plan.shared == plan.work == tmp_path / "detection_clutter_stable"  # its own teacher
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit, match="quality_detection_clutter_warmup_tuning_cpu.json"):
        chosen_weights(plan, args)
    sweep = {"methods": {"cwd": {"chosen": 90.0}, "maskd": {"chosen": 10.0}}}
    (tmp_path / "out" / "quality_detection_clutter_warmup_tuning_cpu.json").write_text(
        json.dumps(sweep)
    )
    assert chosen_weights(plan, args) == {"cwd": 90.0, "maskd": 10.0}
    cmd = [sys.executable, str(QUALITY), "--task", "detection_clutter_stable", "--tune",
           "--work", str(tmp_path), "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "run --tune on that task" in done.stderr
    report = json.loads((RESULTS / "quality_detection_clutter_warmup_cpu.json").read_text())
    assert "Weights:" not in table_md(report)
    report["weights_from"] = "quality_detection_clutter_warmup_tuning_cpu.md"
    assert "Weights: those chosen in quality_detection_clutter_warmup_tuning_cpu.md." in (
        table_md(report)
    )


def test_quality_diagnosis_sends_a_sharing_task_to_the_task_it_shares(tmp_path):
    """The diagnosis reads a task's teacher and tokens: a task reusing another's names it."""
    cmd = [sys.executable, str(QUALITY.with_name("quality_diagnosis.py")), "--task",
           "detection_clutter_warmup", "--work", str(tmp_path), "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--task detection_clutter" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_quality_diagnosis_of_a_draw_without_its_teacher_says_how_to_make_it(tmp_path):
    """--data-seed reads <task>_data<seed>: with no teacher there, the error names the path
    and the quality.py command that trains it, and nothing is written."""
    cmd = [sys.executable, str(QUALITY.with_name("quality_diagnosis.py")), "--task",
           "detection_clutter", "--data-seed", "3", "--work", str(tmp_path / "work"),
           "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert (
        str(tmp_path / "work" / "detection_clutter_data3" / "teacher" / "model.pt") in done.stderr
    )
    assert "quality.py --task detection_clutter --data-seed 3" in done.stderr
    assert not (tmp_path / "out").exists()
    # --agnostic reads only the cells it names: a missing one is named, not the teacher
    cmd += ["--agnostic", "student_s0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    missing = tmp_path / "work" / "detection_clutter_data3" / "student_s0" / "model.pt"
    assert done.returncode != 0 and f"no trained student_s0 at {missing}" in done.stderr
    assert "teacher" not in done.stderr and not (tmp_path / "out").exists()


def test_detection_sparse_is_the_stable_clutter_recipe_at_128_px_on_sparser_objects(tmp_path):
    """detection_sparse: every config is detection_clutter_stable's (teacher) or
    detection_clutter_warmup's (students) with both models at 128 px and nothing else
    changed (the 64 px scale ranges kept); its data are the clutter scenes drawn at half
    scale, and its weights are read from detection_clutter_warmup's sweep."""
    sys.path.insert(0, str(QUALITY.parent))
    from maskd.config_files import load_config
    from quality import CONFIGS, RANGES, TASKS, Plan

    regime = CONFIGS / "detection_sparse"
    bases = {"teacher.yaml": "detection_clutter_stable", "learn_masks.yaml": "detection_clutter"}
    names = sorted(p.name for p in regime.iterdir())
    assert names == sorted(p.name for p in (CONFIGS / "detection_clutter").iterdir())
    for path in regime.iterdir():
        got = load_config(path)
        want = load_config(CONFIGS / bases.get(path.name, "detection_clutter_warmup") / path.name)
        for role in ("model", "student", "teacher"):
            if role in want:
                assert want[role]["options"]["min_size"] == 64, (path.name, role)
                assert got[role]["options"]["regress_ranges"] == RANGES
                want[role]["options"].update(min_size=128, max_size=128)
        assert got == want, path.name
    spec = dict(TASKS["detection_sparse"])
    options = spec.pop("options")
    assert options["teacher"] == load_config(regime / "teacher.yaml")["model"]["options"]
    student = load_config(regime / "student.yaml")["model"]["options"]
    student.pop("box_regression_bias")  # an initial value: evaluation loads the weights
    assert options["student"] == student
    assert (spec.pop("data"), spec.pop("object_scale")) == ((1500, 200, 300, 128), 0.5)
    assert spec.pop("weights_from") == "detection_clutter_warmup"
    clutter = {k: v for k, v in TASKS["detection_clutter"].items() if k not in ("data", "options")}
    assert spec == clutter
    args = argparse.Namespace(quick=False, work=tmp_path, out=tmp_path / "out",
                              accelerator="cpu", tuning_device=None)  # fmt: skip
    cmd = Plan("detection_sparse", args).data_cell().commands[0][0]
    assert cmd[cmd.index("--object_scale") + 1] == "0.5"
    assert cmd[cmd.index("--size") + 1] == "128" and cmd[cmd.index("--difficulty") + 1] == "clutter"
    cmd = Plan("detection_clutter", args).data_cell().commands[0][0]
    assert "--object_scale" not in cmd


def test_detection_sparse_warmup_changes_only_the_students_warmup(tmp_path):
    """detection_sparse_warmup: its configs are detection_sparse's with the students' warm-up
    the one quality_warmup.py chose on validation (its committed report); the task is
    detection_sparse's but for sharing its data, teacher and tokens, and its cells' commands
    read them from detection_sparse's folder."""
    _assert_only_the_students_warmup_differs("detection_sparse", table_warmup=100)
    from quality import CONFIGS, ROWS, Plan

    regime = CONFIGS / "detection_sparse_warmup"
    args = argparse.Namespace(quick=False, work=tmp_path, out=tmp_path / "out",
                              accelerator="cpu", tuning_device=None)  # fmt: skip
    plan = Plan("detection_sparse_warmup", args)
    row = next(r for r in ROWS if r.name == "maskd_nohead")
    cell = plan.student_cell(row, 0, 10.0, plan.cell(row, 10.0, 0), ("val", "test"))
    cmd = " ".join(cell.commands[0][0])
    shared = tmp_path / "detection_sparse"
    assert f"--distill.tokens={shared / 'tokens_nohead' / 'tokens.pt'}" in cmd
    assert f"--teacher.weights={shared / 'teacher' / 'model.pt'}" in cmd
    assert f"--run.out={tmp_path / 'detection_sparse_warmup'}" in cmd
    assert str(regime / "distill.yaml") in cmd


def test_detection_sparse_fast_is_detection_sparse_warmup_on_cheaper_settings(tmp_path):
    """detection_sparse_fast: every config resolves to detection_sparse_warmup's (its
    teacher's and stage 1's to detection_sparse's) with the trainer in channels-last layout
    and bfloat16 mixed precision and, in the distilled rows, the teacher's trunk cached;
    nothing else. The task trains its
    own data, teacher and tokens, and its distilled cells pass the cache on."""
    sys.path.insert(0, str(QUALITY.parent))
    from maskd.config_files import load_config
    from quality import CONFIGS, ROWS, TASKS, Plan

    regime = CONFIGS / "detection_sparse_fast"
    bases = {"teacher.yaml": "detection_sparse", "learn_masks.yaml": "detection_sparse"}
    names = sorted(p.name for p in regime.iterdir())
    assert names == sorted(["cwd.yaml", "distill.yaml", "fgd.yaml", "fitnet.yaml",
                            "learn_masks.yaml", "student.yaml", "teacher.yaml"])  # fmt: skip
    for name in names:
        mine = load_config(regime / name)
        theirs = load_config(CONFIGS / bases.get(name, "detection_sparse_warmup") / name)
        if "trainer" in theirs:  # a whole recipe, not a row's terms
            assert mine["trainer"].pop("channels_last") is True, name
            assert mine["trainer"].pop("precision") == "bf16-mixed", name
        if name == "distill.yaml":
            assert mine["distill"].pop("teacher_cache") == "backbone.body"
        assert mine == theirs, name
    spec = dict(TASKS["detection_sparse_warmup"])
    assert spec.pop("shares") == "detection_sparse" and TASKS["detection_sparse_fast"] == spec
    args = argparse.Namespace(quick=False, work=tmp_path, out=tmp_path / "out",
                              accelerator="cpu", tuning_device=None)  # fmt: skip
    plan = Plan("detection_sparse_fast", args)
    assert plan.shared == tmp_path / "detection_sparse_fast"
    row = next(r for r in ROWS if r.name == "cwd")
    cmd = " ".join(plan.student_cell(row, 0, 90.0, "cwd_w90_s0", ("val",)).commands[0][0])
    assert str(regime / "distill.yaml") in cmd and "--distill.tokens=null" in cmd
    # the draw's cells share the cached outputs of their one teacher
    assert f"--distill.teacher_cache_dir={plan.shared / 'teacher_cache'}" in cmd
    warm = Plan("detection_sparse_warmup", args)
    cmd = " ".join(warm.student_cell(row, 0, 90.0, "cwd_w90_s0", ("val",)).commands[0][0])
    assert "teacher_cache" not in cmd


def test_diagnosis_curves_read_only_finished_cells(tmp_path):
    """quality_diagnosis._curve: the means of the first and last five logged steps of a
    finished cell; nothing for a cell still training (no result.json)."""
    sys.path.insert(0, str(QUALITY.parent))
    from quality_diagnosis import _curve

    log = tmp_path / "cell" / "csv" / "version_0" / "metrics.csv"
    log.parent.mkdir(parents=True)
    parts = ("classification", "bbox_regression", "bbox_ctrness")
    header = ["step", "train/loss", *(f"train/{p}" for p in parts), "train/loss_cwd"]
    lines = [",".join(header)]
    for step in range(12):
        lines.append(",".join(map(str, [step, 1.0, step, 1.0, 2.0, 10.0 * step])))
        lines.append(f"{step},,,,,")  # a row of other metrics (no train/loss): skipped
    log.write_text("\n".join(lines) + "\n")
    assert _curve(tmp_path / "cell", "loss_cwd") == {}
    (tmp_path / "cell" / "result.json").write_text("{}")
    got = _curve(tmp_path / "cell", "loss_cwd")
    first, last = range(5), range(7, 12)
    assert got["task_first"] == pytest.approx(sum(s + 3.0 for s in first) / 5)
    assert got["task_last"] == pytest.approx(sum(s + 3.0 for s in last) / 5)
    assert got["distill_first"] == pytest.approx(sum(10.0 * s for s in first) / 5)
    assert got["distill_last"] == pytest.approx(sum(10.0 * s for s in last) / 5)


def test_a_sweep_whose_cells_are_all_kept_trains_no_teacher(tmp_path):
    """``tune`` over kept cells writes its report without making the data, teacher or
    tokens; once one cell is missing they are made first, then that cell trains."""
    import argparse
    import math

    sys.path.insert(0, str(QUALITY.parent))
    import quality
    from quality import Cell

    peaks = {"fitnet": 3.0, "maskd": 10.0}  # each inside its first grid: no extension
    ran: list[str] = []

    def score(method: str, w: float) -> float:
        return -(math.log(w / peaks[method]) ** 2)

    def made(name: str) -> Cell:
        def finish(d: Path) -> None:
            ran.append(name)
            (d / "result.json").write_text("{}")

        return Cell(name, [] if name == "data" else ["data"], [], finish=finish)

    class StandIn:
        task, kind, quick = "standin", "detection", False
        work, kept = tmp_path / "work", tmp_path / "kept"

        def __init__(self) -> None:
            self.spec = {"peers": ("fitnet",), "defaults": dict(peaks), "ablations": False}

        def data_cell(self) -> Cell:
            return made("data")

        def teacher_cell(self) -> Cell:
            return made("teacher")

        def token_cells(self, variants: set[str]) -> list[Cell]:
            return [made("tokens")]

        def read(self, name: str) -> dict:
            path = self.work / name / "result.json"
            return json.loads((path if path.is_file() else self.kept / f"{name}.json").read_text())

        def student_cell(self, row, seed, w, name, splits) -> Cell:
            def finish(d: Path) -> None:
                ran.append(name)
                v = score(row.method, w)
                (d / "result.json").write_text(json.dumps({"val": {"map": v}}))

            return Cell(name, ["teacher", "tokens"], [], finish=finish, keep=True)

    rows = {r.method: r for r in quality.ROWS if r.method and not r.ablation}
    StandIn.kept.mkdir()
    names = []
    for method, peak in peaks.items():
        for w in (0.3 * peak, peak, 3 * peak):
            names.append(quality.cell_name(rows[method], w, 0))
            value = {"val": {"map": score(method, w)}}
            (StandIn.kept / f"{names[-1]}.json").write_text(json.dumps(value))
    args = argparse.Namespace(workers=1, out=tmp_path / "out", accelerator="cpu")
    report = quality.tune(StandIn(), args)
    assert ran == []
    assert {m: v["chosen"] for m, v in report["methods"].items()} == pytest.approx(peaks)
    (StandIn.kept / f"{names[0]}.json").unlink()  # fitnet at 0.9 was never kept
    report = quality.tune(StandIn(), args)
    assert sorted(ran[:3]) == ["data", "teacher", "tokens"] and ran[3:] == [names[0]]
    assert {m: v["chosen"] for m, v in report["methods"].items()} == pytest.approx(peaks)


def test_a_table_whose_cells_are_all_kept_is_reported_without_training_its_teacher(
    tmp_path, monkeypatch
):
    """The teacher's scores and fingerprints are kept beside the student cells (in the
    shared task's folder); the teacher and tokens are trained only while a cell still needs
    them, and a kept record of another teacher than the cells' is refused."""
    sys.path.insert(0, str(QUALITY.parent))
    import quality

    args = argparse.Namespace(quick=False, work=tmp_path / "w", out=tmp_path / "o",
                              accelerator="cpu", tuning_device=None, seeds=3, workers=1,
                              ablations=False, rows=["student", "fitnet", "cwd", "fgd", "maskd"])  # fmt: skip
    plan = quality.Plan("detection_sparse_warmup", args)
    weights = {"fitnet": 9.0, "cwd": 90.0, "fgd": 9.0, "maskd": 10.0}
    monkeypatch.setattr(quality, "chosen_weights", lambda plan, args: dict(weights))
    given: list[list[str]] = []

    def run_cells(cells, work, workers, kept, **kw):  # a cell left to train: as its first seed
        given.append([c.name for c in cells])
        for c in cells:
            if c.keep and not (kept / f"{c.name}.json").is_file():
                (kept / f"{c.name}.json").write_text((kept / f"{names[0]}.json").read_text())

    monkeypatch.setattr(quality, "run_cells", run_cells)

    # the teacher as trained: its folder with weights and scores, on data with one file
    data, teacher = tmp_path / "w" / "detection_sparse" / "data", plan.shared / "teacher"
    data.mkdir(parents=True)
    (data / "a.txt").write_text("pixels")
    teacher.mkdir()
    (teacher / "model.pt").write_bytes(b"weights")
    (teacher / "result.json").write_text(json.dumps(
        {"val": {"map": 0.25}, "test": {"map": 0.26, "map_50": 0.4}}))  # fmt: skip

    def digest(*files: Path) -> str:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + f.read_bytes())
        return h.hexdigest()[:16]

    inputs = {"data": digest(data / "a.txt"), "teacher": digest(teacher / "model.pt")}
    rows = {r.name: r for r in quality.ROWS}
    names = [plan.cell(rows[r], weights.get(rows[r].method), s) for r in args.rows for s in (0, 1, 2)]  # fmt: skip
    plan.kept.mkdir(parents=True)
    for i, name in enumerate(names[:-1]):  # every cell kept but MasKD's seed 2
        score = {"map": 0.15 + i / 1000, "map_50": 0.3}
        (plan.kept / f"{name}.json").write_text(json.dumps(
            {"val": score, "test": score, "inputs": inputs}))  # fmt: skip

    # a cell still needs the teacher: it and the tokens train (done in their folder)
    assert quality.table(plan, args)["teacher"] == {"model": "fcos_resnet50_fpn",
                                                    "test": 26.0, "val": 25.0}  # fmt: skip
    assert {"teacher", "tokens"} <= set(given[-1])
    record = json.loads(plan.teacher_record().read_text())
    assert (
        plan.teacher_record()
        == tmp_path / "o" / "quality_cells" / "detection_sparse" / "teacher.json"
    )
    assert record["inputs"] == inputs and record["test"]["map"] == 0.26

    # every cell kept, a fresh work folder: the report reads the kept record
    assert (plan.kept / f"{names[-1]}.json").is_file()
    shutil.rmtree(tmp_path / "w")
    report = quality.table(plan, args)
    assert "teacher" not in given[-1] and "tokens" not in given[-1]
    assert report["teacher"]["test"] == pytest.approx(26.0)
    assert report["inputs"]["fingerprints"] == inputs

    # a record of another teacher than the cells' is refused
    plan.teacher_record().write_text(json.dumps({**record, "inputs": {**inputs, "teacher": "t2"}}))
    with pytest.raises(SystemExit, match="different inputs"):
        quality.table(plan, args)
    # no record and no teacher: the teacher trains to be read
    plan.teacher_record().unlink()
    with pytest.raises(SystemExit, match="train the teacher first"):
        quality.table(plan, args)
    assert "teacher" in given[-1]
