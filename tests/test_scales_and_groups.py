"""Multi-scale training sizes and aspect-ratio batches: deterministic, shared with the
teacher, and exact on resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import Dataset, Subset
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from maskd.data import detection_collate
from maskd.distiller import Distiller
from maskd.engine.datamodule import MaskdDataModule
from maskd.engine.modules import TrainModule
from maskd.engine.optim import OptimSpec
from maskd.engine.sampling import (
    GroupedBatchSampler,
    ResumableSampler,
    aspect_ratio_groups,
    group_batches,
    image_sizes,
)
from maskd.tokens import ReceptiveTokens
from test_engine import tiny_trainer
from tiny_detectors import detection_batch, detector

# (height, width) of the tiny dataset's images: landscape, square and portrait ones.
SIZES = [(20, 30), (30, 20), (24, 24), (18, 36), (32, 16), (20, 28), (28, 20), (16, 40)]
SIZES += [(22, 30), (30, 22), (26, 26), (20, 34)]


class TinyScaled(nn.Module):
    """Detection-contract model: torchvision's resizing transform, then one conv.

    The loss depends on the resized size, so a different draw of ``min_size`` changes the
    gradients. ``sizes`` records every batch's resized image sizes.
    """

    def __init__(self, min_size: tuple[int, ...] = (8, 12, 16)) -> None:
        super().__init__()
        self.transform = GeneralizedRCNNTransform(min_size, 48, [0.0] * 3, [1.0] * 3)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.sizes: list[list[tuple[int, int]]] = []

    def forward(self, images, targets=None):
        batch, _ = self.transform(images, targets)
        self.sizes.append([tuple(s) for s in batch.image_sizes])
        out = self.conv(batch.tensors)
        if self.training:
            return {"loss_size": (out**2).mean() + out.mean()}
        empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}
        return [dict(empty) for _ in images]


class SizedImages(Dataset):
    """Random images of the sizes in ``SIZES``; ``image_sizes()`` as COCO's dataset has."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(4)
        self.images = [torch.rand(3, h, w, generator=g) for h, w in SIZES]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        target = {"boxes": torch.tensor([[1.0, 1.0, 8.0, 9.0]]), "labels": torch.tensor([1])}
        return self.images[i], {**target, "image_id": i}

    def image_sizes(self) -> list[tuple[int, int]]:
        return list(SIZES)


class NoMetric(nn.Module):
    def update(self, preds, targets) -> None:
        pass

    def compute(self) -> dict[str, float]:
        return {}

    def reset(self) -> None:
        pass


class Record(Callback):
    """Dataset indices of every training batch; optionally a crash at one step."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.crash_at = crash_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.crash_at:
            raise RuntimeError("simulated crash")
        self.batches.append([t["image_id"] for t in batch[1]])


def fit(run_dir: Path, steps: int, groups: list[int] | None, resume=None, crash_at=None):
    torch.manual_seed(0)
    model = TinyScaled()
    module = TrainModule(
        model,
        "detection",
        1,
        optim=OptimSpec(name="sgd", lr=0.1, momentum=0.9),
        seed=7,
        metrics_factory=NoMetric,
    )
    data = MaskdDataModule(
        SizedImages(),
        SizedImages(),
        batch_size=3,
        seed=5,
        collate_fn=detection_collate,
        group_ids=groups,
    )
    record = Record(crash_at)
    trainer = tiny_trainer(run_dir, steps, checkpoint_every_n_steps=2, callbacks=[record])
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    return model, record


@pytest.mark.parametrize("grouped", [False, True])
def test_multiscale_and_grouped_training_resume_exactly(tmp_path: Path, grouped: bool) -> None:
    # 12 images, batch 3: 4 batches per epoch; 7 steps cross an epoch, the crash is mid-epoch.
    groups = aspect_ratio_groups(SIZES, 0) if grouped else None
    straight, seen = fit(tmp_path / "a", 7, groups)
    sizes = {s for batch in straight.sizes for s in batch}
    assert {min(s) for s in sizes} == {8, 12, 16}  # every min_size was drawn
    assert len({tuple(b) for b in straight.sizes}) > 1
    if grouped:
        for batch in seen.batches:
            assert len({groups[i] for i in batch}) == 1, batch
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "b", 7, groups, crash_at=3)
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    resumed, later = fit(tmp_path / "b", 7, groups, resume=str(ckpt))
    assert later.batches == seen.batches[2:]  # the checkpoint was written after step 2
    assert resumed.sizes == straight.sizes[2:]
    for (name, p), q in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name


def test_evaluation_takes_the_last_size() -> None:
    model = TinyScaled((8, 12, 16)).eval()
    with torch.no_grad():
        model([torch.rand(3, 20, 30), torch.rand(3, 30, 20)])
    assert model.sizes[-1] == [(16, 24), (24, 16)]


def test_teacher_draws_the_students_sizes() -> None:
    student, teacher = detector("fcos", 1), detector("fcos", 0)
    for model in (student, teacher):
        model.transform.min_size = (40, 48, 56)
    torch.manual_seed(7)
    tokens = {"backbone.fpn": [ReceptiveTokens(256, 2) for _ in range(5)]}
    maskd = {"kind": "maskd", "student": "backbone.fpn", "teacher": "backbone.fpn"}
    distiller = Distiller(student, teacher, [{**maskd, "tokens": tokens}])
    images, targets = detection_batch()
    images = images * 3  # six images: the per-image draws differ
    targets = targets * 3

    def sizes_of(model: nn.Module) -> list:
        got: list = []
        model.transform.register_forward_hook(lambda m, i, o: got.append(o[0].image_sizes))
        return got

    s_sizes, t_sizes = sizes_of(student), sizes_of(teacher)
    drawn = []
    for seed in range(3):
        torch.manual_seed(seed)
        distiller(images, targets)  # a mismatch would raise
        torch.manual_seed(seed)
        student.transform(images)  # the student alone draws the same from the same state
        assert s_sizes[-2] == t_sizes[-1] == s_sizes[-1]
        drawn += [min(s) for s in s_sizes[-1]]
    assert set(drawn) == {40, 48, 56}
    assert not teacher.training and not teacher.transform.training
    distiller.eval()
    with torch.no_grad():
        distiller(images)
    assert {min(s) for s in s_sizes[-1]} == {56}


def test_group_batches_one_group_each_fixed_count_close_to_the_order() -> None:
    groups = [0, 1, 0, 0, 2, 1, 0, 2, 1, 0, 1]
    order = [3, 1, 4, 10, 5, 9, 2, 6, 0, 8, 7]
    batches = group_batches(order, groups, 2)
    # a batch is complete as soon as two of its group were seen, in the order's course
    assert batches == [[1, 10], [3, 9], [2, 6], [5, 8], [4, 7]]
    # the fullest leftover group (2: samples 5, 7) beats the lower ids (0: 9; 3: 8) and is
    # topped up with its own first sample
    groups = [0, 1, 0, 1, 0, 2, 1, 2, 3, 0]
    assert group_batches(range(10), groups, 3) == [[0, 2, 4], [1, 3, 6], [5, 7, 5]]
    # equally full leftovers: the lower group id
    assert group_batches([0, 3, 6, 1, 4, 2, 5], [0, 0, 0, 1, 1, 1, 2], 2) == [
        [0, 1],
        [3, 4],
        [2, 0],
    ]
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 4, (50,), generator=g).tolist()
    order = torch.randperm(50, generator=g).tolist()
    for size in (1, 3, 7):
        batches = group_batches(order, groups, size)
        assert len(batches) == 50 // size
        assert all(len(b) == size and len({groups[i] for i in b}) == 1 for b in batches)


def test_grouped_sampler_is_deterministic_sharded_and_skips_batches() -> None:
    groups = aspect_ratio_groups(SIZES, 3)
    sampler = GroupedBatchSampler(ResumableSampler(len(SIZES), seed=3), groups, 2)
    first = list(sampler)
    assert first == list(GroupedBatchSampler(ResumableSampler(12, seed=3), groups, 2))
    assert len(first) == len(sampler) == 6
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != first and all(e == 1 for b in epoch1 for e, _ in b)
    sampler.skip(1, 5)  # 5 samples done = 2 whole batches of 2
    assert list(sampler) == epoch1[2:]
    for rank in (0, 1):
        shard = ResumableSampler(12, seed=3, rank=rank, world_size=2)
        batches = list(GroupedBatchSampler(shard, groups, 2))
        assert len(batches) == 3
        assert all(len({groups[i] for _, i in b}) == 1 for b in batches)
        assert {i for b in batches for _, i in b} <= set(shard.order(0))
    with pytest.raises(ValueError, match="3 group ids for 12 samples"):
        GroupedBatchSampler(ResumableSampler(12), [0, 1, 0], 2)


def test_aspect_ratio_groups_bins() -> None:
    # factor 0: landscape (h / w < 1) apart from square and portrait, as mmdet's flag
    assert aspect_ratio_groups([(20, 30), (24, 24), (30, 20)], 0) == [0, 1, 1]
    # factor 1: edges 1/2, 1, 2 on height / width
    sizes = [(10, 40), (10, 20), (15, 20), (20, 20), (30, 20), (40, 20), (50, 20)]
    assert aspect_ratio_groups(sizes, 1) == [0, 1, 1, 2, 2, 3, 3]
    # factor 3 (torchvision's references): 8 groups, edges 2 ** (i / 3 - 1)
    edges = [2 ** (i / 3 - 1) for i in range(7)]
    ratios = [0.3, 0.55, 0.7, 0.9, 1.1, 1.4, 1.7, 2.5]
    expected = [sum(e <= r for e in edges) for r in ratios]
    assert expected == list(range(8))
    assert aspect_ratio_groups([(round(r * 1000), 1000) for r in ratios], 3) == expected
    with pytest.raises(ValueError, match="factor must be an int >= 0"):
        aspect_ratio_groups([(1, 1)], -2)


def test_image_sizes_reads_the_dataset_and_subsets() -> None:
    data = SizedImages()
    assert image_sizes(data) == SIZES
    assert image_sizes(Subset(data, [3, 0])) == [SIZES[3], SIZES[0]]
    with pytest.raises(ValueError, match="a list dataset does not give"):
        image_sizes([1, 2])  # type: ignore[arg-type]
