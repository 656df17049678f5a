"""Command-line tests: every subcommand on tiny synthetic data (64 px, a few steps).

The pipeline fixture runs train → learn-masks → distill → evaluate → export → visualize once
on a small segmentation dataset; each test then checks one command's results against an
independent computation.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from maskd.cli import main
from maskd.engine.modules import state_fingerprint

SEG = {"kind": "folder", "size": 64, "batch_size": 2, "val_batch_size": 4}
TRAINER = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.progress_bar=false"]


def run_cli(args, capsys=None):
    code = main([str(a) for a in args])
    if capsys is None:
        return code, "", ""
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("segdata")
    code = main(
        [
            "data",
            "synth",
            "--out",
            str(root),
            "--task",
            "segmentation",
            "--train",
            "6",
            "--val",
            "4",
            "--size",
            "64",
            "--seed",
            "1",
            "--preview",
            "0",
        ]
    )
    assert code == 0
    return root


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, seg_data):
    """train (teacher + student) → learn-masks → distill on the segmentation data."""
    base = tmp_path_factory.mktemp("runs")
    cfg = base / "teacher.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "deeplabv3_resnet18"},
                "data": {**SEG, "root": str(seg_data)},
                "optim": {"lr": 0.01, "schedule": "cosine", "warmup_steps": 1},
                "trainer": {"max_steps": 99, "log_every_n_steps": 1, "val_every_n_epochs": 0},
                "run": {"out": str(base / "teacher"), "seed": 3},
            }
        )
    )
    # --trainer.max_steps on the command line overrides the YAML's 99
    assert main(["train", "--config", str(cfg), "--trainer.max_steps=2", *TRAINER]) == 0
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg),
                "--model.name=fcn_resnet18",
                "--trainer.max_steps=2",
                f"--run.out={base / 'student'}",
                *TRAINER,
            ]
        )
        == 0
    )
    common = [
        f"--data.root={seg_data}",
        "--data.kind=folder",
        "--data.size=64",
        "--data.batch_size=2",
        "--trainer.max_steps=2",
        "--trainer.log_every_n_steps=1",
        *TRAINER,
    ]
    # A copy: another test resumes the teacher run, which rewrites teacher/model.pt.
    shutil.copy(base / "teacher" / "model.pt", base / "teacher.pt")
    teacher = ["--teacher.name=deeplabv3_resnet18", f"--teacher.weights={base / 'teacher.pt'}"]
    assert (
        main(
            [
                "learn-masks",
                *teacher,
                "--masks.num_tokens=3",
                "--masks.weighted=false",
                "--masks.mask_images=2",
                f"--run.out={base / 'masks'}",
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "distill",
                *teacher,
                "--student.name=fcn_resnet18",
                f"--distill.tokens={base / 'masks' / 'tokens.pt'}",
                "--distill.loss_weight=0.5",
                "--distill.eps=1e-5",
                f"--run.out={base / 'distill'}",
                *common,
            ]
        )
        == 0
    )
    return base


def test_no_arguments_prints_help(capsys):
    code, out, _ = run_cli([], capsys)
    assert code == 2 and "learn-masks" in out and "distill" in out


def test_models_lists_the_registry(capsys):
    from maskd import models

    code, out, _ = run_cli(["models", "--task", "segmentation"], capsys)
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines()[1:]]
    assert listed == models.available("segmentation")


def test_data_synth_detection_counts(tmp_path, capsys):
    from pycocotools.coco import COCO

    code, _, _ = run_cli(
        [
            "data",
            "synth",
            "--out",
            tmp_path / "d",
            "--task",
            "detection",
            "--train",
            "3",
            "--val",
            "2",
            "--size",
            "48",
            "--preview",
            "2",
        ],
        capsys,
    )
    assert code == 0
    for split, n in (("train", 3), ("val", 2)):
        coco = COCO(str(tmp_path / "d" / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == n
    assert (tmp_path / "d" / "preview.png").is_file()


def test_data_synth_passes_object_scale_and_names_a_bad_one(tmp_path, capsys):
    args = ["data", "synth", "--out", tmp_path / "d", "--train", "2", "--val", "1"]
    args += ["--difficulty", "clutter", "--size", "64", "--preview", "0"]
    code, _, _ = run_cli([*args, "--object_scale", "0.5"], capsys)
    assert code == 0
    assert json.loads((tmp_path / "d" / "synth_meta.json").read_text())["object_scale"] == 0.5
    code, _, err = run_cli([*args, "--object_scale", "2", "--overwrite", "true"], capsys)
    assert code != 0 and "object_scale must be in (0, 1], got 2.0" in err


def test_train_writes_resolved_config_and_override_wins(pipeline):
    cfg = yaml.safe_load((pipeline / "teacher" / "config.yaml").read_text())
    assert cfg["trainer"]["max_steps"] == 2 and cfg["model"]["name"] == "deeplabv3_resnet18"
    done = json.loads((pipeline / "teacher" / "done.json").read_text())
    assert done["global_step"] == 2
    csv = next((pipeline / "teacher" / "csv").glob("version_*/metrics.csv")).read_text()
    for key in ("train/loss_seg", "train/loss_aux", "train/loss", "lr-SGD"):
        assert key in csv
    assert (pipeline / "teacher" / "checkpoints" / "last.ckpt").is_file()


def test_print_config_shows_yaml_plus_overrides(pipeline, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "train",
                "--config",
                str(pipeline / "teacher.yaml"),
                "--optim.lr=0.5",
                "--print_config",
            ]
        )
    assert exc.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (
        cfg["optim"]["lr"] == 0.5
        and cfg["run"]["seed"] == 3
        and cfg["optim"]["schedule"] == "cosine"
    )


def test_learn_masks_trains_only_tokens_and_logs_mask_images(pipeline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from maskd.models import build
    from maskd.token_io import load_tokens

    tokens = load_tokens(pipeline / "masks" / "tokens.pt")
    assert list(tokens) == ["model.classifier.4"]
    (tok,) = tokens["model.classifier.4"]
    assert tok.num_tokens == 3 and tok.channels == 7 and not tok.weighted  # 6 shapes + background
    # tokens moved away from their N(0, 0.01²) initialisation (Adam lr 0.01, 2 steps)
    assert tok.mask_token.abs().max() > 0.015
    # the checkpoint leaves the frozen teacher out and records its fingerprint
    ckpt = torch.load(pipeline / "masks" / "checkpoints" / "last.ckpt", weights_only=True)
    teacher, _ = build("deeplabv3_resnet18", 7, weights=str(pipeline / "teacher.pt"))
    assert not [k for k in ckpt["state_dict"] if k.startswith("net.teacher.")]
    assert ckpt["maskd_teacher"]["sha256"] == state_fingerprint(teacher)
    acc = EventAccumulator(str(pipeline / "masks" / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert "masks/model.classifier.4" in acc.Tags()["images"]
    # the end-of-training summary over the same images: three unweighted tokens
    summary = json.loads((pipeline / "masks" / "token_summary.json").read_text())
    (level,) = summary.values()
    assert level["weight"] is None and len(level["coverage"]) == 3
    assert all(0 < c < 1 for c in level["coverage"])


def test_learn_masks_with_a_training_teacher_keeps_its_statistics_and_resumes(
    pipeline, seg_data, capsys
):
    """--masks.teacher_mode=train: the teacher's BatchNorm statistics move and go into the
    checkpoint, its hash stays the one of the weights file, and the run resumes."""
    from maskd.models import build

    out = pipeline / "masks_train_mode"
    args = [
        "learn-masks",
        "--teacher.name=deeplabv3_resnet18",
        f"--teacher.weights={pipeline / 'teacher.pt'}",
        "--masks.num_tokens=3",
        "--masks.weighted=false",
        "--masks.mask_images=0",
        "--masks.teacher_mode=train",
        f"--data.root={seg_data}",
        "--data.kind=folder",
        "--data.size=64",
        "--data.batch_size=2",
        f"--run.out={out}",
        *TRAINER,
    ]
    code, _, err = run_cli([*args, "--trainer.max_steps=2"], capsys)
    assert code == 0, err
    teacher, _ = build("deeplabv3_resnet18", 7, weights=str(pipeline / "teacher.pt"))
    loaded = teacher.state_dict()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["maskd_teacher"]["sha256"] == state_fingerprint(teacher)
    prefix = "net.teacher."
    kept = {
        k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)
    }
    assert set(kept) == {name for name, _ in teacher.named_buffers()}
    assert any(not torch.equal(v, loaded[k]) for k, v in kept.items() if k.endswith("running_mean"))
    code, _, err = run_cli([*args, "--trainer.max_steps=3", "--run.resume=last"], capsys)
    assert code == 0, err
    assert json.loads((out / "done.json").read_text())["global_step"] == 3


def test_distill_checkpoint_and_student(pipeline):
    from maskd.models import build

    ckpt = torch.load(pipeline / "distill" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["maskd"]["job"] == "distill" and ckpt["global_step"] == 2
    teacher, _ = build("deeplabv3_resnet18", 7, weights=str(pipeline / "teacher.pt"))
    assert not [k for k in ckpt["state_dict"] if k.startswith("net.teacher.")]
    assert ckpt["maskd_teacher"]["sha256"] == state_fingerprint(teacher)  # teacher untouched
    student = torch.load(pipeline / "distill" / "model.pt", weights_only=True)
    for k, v in student.items():
        assert torch.equal(ckpt["state_dict"][f"net.student.{k}"], v), k
    csv = next((pipeline / "distill" / "csv").glob("version_*/metrics.csv")).read_text()
    assert "train/loss_maskd" in csv and "train/maskd/model.classifier.4" in csv


def _train_log(run: Path) -> list[dict[str, float]]:
    rows = next((run / "csv").glob("version_*/metrics.csv")).read_text().splitlines()
    head = rows[0].split(",")
    values = [dict(zip(head, r.split(","), strict=True)) for r in rows[1:]]
    return [{k: float(v) for k, v in r.items() if v} for r in values if r.get("train/loss")]


def test_distill_with_a_teacher_cache_logs_the_uncached_losses(pipeline, seg_data, capsys):
    """The pipeline's distill run again with the teacher's trunk cached: the same losses up
    to rounding, and its hits logged; a cache holding the recorded layer is refused."""
    args = [
        "distill",
        "--teacher.name=deeplabv3_resnet18",
        f"--teacher.weights={pipeline / 'teacher.pt'}",
        "--student.name=fcn_resnet18",
        f"--distill.tokens={pipeline / 'masks' / 'tokens.pt'}",
        "--distill.loss_weight=0.5",
        "--distill.eps=1e-5",
        f"--data.root={seg_data}",
        "--data.kind=folder",
        "--data.size=64",
        "--data.batch_size=2",
        "--trainer.max_steps=2",
        "--trainer.log_every_n_steps=1",
        *TRAINER,
    ]
    out = pipeline / "distill_cached"
    code, _, err = run_cli([*args, f"--run.out={out}", "--distill.teacher_cache=model"], capsys)
    assert code == 1 and "holds the teacher layers ['model.classifier.4']" in err, err
    code, _, err = run_cli(
        [*args, f"--run.out={out}", "--run.overwrite=true",
         "--distill.teacher_cache=model.backbone"], capsys,
    )  # fmt: skip
    assert code == 0, err
    plain, cached = _train_log(pipeline / "distill"), _train_log(out)
    assert len(plain) == len(cached) == 2
    for want, got in zip(plain, cached, strict=True):
        assert got["train/teacher_cache/hits"] == 0.0  # 2 steps of 2 of 6 images: all new
        for key in ("train/loss", "train/loss_maskd"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), key


def test_evaluate_matches_an_independent_miou(pipeline, seg_data, tmp_path, capsys):
    from maskd.data import build_dataset, build_transforms
    from maskd.models import build

    out = tmp_path / "m.json"
    code, stdout, _ = run_cli(
        [
            "evaluate",
            "--model.name=fcn_resnet18",
            f"--model.weights={pipeline / 'distill' / 'model.pt'}",
            f"--data.root={seg_data}",
            "--data.kind=folder",
            f"--out={out}",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
        ],
        capsys,
    )
    assert code == 0 and "miou" in stdout
    metrics = json.loads(out.read_text())
    model, _ = build("fcn_resnet18", 7, weights=str(pipeline / "distill" / "model.pt"))
    model.eval()
    val = build_dataset("folder", seg_data, "val", build_transforms("segmentation", False, None))
    conf = np.zeros((7, 7), dtype=np.int64)
    with torch.no_grad():
        for img, mask in val:
            pred = model(img[None]).argmax(1)[0]
            keep = mask != 255
            np.add.at(conf, (mask[keep].numpy(), pred[keep].numpy()), 1)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    assert metrics["miou"] == pytest.approx((inter[present] / union[present]).mean(), abs=1e-6)


def test_export_of_distilled_student_loads_into_registry_model(pipeline, tmp_path, capsys):
    from maskd.models import build

    out = tmp_path / "student.pt"
    code, stdout, _ = run_cli(
        [
            "export",
            "--checkpoint",
            pipeline / "distill" / "checkpoints" / "last.ckpt",
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0 and "fcn_resnet18" in stdout
    exported = torch.load(out, weights_only=True)
    student = torch.load(pipeline / "distill" / "model.pt", weights_only=True)
    # SegmentationTask's "model." prefix is gone: torchvision's layout
    assert set(exported) == {k.removeprefix("model.") for k in student}
    model, _ = build("fcn_resnet18", 7, weights=str(out))
    for k, v in student.items():
        assert torch.equal(model.state_dict()[k], v)


def test_visualize_writes_png(pipeline, seg_data, tmp_path, capsys):
    from PIL import Image

    images = sorted((seg_data / "val" / "images").glob("*.png"))[:2]
    out = tmp_path / "masks.png"
    code, stdout, err = run_cli(
        [
            "visualize",
            "--teacher.name=deeplabv3_resnet18",
            "--teacher.num_classes=7",
            f"--teacher.weights={pipeline / 'teacher' / 'model.pt'}",
            f"--tokens={pipeline / 'masks' / 'tokens.pt'}",
            "--normalize=true",
            "--images",
            json.dumps([str(p) for p in images]),
            f"--out={out}",
        ],
        capsys,
    )
    assert code == 0, err
    assert Image.open(out).size[0] > 100
    # one line per distilled level: each token's coverage (the pipeline's tokens: no head)
    (line,) = [ln for ln in stdout.splitlines() if " coverage " in ln]
    values = [float(v) for v in line.split("coverage")[1].split()]
    assert len(values) >= 1 and all(0.0 < v < 1.0 for v in values) and "weight" not in line


def test_resume_last_continues_and_refuses_silent_restart(pipeline, capsys):
    cfg = pipeline / "teacher.yaml"
    out = pipeline / "teacher"
    code, _, err = run_cli(["train", "--config", cfg, "--trainer.max_steps=3", *TRAINER], capsys)
    assert code == 1 and "--run.resume last" in err and len(err.strip().splitlines()) == 1
    code, _, _ = run_cli(
        ["train", "--config", cfg, "--trainer.max_steps=3", "--run.resume=last", *TRAINER], capsys
    )
    assert code == 0
    assert json.loads((out / "done.json").read_text())["global_step"] == 3


DISTILL = [
    "distill",
    "--student.name=fcn_resnet18",
    "--teacher.name=deeplabv3_resnet18",
    "--data.kind=folder",
    "--data.root=.",
]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--model.name=resnet_nope", "--data.root=."], "unknown model 'resnet_nope'"),
        (
            [
                "train",
                "--model.name=fcn_resnet18",
                "--data.kind=folder",
                "--data.root=/no/such/dir",
            ],
            "no such folder",
        ),
        (
            [
                "learn-masks",
                "--teacher.name=deeplabv3_resnet18",
                "--teacher.weights=/no/such.pt",
                "--data.kind=folder",
                "--data.root=.",
            ],
            "no such file",
        ),
        (["export", "--checkpoint=/no/such.ckpt", "--out=x.pt"], "no such file"),
        # the shorthand MasKD term reads distill.tokens, also beside a peer term
        ([*DISTILL, "--distill.tokens=/no/t.pt"], "distill.tokens: no such token file '/no/t.pt'"),
        (
            [*DISTILL, "--distill.tokens=/no/t.pt", '--distill.terms=[{"kind": "cwd"}]'],
            "set distill.tokens: null",
        ),
        (
            [
                *DISTILL,
                '--distill.terms=[{"kind": "cwd"}, {"kind": "maskd", "tokens": "/no/o.pt"}]',
            ],
            "distill.terms[1].tokens: no such token file '/no/o.pt'",
        ),
    ],
)
def test_config_errors_are_one_line(args, needle, capsys, seg_data):
    code, _, err = run_cli(args, capsys)
    assert code == 1
    assert needle in err and err.startswith("maskd: error:") and len(err.strip().splitlines()) == 1


def test_unknown_layer_is_one_line(pipeline, seg_data, capsys):
    code, _, err = run_cli(
        [
            "learn-masks",
            "--teacher.name=deeplabv3_resnet18",
            f"--teacher.weights={pipeline / 'teacher' / 'model.pt'}",
            '--masks.layers=["model.classifer.4"]',
            f"--data.root={seg_data}",
            "--data.kind=folder",
            "--data.size=64",
            f"--run.out={pipeline / 'bad'}",
            *TRAINER,
        ],
        capsys,
    )
    assert code == 1 and "unknown layer 'model.classifer.4'" in err and "model.classifier.4" in err
    assert len(err.strip().splitlines()) == 1


def test_bad_option_value_is_one_line(capsys):
    code, _, err = run_cli(["train", "--optim.name=rmsprop"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "optim.name" in err


def test_console_script_reports_errors_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("maskd")
    proc = subprocess.run(
        [
            str(exe),
            "export",
            "--checkpoint",
            str(tmp_path / "none.ckpt"),
            "--out",
            str(tmp_path / "x.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("maskd: error:")


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGE_COMMANDS = {
    "teacher.yaml": "train",
    "student.yaml": "train",
    "learn_masks.yaml": "learn-masks",
    "distill.yaml": "distill",
}


@pytest.mark.parametrize(
    "path",
    sorted(p for p in CONFIGS.rglob("*.yaml") if p.name in STAGE_COMMANDS),
    ids=lambda p: str(p.relative_to(CONFIGS)),
)
def test_shipped_configs_parse_and_name_registry_models(path, capsys):
    from maskd import models

    with pytest.raises(SystemExit) as exc:
        main([STAGE_COMMANDS[path.name], "--config", str(path), "--print_config"])
    assert exc.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    for group in ("model", "teacher", "student"):
        if group in cfg:
            models.get_spec(cfg[group]["name"])  # raises for unknown names
    if path.name == "distill.yaml":
        s, t = cfg["student"]["name"], cfg["teacher"]["name"]
        assert models.task_of(s) == models.task_of(t)


def test_resume_refuses_other_teacher_weights_then_resumes(pipeline, seg_data, capsys):
    from maskd.models import build

    teacher_pt = pipeline / "teacher.pt"
    teacher_state = build("deeplabv3_resnet18", 7, weights=str(teacher_pt))[0].state_dict()
    common = [
        f"--data.root={seg_data}",
        "--data.kind=folder",
        "--data.size=64",
        "--data.batch_size=2",
        "--student.name=fcn_resnet18",
        f"--distill.tokens={pipeline / 'masks' / 'tokens.pt'}",
        "--distill.loss_weight=0.5",
        "--distill.eps=1e-5",
        f"--run.out={pipeline / 'distill'}",
        "--teacher.name=deeplabv3_resnet18",
        "--trainer.max_steps=3",
        "--run.resume=last",
        *TRAINER,
    ]
    # Other teacher weights: refused with a one-line error, the run folder untouched.
    other = pipeline / "other_teacher.pt"
    changed = {k: v.clone() for k, v in teacher_state.items()}
    first = next(k for k, v in changed.items() if v.is_floating_point())
    changed[first] += 1.0
    torch.save(changed, other)
    before = sorted(p.name for p in (pipeline / "distill" / "checkpoints").iterdir())
    code, _, err = run_cli(["distill", f"--teacher.weights={other}", *common], capsys)
    assert code == 1 and "different teacher" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (pipeline / "distill" / "checkpoints").iterdir()) == before
    # a refused attempt writes nothing: the run's own options stay in config.yaml
    assert not (pipeline / "distill" / "config.1.yaml").exists()
    kept = yaml.safe_load((pipeline / "distill" / "config.yaml").read_text())
    assert kept["teacher"]["weights"] == str(teacher_pt)

    # The right teacher: the run resumes from step 2 and finishes step 3.
    code, _, err = run_cli(["distill", f"--teacher.weights={teacher_pt}", *common], capsys)
    assert code == 0, err
    assert json.loads((pipeline / "distill" / "done.json").read_text())["global_step"] == 3


def test_distill_aux_logits_with_reused_tokens(pipeline, seg_data, capsys):
    main_l, aux_l = "model.classifier.4", "model.aux_classifier.4"
    args = [
        "distill",
        "--teacher.name=deeplabv3_resnet18",
        f"--teacher.weights={pipeline / 'teacher.pt'}",
        "--student.name=fcn_resnet18",
        f"--distill.tokens={pipeline / 'masks' / 'tokens.pt'}",
        f"--distill.pairs={json.dumps({main_l: main_l, aux_l: aux_l})}",
        "--distill.loss_weight=0.5",
        "--distill.eps=1e-5",
        f"--data.root={seg_data}",
        "--data.kind=folder",
        "--data.size=64",
        "--data.batch_size=2",
        "--trainer.max_steps=1",
        "--trainer.log_every_n_steps=1",
        *TRAINER,
    ]
    out = pipeline / "distill_aux"
    code, _, err = run_cli([*args, f"--run.out={out}"], capsys)
    assert code == 1 and "not for ['model.aux_classifier.4']" in err, err
    assert "holds tokens for the teacher layer(s) ['model.classifier.4']" in err
    code, _, err = run_cli(
        [*args, f"--run.out={out}", f"--distill.reuse_tokens={json.dumps({'nope': main_l})}"],
        capsys,
    )
    assert code == 1 and "reuse_tokens names ['nope']" in err
    code, _, err = run_cli(
        [
            *args,
            f"--run.out={out}",
            "--run.overwrite=true",
            f"--distill.reuse_tokens={json.dumps({aux_l: main_l})}",
            f"--distill.layer_weights={json.dumps({aux_l: 0.4})}",
        ],
        capsys,
    )
    assert code == 0, err
    rows = next((out / "csv").glob("version_*/metrics.csv")).read_text().splitlines()
    head = rows[0].split(",")
    row = next(r.split(",") for r in rows[1:] if r.split(",")[head.index("train/loss_maskd")])
    value = {k: float(v) for k, v in zip(head, row, strict=True) if v and k.startswith("train/")}
    # one MasKD term per pair; the second takes the first's tokens and weighs its level 0.4
    main_loss, aux_loss = value["train/loss_maskd"], value["train/loss_maskd_2"]
    assert abs(main_loss - 0.5 * value[f"train/maskd/{main_l}"]) < 1e-5 * max(1.0, main_loss)
    expected = 0.5 * 0.4 * value[f"train/maskd_2/{aux_l}"]
    assert abs(aux_loss - expected) < 1e-5 * max(1.0, expected)


@pytest.mark.parametrize("pair", ["deeplabv3_r101_r18", "deeplabv3_r101_mobilenetv3"])
def test_cityscapes_distill_configs_distil_the_raw_logits(pair):
    """The authors' segmentation script has no align module (segmentation/train_maskd.py)."""
    from maskd.config_files import load_config

    cfg = load_config(CONFIGS / "cityscapes" / pair / "distill.yaml")
    terms = cfg["distill"]["terms"]
    assert terms and all(t["kind"] == "maskd" and t["align"] is False for t in terms)
    assert all(t[side].endswith("classifier.4") for t in terms for side in ("student", "teacher"))
