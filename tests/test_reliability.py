"""User mistakes with files get one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json

import pytest
import torch

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
    return {
        empty: "is empty (0 bytes)",
        truncated: "truncated or not a checkpoint",
        code: "not loaded for safety",
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
