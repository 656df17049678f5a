"""Engine tests: schedules, samplers, atomic checkpoints, exact resume, module plumbing.

A tiny conv segmenter (dropout + random flips, so resume has randomness to get right)
stands in for a task model; it follows the task-model contract.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import Dataset

from maskd.engine.checkpoint import AtomicCheckpointIO, atomic_save
from maskd.engine.datamodule import MaskdDataModule
from maskd.engine.modules import DistillModule, TrainModule
from maskd.engine.optim import OptimSpec, build_optimizer, build_scheduler, lr_factor
from maskd.engine.sampling import ResumableSampler, SeededDataset, ShardedSampler
from maskd.engine.trainer import TrainerSpec, build_trainer


class TinySeg(nn.Module):
    """Conv segmenter following the task-model contract (no BatchNorm)."""

    def __init__(self, num_classes: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
        )
        self.drop = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(8, num_classes, 1)

    def forward(self, images, targets=None):
        logits = self.head(self.drop(torch.relu(self.body(images))))
        if self.training:
            return {"loss_ce": F.cross_entropy(logits, targets, ignore_index=255)}
        return logits


class RandomSegData(Dataset):
    """Deterministic images whose class is a colour threshold; optional random h-flip."""

    def __init__(self, n: int = 12, size: int = 16, flip: bool = False) -> None:
        g = torch.Generator().manual_seed(123)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.masks = (self.images[:, 0] * 3).long().clamp(max=2)
        self.flip = flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        img, mask = self.images[i], self.masks[i]
        if self.flip and torch.rand(()) < 0.5:
            img, mask = img.flip(-1), mask.flip(-1)
        return img, mask


class PixelAccuracy(nn.Module):
    """Minimal metric with the maskd.metrics interface (update / compute / reset)."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.correct, self.total = 0, 0

    def update(self, preds, targets) -> None:
        self.correct += int((preds.argmax(1) == targets).sum())
        self.total += targets.numel()

    def compute(self) -> dict[str, float]:
        return {"acc": self.correct / max(self.total, 1)}


def tiny_trainer(run_dir, max_steps, **kw):
    spec = TrainerSpec(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        progress_bar=False,
        val_every_n_epochs=0,
        log_every_n_steps=1,
        deterministic=True,
        **{k: v for k, v in kw.items() if k in TrainerSpec.__dataclass_fields__},
    )
    return build_trainer(spec, run_dir, callbacks=kw.get("callbacks"))


# ---- schedules --------------------------------------------------------------------


def test_lr_factor_matches_formulas():
    cos = OptimSpec(lr=0.1, schedule="cosine", min_lr=1e-3, warmup_steps=10, warmup_factor=0.01)
    for step in (0, 5, 10, 50, 99):
        a = step / 10
        warm = 0.01 * (1 - a) + a if step < 10 else 1.0
        floor = 1e-3 / 0.1
        want = (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / 100))) * warm
        assert lr_factor(step, 100, cos) == pytest.approx(want, rel=1e-12)
    step_spec = OptimSpec(schedule="step", milestones=[0.5, 80], gamma=0.1)
    assert [lr_factor(s, 100, step_spec) for s in (49, 50, 79, 80)] == pytest.approx(
        [1.0, 0.1, 0.1, 0.01]
    )
    poly = OptimSpec(schedule="poly", power=0.9)
    assert lr_factor(30, 100, poly) == pytest.approx(0.7**0.9)
    floored = OptimSpec(lr=0.02, min_lr=1e-4, schedule="poly", power=0.9)
    assert 0.02 * lr_factor(30, 100, floored) == pytest.approx(1e-4 + (0.02 - 1e-4) * 0.7**0.9)
    assert 0.02 * lr_factor(100, 100, floored) == pytest.approx(1e-4)


def test_constant_warmup_is_mmcvs():
    """mmcv's warmup='constant': regular lr x warmup_ratio for the first warmup_iters."""
    spec = OptimSpec(lr=0.01, schedule="step", milestones=[16_000, 22_000], gamma=0.1,
                     warmup="constant", warmup_steps=500, warmup_factor=1 / 3)  # fmt: skip
    assert [lr_factor(s, 24_000, spec) for s in (0, 250, 499)] == pytest.approx([1 / 3] * 3)
    assert lr_factor(500, 24_000, spec) == 1.0
    with pytest.raises(ValueError, match=r"optim\.warmup: 'cosine' is not one of"):
        OptimSpec(warmup="cosine")


def test_optimizer_skips_frozen_and_applies_bias_multiplier():
    model = TinySeg()
    model.body.requires_grad_(False)
    spec = OptimSpec(
        name="sgd", lr=0.1, weight_decay=1e-4, bias_lr_mult=2.0, bias_weight_decay=False
    )
    opt = build_optimizer(model.named_parameters(), spec, model)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(model.head.weight), id(model.head.bias)}
    by_lr = {g["lr"]: g for g in opt.param_groups}
    assert by_lr[0.2]["params"][0] is model.head.bias and by_lr[0.2]["weight_decay"] == 0.0
    sched = build_scheduler(opt, OptimSpec(lr=0.1, schedule="poly", power=1.0), 10)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(frozen.named_parameters(), spec, frozen)


class _Mixed(nn.Module):
    """Conv, BatchNorm, depth-wise conv, GroupNorm, LayerNorm and Linear, nested one level."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.GroupNorm(2, 4))
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)


def test_param_groups_follow_mmcv_default_constructor():
    """mmcv's DefaultOptimizerConstructor with bias_lr_mult=2, bias_decay_mult=0 (FCOS):
    conv/linear biases at 2x lr and no decay; norm layers' weights and biases at the base lr
    and decay; a depth-wise conv's bias at 2x lr but with decay (dwconv_decay_mult=1)."""
    model = _Mixed()
    lr, wd = 0.1, 1e-4
    spec = OptimSpec(lr=lr, weight_decay=wd, bias_lr_mult=2.0, bias_weight_decay=False)
    base, bias, dw_bias = (lr, wd), (2 * lr, 0.0), (2 * lr, wd)
    expected = {
        "conv.weight": base, "conv.bias": bias,
        "bn.weight": base, "bn.bias": base,
        "block.0.weight": base, "block.0.bias": dw_bias,
        "block.1.weight": base, "block.1.bias": base,
        "ln.weight": base, "ln.bias": base,
        "fc.weight": base, "fc.bias": bias,
    }  # fmt: skip
    opt = build_optimizer(model.named_parameters(), spec, model)
    got = {
        name: (g["lr"], g["weight_decay"])
        for g in opt.param_groups
        for p in g["params"]
        for name, q in model.named_parameters()
        if q is p
    }
    assert got == expected
    # weights come first; equal settings share a group
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [base, bias, base, dw_bias]
    assert all(not n.endswith("bias") for n in _names(model, opt.param_groups[0]["params"]))

    # default settings: every parameter at the base lr and decay, in two groups (weights,
    # biases) as earlier versions, so their optimizer states still resume
    opt = build_optimizer(model.named_parameters(), OptimSpec(lr=lr, weight_decay=wd), model)
    assert [len(g["params"]) for g in opt.param_groups] == [6, 6]
    assert {(g["lr"], g["weight_decay"]) for g in opt.param_groups} == {base}
    assert _names(model, opt.param_groups[1]["params"]) == [
        n for n, _ in model.named_parameters() if n.endswith("bias")
    ]


def _names(model: nn.Module, params: list) -> list[str]:
    ids = {id(p) for p in params}
    return [n for n, p in model.named_parameters() if id(p) in ids]


# ---- samplers ---------------------------------------------------------------------


def test_sampler_shards_form_the_single_process_permutation_and_skip():
    single = [i for _, i in ResumableSampler(10, seed=3)]
    assert sorted(single) == list(range(10))
    ranks = [[i for _, i in ResumableSampler(10, seed=3, rank=r, world_size=2)] for r in (0, 1)]
    interleaved = [x for pair in zip(*ranks, strict=True) for x in pair]
    assert interleaved == single
    s = ResumableSampler(10, seed=3)
    s.set_epoch(1)
    epoch1 = [i for _, i in s]
    assert epoch1 != single
    s.skip(1, 4)
    assert [i for _, i in s] == epoch1[4:]
    assert [i for _, i in s] == epoch1  # the skip applies once
    assert list(ShardedSampler(5, 1, 2)) == [1, 3]


def test_seeded_dataset_is_independent_of_global_rng():
    ds = SeededDataset(RandomSegData(4, flip=True), seed=1)
    torch.manual_seed(0)
    a = [ds[(e, i)][0] for e in range(3) for i in range(4)]
    torch.manual_seed(99)
    b = [ds[(e, i)][0] for e in range(3) for i in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # some samples flip in some epochs and not others: the seed includes the epoch
    assert any(not torch.equal(ds[(0, i)][0], ds[(1, i)][0]) for i in range(4))


# ---- atomic checkpoints -----------------------------------------------------------


def test_crash_mid_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(10)  # half-written file, then the process "dies"
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # no temp file left behind
    atomic_save({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_save({"a": 1}, tmp_path / "model.pt")
        (tmp_path / "plain").write_text("x")
        os.umask(0o002)
        atomic_save({"a": 1}, tmp_path / "group.pt")
    finally:
        os.umask(old)
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("model.pt") == mode("plain") == 0o644
    assert mode("group.pt") == 0o664


def test_stale_temporaries_of_a_killed_write_are_removed_on_start(tmp_path):
    from maskd.atomic import remove_stale_temporaries

    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / "checkpoints" / ".last.ckpt.k3j2.tmp", tmp_path / ".model.pt.x9.tmp"]
    keep = [tmp_path / "notes.tmp", tmp_path / ".other.pt.x9.tmp", tmp_path / "model.pt"]
    for path in stale + keep:
        path.write_bytes(b"0" * 10)
    removed = remove_stale_temporaries(tmp_path, ("model.pt", "tokens.pt"))
    removed += remove_stale_temporaries(tmp_path / "checkpoints", ("last.ckpt",))
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    # a run started in that folder removes them too
    from maskd.engine.jobs import RunArgs, _fit_and_finish

    stale[0].write_bytes(b"0")
    (tmp_path / "model.pt").unlink()  # an earlier run's output: the run would refuse to start
    module = TrainModule(TinySeg(), "segmentation", 3, metrics_factory=PixelAccuracy)
    data = MaskdDataModule(RandomSegData(4), RandomSegData(2), batch_size=2)
    spec = TrainerSpec(max_steps=1, accelerator="cpu", progress_bar=False, val_every_n_epochs=0)
    _fit_and_finish(module, data, spec, RunArgs(out=str(tmp_path), validate=False), None, None)
    assert not stale[0].exists() and (tmp_path / "done.json").is_file()


# ---- training and exact resume ----------------------------------------------------


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def tiny_seg_run(warmup_steps: int) -> tuple[TinySeg, TrainModule, MaskdDataModule]:
    """The seeded model, module and data every exact-resume test trains (5 batches/epoch)."""
    torch.manual_seed(0)
    model = TinySeg(dropout=0.3)
    optim = OptimSpec(
        name="sgd", lr=0.2, momentum=0.9, schedule="cosine", warmup_steps=warmup_steps
    )
    module = TrainModule(
        model, "segmentation", 3, optim=optim, seed=7, metrics_factory=PixelAccuracy
    )
    data = MaskdDataModule(RandomSegData(10, flip=True), RandomSegData(4), batch_size=2, seed=5)
    return model, module, data


def _fit(run_dir: Path, max_steps: int, resume=None, crash_at=None, accumulate=1):
    model, module, data = tiny_seg_run(warmup_steps=3)
    callbacks = [CrashAt(crash_at)] if crash_at is not None else []
    trainer = tiny_trainer(
        run_dir,
        max_steps,
        checkpoint_every_n_steps=2,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    return model, trainer


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_equals_uninterrupted_run(tmp_path, accumulate):
    # 5 batches per epoch; 7 steps cross an epoch boundary, the crash happens mid-epoch.
    steps = 7 if accumulate == 1 else 4
    straight, _ = _fit(tmp_path / "a", steps, accumulate=accumulate)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "b", steps, crash_at=steps // 2 + 1, accumulate=accumulate)
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] < steps
    resumed, trainer = _fit(tmp_path / "b", steps, resume=str(ckpt), accumulate=accumulate)
    assert trainer.global_step == steps
    for (name, p), q in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name
    # and training did move the weights
    assert not torch.equal(TinySeg().head.weight, straight.head.weight)


def test_training_logs_losses_lr_and_metrics(tmp_path):
    torch.manual_seed(0)
    module = TrainModule(
        TinySeg(), "segmentation", 3, optim=OptimSpec(lr=0.05), metrics_factory=PixelAccuracy
    )
    data = MaskdDataModule(RandomSegData(8), RandomSegData(4), batch_size=2)
    spec = TrainerSpec(
        max_steps=4,
        accelerator="cpu",
        devices=1,
        progress_bar=False,
        log_every_n_steps=1,
        val_every_n_epochs=1,
    )
    trainer = build_trainer(spec, tmp_path)
    trainer.fit(module, datamodule=data)
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    # independent computation of the validation accuracy
    model = module.model.eval()
    val = RandomSegData(4)
    with torch.no_grad():
        pred = model(val.images).argmax(1)
    assert metrics["val/acc"] == pytest.approx((pred == val.masks).float().mean().item())
    csv = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    for key in ("train/loss_ce", "train/loss", "lr-SGD", "val/acc"):
        assert key in csv
    assert any((tmp_path / "tensorboard").iterdir())


class FakeDistiller(nn.Module):
    """Shape of a Distiller for optimizer-plumbing tests: student + align train, teacher not."""

    def __init__(self) -> None:
        super().__init__()
        self.student, self.teacher = TinySeg(), TinySeg()
        self.align = nn.Conv2d(8, 8, 1)
        self.teacher.requires_grad_(True)  # even if someone re-enables it, it must stay out


def test_distill_module_never_optimizes_teacher():
    d = FakeDistiller()
    module = DistillModule(d, "segmentation", 3, metrics_factory=PixelAccuracy)
    names = {n for n, _ in module.trainable_parameters()}
    assert names and all(n.startswith(("student.", "align.")) for n in names)
    assert {"align.weight", "student.head.weight"} <= names
    assert module.eval_model() is d.student


def test_non_finite_loss_stops_training_with_a_clear_error(tmp_path):
    class Exploding(TinySeg):
        def forward(self, images, targets=None):
            out = super().forward(images, targets)
            if self.training:
                out["loss_bad"] = torch.tensor(float("nan"))
            return out

    module = TrainModule(Exploding(), "segmentation", 3, metrics_factory=PixelAccuracy)
    data = MaskdDataModule(RandomSegData(4), RandomSegData(2), batch_size=2)
    with pytest.raises(FloatingPointError, match="loss_bad=nan"):
        tiny_trainer(tmp_path, 2).fit(module, datamodule=data)


def test_token_masks_and_grid_match_a_direct_computation():
    from maskd.tokens import ReceptiveTokens
    from maskd.visualize import mask_grid, token_masks

    torch.manual_seed(0)
    model = TinySeg()
    tok = ReceptiveTokens(8, num_tokens=3)
    with torch.no_grad():
        tok.mask_token.normal_(0, 1.0)
    images = [torch.rand(3, 16, 16) for _ in range(2)]
    masks = token_masks(model, {"body": [tok]}, images)
    assert list(masks) == ["body"]
    feats = model.body(torch.stack(images))  # [2, 8, 16, 16]
    want = torch.sigmoid(torch.einsum("tc,nchw->nthw", tok.mask_token, feats))
    for i in range(2):
        torch.testing.assert_close(masks["body"][i], want[i].detach())
    black = [torch.zeros(3, 16, 16)] * 2
    grid = mask_grid(black, masks["body"], alpha=1.0)
    assert grid.shape == (2 * 16, 4 * 16, 3) and grid.dtype.name == "uint8"
    # over a black image with alpha 1, token t's tile has the mask as its red channel
    red = torch.from_numpy(grid[:16, 16:32, 0].astype("float32")) / 255
    torch.testing.assert_close(red, want[0, 0].detach(), atol=1 / 255, rtol=0)


def test_token_summary_gives_coverage_and_head_weights():
    """Coverage is each token's mean mask, the weights the head's softmax: set to values
    known here (a head whose 1x1 conv is all bias gives softmax(bias) on every image)."""
    from maskd.tokens import ReceptiveTokens
    from maskd.visualize import summary_lines, token_summary

    torch.manual_seed(0)
    model = TinySeg()
    plain = ReceptiveTokens(8, num_tokens=3)
    head = ReceptiveTokens(8, num_tokens=3, weighted=True)
    with torch.no_grad():
        plain.mask_token.normal_(0, 1.0)
        head.mask_token.zero_()  # sigmoid(0): every mask is 0.5 everywhere
        head.prob[2].weight.zero_()
        head.prob[2].bias.copy_(torch.tensor([0.0, math.log(3.0), 0.0]))
    images = [torch.rand(3, 16, 16) for _ in range(2)]
    feats = model.body(torch.stack(images))
    want = torch.sigmoid(torch.einsum("tc,nchw->nthw", plain.mask_token, feats)).mean((0, 2, 3))
    got = token_summary(model, {"body": [plain]}, images)["body"]
    torch.testing.assert_close(torch.tensor(got["coverage"]), want)
    assert got["weight"] is None
    got = token_summary(model, {"body": [head]}, images)["body"]
    torch.testing.assert_close(torch.tensor(got["coverage"]), torch.full((3,), 0.5))
    torch.testing.assert_close(torch.tensor(got["weight"]), torch.tensor([0.2, 0.6, 0.2]))
    (line,) = summary_lines({"body": got})
    assert line == "body  coverage 0.50 0.50 0.50  weight 0.20 0.60 0.20"


def test_token_summary_of_a_detector_counts_only_positions_over_the_image():
    """A detector pads 64x80 images to 64x96: P3 is 8x12, of which 8x10 lie over the image."""
    from maskd.tokens import ReceptiveTokens
    from maskd.visualize import token_summary
    from tiny_detectors import detection_batch, detector

    model = detector("fcos").eval()
    images, _ = detection_batch()
    torch.manual_seed(1)
    toks = [ReceptiveTokens(256, num_tokens=2) for _ in range(5)]
    for tok in toks:
        with torch.no_grad():
            tok.mask_token.normal_(0, 0.2)
    got = token_summary(model, {"backbone.fpn": toks}, images)
    with torch.no_grad():
        batch, _ = model.transform(images)
        p3 = model.backbone(batch.tensors)["0"]
    assert p3.shape[-2:] == (8, 12)
    want = toks[0](p3)[..., :8, :10].mean((0, 2, 3))
    torch.testing.assert_close(torch.tensor(got["backbone.fpn:0"]["coverage"]), want)
    assert list(got) == [f"backbone.fpn:{k}" for k in ("0", "1", "2", "p6", "p7")]


def _params_after(tmp_path, batch_size, accumulate, precision="32-true", model=None):
    torch.manual_seed(0)
    model = model or TinySeg()
    optim = OptimSpec(name="sgd", lr=0.3, momentum=0.9, schedule="constant")
    module = TrainModule(model, "segmentation", 3, optim=optim, metrics_factory=PixelAccuracy)
    data = MaskdDataModule(RandomSegData(16), RandomSegData(2), batch_size=batch_size, seed=1)
    spec = TrainerSpec(
        max_steps=3,
        accelerator="cpu",
        devices=1,
        progress_bar=False,
        val_every_n_epochs=0,
        accumulate_grad_batches=accumulate,
        precision=precision,
    )
    build_trainer(spec, tmp_path).fit(module, datamodule=data)
    return model


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    big = _params_after(tmp_path / "a", batch_size=4, accumulate=1)
    acc = _params_after(tmp_path / "b", batch_size=2, accumulate=2)
    for (name, p), q in zip(big.state_dict().items(), acc.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_precision_flag_runs_the_forward_under_autocast(tmp_path):
    """Training steps run under bfloat16 autocast; evaluation in full precision, its
    predictions float32."""
    train_states, eval_states, eval_dtypes = [], [], []

    class Recording(TinySeg):
        def forward(self, images, targets=None):
            state = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
            (train_states if self.training else eval_states).append(state)
            out = super().forward(images, targets)
            if not self.training:
                eval_dtypes.append(out.dtype)
            return out

    model = _params_after(tmp_path, 2, 1, precision="bf16-mixed", model=Recording())
    assert train_states and all(s == (True, torch.bfloat16) for s in train_states)
    assert not eval_states  # no validation while fitting (val_every_n_epochs=0)
    module = TrainModule(model, "segmentation", 3, metrics_factory=PixelAccuracy)
    spec = TrainerSpec(accelerator="cpu", devices=1, progress_bar=False, precision="bf16-mixed")
    data = MaskdDataModule(RandomSegData(4), RandomSegData(2), batch_size=2, seed=1)
    build_trainer(spec, tmp_path / "eval", evaluation_only=True).validate(module, datamodule=data)
    assert eval_states and not any(enabled for enabled, _ in eval_states)
    assert eval_dtypes and all(d == torch.float32 for d in eval_dtypes)


def test_distill_reads_our_token_files_and_released_ones(tmp_path):
    from maskd.engine.jobs import ConfigError, load_token_file
    from maskd.token_io import save_tokens
    from maskd.tokens import ReceptiveTokens

    ours = {"backbone.fpn": [ReceptiveTokens(8, 3), ReceptiveTokens(8, 3)]}
    save_tokens(tmp_path / "ours.pt", ours)
    back = load_token_file(str(tmp_path / "ours.pt"), ["backbone.fpn"])
    assert torch.equal(back["backbone.fpn"][1].mask_token, ours["backbone.fpn"][1].mask_token)

    token = torch.randn(8, 19)  # released segmentation format: a bare {mask_token: [T, C]}
    torch.save({"mask_token": token}, tmp_path / "official.pth")
    got = load_token_file(str(tmp_path / "official.pth"), ["model.classifier.4"])
    (tok,) = got["model.classifier.4"]
    assert tok.num_tokens == 8 and tok.channels == 19 and torch.equal(tok.mask_token, token)
    with pytest.raises(ConfigError, match="exactly one teacher layer"):
        load_token_file(str(tmp_path / "official.pth"), ["a", "b"])
    with pytest.raises(FileNotFoundError):
        load_token_file(str(tmp_path / "none.pt"), ["a"])


def test_custom_mask_warmup_counts_optimizer_steps(tmp_path):
    """With 2 micro-batches per optimizer step, the warm-up follows global_step, not calls."""
    from maskd.distiller import Distiller
    from maskd.tokens import ReceptiveTokens

    torch.manual_seed(0)
    seen: list[tuple[int, bool]] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.global_step, pl_module.net.terms[0].loss.custom_mask_active))

    term = {"kind": "maskd", "student": "body", "teacher": "body",
            "tokens": [ReceptiveTokens(8, 2)], "custom_mask_warmup": 2}  # fmt: skip
    distiller = Distiller(TinySeg(), TinySeg(), [term], example_input=torch.zeros(1, 3, 16, 16))
    module = DistillModule(distiller, "segmentation", 3, metrics_factory=PixelAccuracy)
    data = MaskdDataModule(RandomSegData(12), RandomSegData(2), batch_size=2, seed=1)
    trainer = tiny_trainer(tmp_path, 3, accumulate_grad_batches=2, callbacks=[Record()])
    trainer.fit(module, datamodule=data)
    # 6 micro-batches; the student-side mask is on from optimizer step 2 on, i.e. for the
    # forward of micro-batches 5 and 6 (whose start sees global_step 2)
    assert trainer.global_step == 3 and len(seen) == 6
    assert distiller.terms[0].loss.step == 3  # 2 at the last batch's start, + its own forward


def test_head_notes_flag_a_head_settled_on_a_token_covering_everything():
    from maskd.visualize import head_notes

    summary = {
        "p3": {"coverage": [0.16, 0.98, 0.3], "weight": [0.0, 0.99, 0.01]},  # settled, broad
        "p4": {"coverage": [0.5, 0.2, 0.3], "weight": [0.95, 0.03, 0.02]},  # settled, half
        "p5": {"coverage": [1.0, 0.2, 0.3], "weight": [0.4, 0.3, 0.3]},  # spread
        "logits": {"coverage": [1.0, 1.0, 1.0], "weight": None},  # no head
    }
    summary["p6"] = {"coverage": [0.9, 0.04, 0.3], "weight": [0.01, 0.98, 0.01]}  # settled, empty
    broad, empty = head_notes(summary)
    assert broad.startswith("p3: the head gives token 1 0.99 of the weight and its mask covers "
                            "0.98 of the positions, so MasKD on this level is close to FitNet")  # fmt: skip
    assert empty.startswith("p6: the head gives token 1 0.98 of the weight and its mask covers "
                            "0.04 of the positions, so this level is barely distilled")  # fmt: skip
    assert all("distill.token_weights=equal" in n for n in (broad, empty))
    assert [n.split(":")[0] for n in head_notes(summary, coverage=0.5)] == ["p3", "p4", "p6"]
    assert head_notes(summary, weight=0.999) == []


def test_mask_image_logger_prints_and_writes_the_token_summary(tmp_path, capsys):
    """At the end of stage 1: the summary of the learner's tokens over the logger's images,
    as :func:`token_summary` computes it, in token_summary.json and printed, with a note for
    a head that gives all its weight to a token covering every position."""
    import json
    from types import SimpleNamespace

    from maskd.engine.callbacks import MaskImageLogger
    from maskd.tokens import ReceptiveTokens
    from maskd.visualize import token_summary

    torch.manual_seed(0)
    model = TinySeg()
    tok = ReceptiveTokens(8, num_tokens=3, weighted=True)
    with torch.no_grad():
        model.body[2].weight.zero_()  # the feature is 1 at every position and channel
        model.body[2].bias.fill_(1.0)
        tok.mask_token.zero_()  # masks 0.5 everywhere ...
        tok.mask_token[1] = 5.0  # ... but token 1's: sigmoid(40), 1 everywhere
        tok.prob[2].weight.zero_()
        tok.prob[2].bias.copy_(torch.tensor([0.0, 20.0, 0.0]))  # softmax: token 1 gets ~1
    images = [torch.rand(3, 16, 16) for _ in range(2)]
    learner = SimpleNamespace(teacher=model, tokens=lambda: {"body": [tok]})
    logger = MaskImageLogger(images, summary_path=tmp_path / "token_summary.json")
    logger.on_train_end(SimpleNamespace(is_global_zero=True), SimpleNamespace(learner=learner))
    want = token_summary(model, {"body": [tok]}, images)
    assert json.loads((tmp_path / "token_summary.json").read_text()) == want
    out = capsys.readouterr().out
    assert "tokens over 2 validation images" in out
    assert "  body  coverage 0.50 1.00 0.50  weight 0.00 1.00 0.00\n" in out
    assert "note: body: the head gives token 1 1.00 of the weight and its mask covers 1.00" in out
