"""Initialising named parts of a model from a checkpoint (``init_from``): what is copied,
what is left alone, the per-part counts, and one clear line for every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import maskd.models as M
from maskd.engine.config import InitFrom, ModelArgs
from maskd.engine.jobs import build_model
from maskd.models.init_from import init_from_checkpoint
from maskd.torch_files import UnsafeFileError

SMALL = {"min_size": 64, "max_size": 64}
NAME = "retinanet_resnet18_fpn"
PARTS = {"backbone.fpn": "backbone.fpn", "head": "head"}


def _model(seed: int, num_classes: int = 3, **kwargs):
    torch.manual_seed(seed)
    return M.build(NAME, num_classes, **SMALL, **kwargs)[0]


def _under(key: str, prefixes) -> bool:
    return any(key.startswith(p + ".") for p in prefixes)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def teacher_file(tmp_path):
    source = _model(0)
    path = tmp_path / "teacher.pt"
    torch.save(source.state_dict(), path)
    return source, path


def test_mapped_parts_copied_others_untouched(teacher_file):
    source, path = teacher_file
    student = _model(1)
    before = _snapshot(student)
    counts = init_from_checkpoint(student, path, PARTS)
    src, after = source.state_dict(), student.state_dict()
    copied = [k for k in after if _under(k, PARTS)]
    assert copied and len(copied) < len(after)
    for key, value in after.items():
        if _under(key, PARTS):
            assert torch.equal(value, src[key]), key
        else:
            assert torch.equal(value, before[key]), key
    # the seeds differ, so the copy changed every mapped tensor that is not a zero init
    assert any(not torch.equal(before[k], src[k]) for k in copied)
    assert counts == {
        p: sum(1 for k in after if k.startswith(p + ".")) for p in ("backbone.fpn", "head")
    }


def test_renamed_prefix_and_file_prefix(tmp_path):
    """A checkpoint whose FPN is stored as ``net.neck.*`` (a Lightning module's keys)."""
    source = _model(0)
    state = {
        "net." + k.replace("backbone.fpn.", "neck.", 1): v for k, v in source.state_dict().items()
    }
    torch.save({"state_dict": state}, tmp_path / "renamed.pt")
    student = _model(1)
    counts = init_from_checkpoint(
        student, tmp_path / "renamed.pt", {"neck.": "backbone.fpn"}, file_prefix="net."
    )
    fpn = source.backbone.fpn.state_dict()
    assert counts == {"backbone.fpn": len(fpn)}
    for key, value in student.backbone.fpn.state_dict().items():
        assert torch.equal(value, fpn[key])
    assert not torch.equal(student.head.regression_head.bbox_reg.weight,
                           source.head.regression_head.bbox_reg.weight)  # fmt: skip


def test_job_reads_a_ckpt_by_its_prefix_and_reports_counts(tmp_path, capsys):
    """``build_model`` strips a maskd ``.ckpt``'s weights_prefix and prints one line per part."""
    source = _model(0)
    ckpt = tmp_path / "teacher.ckpt"
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in source.state_dict().items()},
            "maskd": {"weights_prefix": "net."},
        },
        ckpt,
    )
    args = ModelArgs(
        name=NAME, num_classes=3, options=dict(SMALL), init_from=InitFrom(str(ckpt), PARTS)
    )
    torch.manual_seed(1)
    model, _, _ = build_model(args, 3)
    assert torch.equal(
        model.head.classification_head.cls_logits.weight,
        source.head.classification_head.cls_logits.weight,
    )
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("init_from:")]
    n_fpn, n_head = len(source.backbone.fpn.state_dict()), len(source.head.state_dict())
    assert len(lines) == 2
    assert "backbone.fpn" in lines[0] and lines[0].endswith(f": {n_fpn} tensors")
    assert "head" in lines[1] and lines[1].endswith(f": {n_head} tensors")


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"init_from\.path: no such file") as err:
        init_from_checkpoint(_model(1), tmp_path / "none.pt", PARTS)
    _one_line_error(err)
    args = ModelArgs(name=NAME, init_from=InitFrom(str(tmp_path / "none.pt"), PARTS))
    with pytest.raises(FileNotFoundError, match=r"init_from\.path: no such file"):
        build_model(args, 3)


@pytest.mark.parametrize(
    ("prefixes", "match"),
    [
        ({"neck": "backbone.fpn"}, r"no key starts with the prefix 'neck'.*backbone, head"),
        ({"head": "hed"}, r"'head' -> 'hed'.* has no module 'hed'; did you mean 'head'"),
        (
            {"backbone": "backbone", "backbone.fpn": "backbone.fpn"},
            "'backbone' and 'backbone.fpn' overlap",
        ),
        ({}, "non-empty mapping"),
    ],
)
def test_bad_prefixes(teacher_file, prefixes, match):
    _, path = teacher_file
    student = _model(1)
    before = _snapshot(student)
    with pytest.raises((ValueError, TypeError), match=match) as err:
        init_from_checkpoint(student, path, prefixes)
    _one_line_error(err)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_shape_mismatch_names_the_key_and_copies_nothing(tmp_path):
    source = _model(0, num_classes=5)  # another class count: the class logits differ
    torch.save(source.state_dict(), tmp_path / "k5.pt")
    student = _model(1)
    before = _snapshot(student)
    with pytest.raises(ValueError, match="shape mismatch") as err:
        init_from_checkpoint(student, tmp_path / "k5.pt", PARTS)
    message = _one_line_error(err)
    assert "'head' -> 'head'" in message
    assert "head.classification_head.cls_logits.weight [54, 256, 3, 3]" in message
    assert "[36, 256, 3, 3]" in message
    # the FPN part matched, but nothing is copied unless every part does
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_p6_from_c5_teacher_into_p5_student(tmp_path):
    """A teacher with P6 on C5 and a student with P6 on P5: P6's input channels differ."""
    torch.save(_model(0, extra_levels_from="c5").state_dict(), tmp_path / "c5.pt")
    with pytest.raises(ValueError, match=r"backbone\.fpn\.extra_blocks\.p6\.weight"):
        init_from_checkpoint(_model(1), tmp_path / "c5.pt", PARTS)


def test_missing_and_unexpected_tensors(tmp_path):
    state = _model(0).state_dict()
    gone = "head.regression_head.bbox_reg.bias"
    torch.save({k: v for k, v in state.items() if k != gone}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match=f"no tensor for the model's '{gone}'") as err:
        init_from_checkpoint(_model(1), tmp_path / "short.pt", PARTS)
    _one_line_error(err)
    torch.save({**state, "head.extra.weight": torch.zeros(1)}, tmp_path / "long.pt")
    with pytest.raises(ValueError, match="no place for the file's 'head.extra.weight'") as err:
        init_from_checkpoint(_model(1), tmp_path / "long.pt", PARTS)
    _one_line_error(err)


def test_unsafe_file_is_refused_unread(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "unsafe.pt"
    torch.save({"head.x": Payload()}, path)
    with pytest.raises(UnsafeFileError, match=r"init_from\.path: .*not loaded for safety") as err:
        init_from_checkpoint(_model(1), path, PARTS)
    _one_line_error(err)


def test_retinanet_recipe_parts_fit():
    """configs/coco/retinanet_r101_r50: the student's init_from parts match the teacher's
    tensors name for name and shape for shape, and every stage builds the teacher alike."""
    from maskd.config_files import load_config

    root = Path(__file__).resolve().parents[1] / "configs" / "coco" / "retinanet_r101_r50"
    cfg = {n: load_config(root / f"{n}.yaml") for n in ("teacher", "learn_masks", "distill")}
    teacher_opts = cfg["teacher"]["model"]["options"]
    assert cfg["learn_masks"]["teacher"]["options"] == teacher_opts
    assert cfg["distill"]["teacher"]["options"] == teacher_opts
    student, teacher = cfg["distill"]["student"], cfg["distill"]["teacher"]
    init = student["init_from"]
    assert init["path"] == teacher["weights"] == cfg["learn_masks"]["teacher"]["weights"]
    with torch.device("meta"):
        s_state = M.build(student["name"], 80, **student["options"])[0].state_dict()
        t_state = M.build(teacher["name"], 80, **teacher["options"])[0].state_dict()
    for src, dst in init["prefixes"].items():
        s_part = {k[len(dst) :]: v.shape for k, v in s_state.items() if k.startswith(dst + ".")}
        t_part = {k[len(src) :]: v.shape for k, v in t_state.items() if k.startswith(src + ".")}
        assert s_part and s_part == t_part, (src, dst)
