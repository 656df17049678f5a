"""``trainer.channels_last``: every model runs in NHWC layout, with the default layout's values
up to rounding, and hands its weights back in the default layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskd import Distiller, ReceptiveTokens
from maskd.engine.callbacks import ChannelsLast
from maskd.engine.datamodule import MaskdDataModule
from maskd.engine.modules import DistillModule, TrainModule, state_fingerprint
from maskd.engine.optim import OptimSpec
from maskd.engine.trainer import TrainerSpec, build_trainer
from test_engine import PixelAccuracy, RandomSegData

NHWC = torch.channels_last


class Seg(nn.Module):
    """Conv + BatchNorm segmenter that records the layout of what its layers see and make."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
        )  # fmt: skip
        self.head = nn.Conv2d(width, 3, 1)
        self.layouts: list[tuple[bool, bool]] = []  # (weight NHWC, features NHWC) per call

    def forward(self, images, targets=None):
        feats = self.body(images)
        weight = self.body[0].weight
        self.layouts.append(
            (weight.is_contiguous(memory_format=NHWC), feats.is_contiguous(memory_format=NHWC))
        )
        logits = self.head(torch.relu(feats))
        if self.training:
            return {"loss_ce": F.cross_entropy(logits, targets)}
        return logits


def spec(channels_last: bool, **kw) -> TrainerSpec:
    return TrainerSpec(
        max_steps=3, accelerator="cpu", devices=1, progress_bar=False, val_every_n_epochs=0,
        log_every_n_steps=1, deterministic=True, channels_last=channels_last, **kw,
    )  # fmt: skip


def data() -> MaskdDataModule:
    return MaskdDataModule(RandomSegData(12, size=16), RandomSegData(4, size=16), batch_size=4,
                           seed=1)  # fmt: skip


def train(tmp_path, channels_last: bool) -> Seg:
    torch.manual_seed(0)
    model = Seg()
    optim = OptimSpec(name="sgd", lr=0.1, momentum=0.9, schedule="constant")
    module = TrainModule(model, "segmentation", 3, optim=optim, metrics_factory=PixelAccuracy)
    build_trainer(spec(channels_last), tmp_path).fit(module, datamodule=data())
    return model


def test_training_runs_in_nhwc_and_matches_the_default_layout(tmp_path) -> None:
    plain = train(tmp_path / "plain", channels_last=False)
    nhwc = train(tmp_path / "nhwc", channels_last=True)
    assert plain.layouts and not any(w or f for w, f in plain.layouts)
    assert nhwc.layouts and all(w and f for w, f in nhwc.layouts)
    # the trained weights agree up to rounding and come back in the default layout
    for (name, p), q in zip(plain.state_dict().items(), nhwc.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
        assert q.is_contiguous(), name
    # and the three steps did train: the weights moved from their initial values
    torch.manual_seed(0)
    assert not torch.allclose(Seg().head.weight, nhwc.head.weight)


def distill_module(
    num_tokens: int = 3, teacher_cache: str | None = None
) -> tuple[DistillModule, Seg, Seg]:
    torch.manual_seed(0)
    teacher, student = Seg(width=16), Seg(width=8)
    tokens = {"body": [ReceptiveTokens(16, num_tokens, weighted=True)]}
    terms = [{"kind": "maskd", "student": "body", "teacher": "body", "tokens": tokens,
              "weight": 1.0}]  # fmt: skip
    distiller = Distiller(
        student, teacher, terms, example_input=torch.rand(2, 3, 16, 16), teacher_cache=teacher_cache
    )
    optim = OptimSpec(name="sgd", lr=0.1, momentum=0.9, schedule="constant")
    module = DistillModule(distiller, "segmentation", 3, optim=optim, seed=3,
                           metrics_factory=PixelAccuracy)  # fmt: skip
    return module, student, teacher


def test_a_distilled_student_matches_the_default_layout_and_resumes_exactly(tmp_path) -> None:
    runs = {}
    for name, nhwc in (("plain", False), ("nhwc", True)):
        module, student, teacher = distill_module()
        before = state_fingerprint(teacher)
        seen: list[bool] = []  # the teacher stops at the tapped layer: a hook sees its output
        teacher.body[0].register_forward_hook(
            lambda m, i, out, seen=seen: seen.append(out.is_contiguous(memory_format=NHWC))
        )
        trainer = build_trainer(spec(nhwc, checkpoint_every_n_steps=1), tmp_path / name)
        trainer.fit(module, datamodule=data())
        assert seen and all(f == nhwc for f in seen), "the teacher runs in the same layout"
        assert state_fingerprint(teacher) == before  # frozen; the hash ignores the layout
        runs[name] = student
    for (key, p), q in zip(
        runs["plain"].state_dict().items(), runs["nhwc"].state_dict().values(), strict=True
    ):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=key)
    # a channels-last checkpoint resumes to the uninterrupted run's weights exactly
    ckpt = tmp_path / "nhwc" / "checkpoints" / "last.ckpt"
    step2 = tmp_path / "step2.ckpt"
    module, _, _ = distill_module()
    cut = spec(True, checkpoint_every_n_steps=1)
    cut.max_steps = 2
    build_trainer(cut, tmp_path / "cut").fit(module, datamodule=data())
    (tmp_path / "cut" / "checkpoints" / "last.ckpt").rename(step2)
    assert torch.load(step2, weights_only=False)["global_step"] == 2
    module, student, _ = distill_module()
    trainer = build_trainer(spec(True, checkpoint_every_n_steps=1), tmp_path / "resumed")
    trainer.fit(module, datamodule=data(), ckpt_path=str(step2))
    assert trainer.global_step == 3 and ckpt.is_file()
    for (key, p), q in zip(
        runs["nhwc"].state_dict().items(), student.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), key


def test_evaluation_runs_in_nhwc_too(tmp_path) -> None:
    trainer = build_trainer(spec(True), tmp_path, evaluation_only=True)
    assert any(isinstance(c, ChannelsLast) for c in trainer.callbacks)
    off = build_trainer(spec(False), tmp_path)
    assert not any(isinstance(c, ChannelsLast) for c in off.callbacks)


def test_channels_last_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="trainer.channels_last must be true or false"):
        spec("yes")  # type: ignore[arg-type]
