"""User mistakes with files get one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskd.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    synth = ["data", "synth", "--out", str(root), "--task", "detection", "--train", "2"]
    assert main([*synth, "--val", "2", "--size", "64", "--preview", "0"]) == 0
    return root


def _train_args(data) -> list[str]:
    """One training step of a small detector on ``data``."""
    return [
        "train",
        "--model.name=fcos_resnet18_fpn",
        f"--model.options={json.dumps({'min_size': 64, 'max_size': 64})}",
        f"--data.root={data}",
        "--data.batch_size=2",
        "--trainer.max_steps=1",
        "--trainer.accelerator=cpu",
        "--trainer.progress_bar=false",
    ]


def _bad_files(tmp_path):
    from maskd.models import build

    model, _ = build("fcos_resnet18_fpn", num_classes=6, min_size=64, max_size=64)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": model.state_dict()}, good)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code = tmp_path / "code.ckpt"
    torch.save({"state_dict": {}, "hook": print}, code)  # a pickled callable
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"garbage\n")  # not a pickle at all: not called unsafe
    return {
        empty: "is empty (0 bytes)",
        truncated: "truncated or not a checkpoint",
        code: "(print), which are not loaded for safety",
        junk: "or not a",
    }


def test_bad_weight_files_give_one_line(data, tmp_path, capsys):
    for path, message in _bad_files(tmp_path).items():
        code = main(
            [
                "evaluate",
                "--model.name=fcos_resnet18_fpn",
                f"--model.options={json.dumps({'min_size': 64, 'max_size': 64})}",
                f"--model.weights={path}",
                f"--data.root={data}",
                "--trainer.accelerator=cpu",
            ]
        )
        err = capsys.readouterr().err
        assert code == 1, path
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_a_stage_one_checkpoint_as_model_weights_is_named(data, tmp_path, capsys):
    ckpt = tmp_path / "last.ckpt"
    meta = {"job": "learn-masks", "teacher": {"weights": "runs/teacher/model.pt"}}
    torch.save({"maskd": meta, "state_dict": {"net.tokens.0.weight": torch.zeros(1)}}, ckpt)
    code = main(
        [
            "evaluate",
            "--model.name=fcos_resnet18_fpn",
            f"--model.weights={ckpt}",
            f"--data.root={data}",
            "--trainer.accelerator=cpu",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "`maskd learn-masks` checkpoint" in err and "runs/teacher/model.pt" in err


def test_bad_resume_checkpoints_give_one_line(data, tmp_path, capsys):
    args = _train_args(data)
    for i, (path, message) in enumerate(_bad_files(tmp_path).items()):
        out = tmp_path / f"run{i}"
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "last.ckpt").write_bytes(path.read_bytes())
        code = main([*args, f"--run.out={out}", "--run.resume=last"])
        err = capsys.readouterr().err
        assert code == 1
        if "code" in path.name:  # a whole archive: Lightning opens it and refuses the callable
            message = "not loaded for safety"
        elif "truncated" in path.name:
            message = "truncated or not a torch checkpoint"
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_a_finished_run_without_checkpoints_is_not_overwritten(data, tmp_path, capsys):
    args = _train_args(data)
    out = tmp_path / "run"
    for name in ("done.json", "model.pt", "tokens.pt"):
        out.mkdir(exist_ok=True)
        (out / name).write_bytes(b"earlier output")
        for resume in ([], ["--run.resume=auto"]):
            code = main([*args, f"--run.out={out}", *resume])
            err = capsys.readouterr().err
            assert code == 1 and f"holds a run's outputs ({name})" in err, err
            assert (out / name).read_bytes() == b"earlier output"
        (out / name).unlink()


def test_evaluate_checks_its_output_path_first(data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out, message in (
        (blocker / "m.json", "cannot create the folder"),
        (tmp_path, "is a folder"),
    ):
        code = main(
            [
                "evaluate",
                "--model.name=fcos_resnet18_fpn",
                f"--model.options={json.dumps({'min_size': 64, 'max_size': 64})}",
                f"--data.root={data}",
                "--trainer.accelerator=cpu",
                f"--out={out}",
            ]
        )
        captured = capsys.readouterr()
        assert code == 1 and message in captured.err, captured.err
        assert "map" not in captured.out  # refused before evaluating anything


def _coco_copy(data, tmp_path, edit):
    """A copy of ``data`` whose training annotations went through ``edit``."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(data, root)
    ann = root / "annotations" / "instances_train.json"
    coco = json.loads(ann.read_text())
    edit(coco)
    ann.write_text(json.dumps(coco))
    return root


def _degenerate(coco):
    for a in coco["annotations"]:
        a["bbox"] = [a["bbox"][0], a["bbox"][1], 0, a["bbox"][3]]


def _outside(coco):
    for a in coco["annotations"]:
        a["bbox"] = [1000, 1000, 5, 5]


def _none(coco):
    coco["annotations"] = []


@pytest.mark.parametrize(
    "edit, reason",
    [(_degenerate, None), (_outside, "outside the image"), (_none, "0 boxes kept")],
)
def test_a_training_split_without_usable_boxes_is_refused(data, tmp_path, capsys, edit, reason):
    root = _coco_copy(data, tmp_path, edit)
    n = len(json.loads((data / "annotations" / "instances_train.json").read_text())["annotations"])
    if edit is _degenerate:
        reason = f"dropped ({n} of zero or negative size"
    out = tmp_path / "run"
    code = main([*_train_args(root), f"--run.out={out}"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "training split 'train'" in err and "no usable box" in err and reason in err, err
    assert not out.exists()  # refused before the run folder was made


def test_every_run_prints_the_data_summary(data, tmp_path, capsys):
    coco = json.loads((data / "annotations" / "instances_train.json").read_text())
    assert main([*_train_args(data), f"--run.out={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("data: train:"))
    assert f"{len(coco['images'])} images" in line
    assert f"{len(coco['annotations'])} boxes kept" in line
    assert "data: val:" in out


def test_segmentation_masks_without_a_labelled_pixel_are_refused(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    root = tmp_path / "seg"
    synth = ["data", "synth", "--out", str(root), "--task", "segmentation", "--train", "2"]
    assert main([*synth, "--val", "2", "--size", "32", "--preview", "0"]) == 0
    for mask in (root / "train" / "masks").glob("*.png"):
        Image.fromarray(np.full((32, 32), 255, np.uint8)).save(mask)
    code = main(
        ["train", "--model.name=lraspp_mobilenet_v3_large", f"--data.root={root}",
         "--data.kind=folder", "--data.size=32", "--trainer.max_steps=1",
         "--trainer.accelerator=cpu", f"--run.out={tmp_path / 'run'}"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "training split 'train'" in err and "no labelled pixel" in err, err


def _listing(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_resume_names_the_checkpoint_and_leaves_the_folder(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*_train_args(data), f"--run.out={out}", "--trainer.checkpoint_every_n_steps=1"]
    assert main(args) == 0
    (out / "done.json").unlink()  # as if stopped before the end
    (out / "model.pt").unlink()
    before = _listing(out)
    other = [a.replace("fcos_resnet18_fpn", "retinanet_resnet18_fpn") for a in args]
    capsys.readouterr()
    assert main([*other, "--run.resume=last"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 400, err
    assert "is a checkpoint of `maskd train` of fcos_resnet18_fpn" in err
    assert "this run is `maskd train` of retinanet_resnet18_fpn" in err
    assert _listing(out) == before  # no config rotation, no new log files


def test_bad_token_files_give_one_line_naming_the_problem(data, tmp_path, capsys):
    import argparse

    from maskd import ReceptiveTokens, save_tokens
    from maskd.data import synth
    from maskd.models import build

    classes = len(synth.classes("hard"))
    teacher, _ = build("fcos_resnet18_fpn", num_classes=classes, min_size=64, max_size=64)
    teacher_pt = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), teacher_pt)
    other = tmp_path / "other.pt"
    save_tokens(other, {"some.other.layer": [ReceptiveTokens(8, 2)]})
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"mask_token": torch.zeros(2, 8), "cfg": argparse.Namespace(a=1)}, unsafe)
    cases = {
        other: "holds tokens for the teacher layer(s) ['some.other.layer'], not for ['backbone.fpn']",
        empty: "is empty (0 bytes)",
        unsafe: "not loaded for safety",
    }
    for path, message in cases.items():
        code = main(
            [
                "distill",
                "--student.name=fcos_resnet18_fpn",
                "--teacher.name=fcos_resnet18_fpn",
                f"--student.options={json.dumps({'min_size': 64, 'max_size': 64})}",
                f"--teacher.options={json.dumps({'min_size': 64, 'max_size': 64})}",
                f"--teacher.weights={teacher_pt}",
                f"--distill.tokens={path}",
                f"--data.root={data}",
                "--trainer.max_steps=1",
                "--trainer.accelerator=cpu",
                f"--run.out={tmp_path / 'run'}",
            ]
        )
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and message in err, err
        assert "trusted=True" not in err and not err.rstrip().endswith(":"), err
        assert not (tmp_path / "run").exists()


def test_a_bug_keeps_its_traceback_while_user_errors_are_one_line(data, tmp_path, monkeypatch):
    import maskd.engine.jobs as jobs
    from maskd.errors import UserError, UserTypeError

    args = [*_train_args(data), f"--run.out={tmp_path / 'run'}"]
    for bug in (KeyError("state"), TypeError("unsupported operand"), RuntimeError("CUDA")):

        def broken(*a, bug=bug, **k):
            raise bug

        monkeypatch.setattr(jobs, "run_train", broken)
        with pytest.raises(type(bug)):
            main(args)
    # the user-error family is still caught by `except TypeError` in Python code
    assert issubclass(UserTypeError, TypeError) and issubclass(UserTypeError, UserError)


_LETTERS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
_BAD_OPTIONS = st.one_of(
    st.tuples(st.just("optim.lr"), st.floats(max_value=0.0) | st.sampled_from(["inf", "x"])),
    st.tuples(st.just("optim.momentum"), st.floats(min_value=1.0) | st.floats(max_value=-1e-9)),
    st.tuples(st.just("optim.weight_decay"), st.floats(max_value=-1e-9)),
    st.tuples(st.just("optim.warmup_factor"), st.floats(min_value=1.0 + 1e-9)),
    st.tuples(st.just("optim.warmup_steps"), st.integers(max_value=-1)),
    st.tuples(st.just("data.batch_size"), st.integers(max_value=0) | _LETTERS),
    st.tuples(st.just("data.size"), st.integers(max_value=0)),
    st.tuples(
        st.just("data.kind"),
        _LETTERS.filter(lambda s: s not in {"coco", "voc", "cityscapes", "folder"}),
    ),
    st.tuples(st.just("data.root"), _LETTERS.map(lambda s: f"/nonexistent/{s}")),
    st.tuples(st.just("trainer.max_steps"), st.integers(max_value=-2) | st.just(0)),
    st.tuples(st.just("trainer.accumulate_grad_batches"), st.integers(max_value=0)),
    st.tuples(st.just("trainer.gradient_clip_val"), st.floats(max_value=-1e-9)),
    st.tuples(st.just("trainer.checkpoint_every_n_steps"), st.integers(max_value=-1)),
    st.tuples(st.just("model.name"), _LETTERS),
    st.tuples(st.just("model.options"), _LETTERS.map(lambda k: json.dumps({f"x{k}": 1}))),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(bad=_BAD_OPTIONS)
def test_bad_option_values_always_give_one_line(data, tmp_path, capsys, bad):
    """Whatever bad value an option gets: exit 1 or 2, one line naming it, no run folder."""
    option, value = bad
    out = tmp_path / "fuzz"
    code = main([*_train_args(data), f"--run.out={out}", f"--{option}={value}"])
    err = capsys.readouterr().err
    assert code in (1, 2), (option, value, err)
    assert err.startswith("maskd: error:") and err.count("\n") == 1, (option, value, err)
    assert "Traceback" not in err
    assert not out.exists()


def test_library_warnings_are_one_line(capsys):
    """A library's warning (torch prints several) reads as one maskd line, not Python's
    two-line form with the library's source line."""
    import warnings

    from maskd.cli import show_warning

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show_warning
        warnings.warn_explicit(
            "The given buffer is not writable,\n  and PyTorch does not support it.",
            UserWarning,
            "/site-packages/torch/_utils.py",
            42,
        )
    err = capsys.readouterr().err
    assert err == (
        "maskd: warning: The given buffer is not writable, and PyTorch does not support it. "
        "(UserWarning, torch/_utils.py:42)\n"
    )


def test_a_run_folder_in_use_by_another_process_is_refused(data, tmp_path, capsys, monkeypatch):
    """Two jobs in one run folder would overwrite each other's checkpoints: the second is
    refused in one line, with exit status 75 (busy, not failed), and the folder is left as
    it was."""
    from maskd.engine.run_lock import RunLock

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    with RunLock(out):  # another process's job (flock conflicts across open descriptions)
        code = main([*_train_args(data), f"--run.out={out}", "--run.resume=auto"])
        err = capsys.readouterr().err
        assert code == 75 and err.count("\n") == 1, err
        assert "is in use by another maskd process" in err and str(out) in err
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
        monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP worker shares its launcher's job
        worker = RunLock(out)
        worker.acquire()
        worker.release()
    monkeypatch.delenv("LOCAL_RANK")
    with RunLock(out), RunLock(tmp_path / "missing"):  # released, so free again; no folder: no-op
        pass
