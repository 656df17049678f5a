"""The shipped configs reproduce the authors' recipes: one table row per setting, with its source.

A row names a config under ``configs/``, a dotted key in it, the value the authors' code uses
and where that value comes from (repository hunto/MasKD unless another is named). Append rows
for further settings; a later edit of a config that drifts from its source fails here. A key
part ``terms[kind=maskd]`` picks the one entry of a list whose ``kind`` is ``maskd`` (any
field works: ``terms[name=maskd_aux]``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from maskd.config_files import load_config
from maskd.engine.optim import OptimSpec, lr_factor

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class SameAs:
    """The expected value is the one the same config sets at another dotted key."""

    key: str


@dataclass(frozen=True)
class Row:
    config: str  # path under configs/
    key: str  # dotted key in the YAML
    expected: Any
    source: str


MMDET_MASKD = "mmdetection/configs/maskd/"
MMRAZOR_MASKD = "mmrazor/configs/distill/maskd/"
ITER_COSINE = (
    "lr_config = dict(_delete_=True, policy='CosineAnnealing', min_lr=1e-6) under "
    "IterBasedRunner: by_epoch=False (mmcv iter_based_runner.py), no warm-up; docs/method.md"
)
SEG_LOG = (
    "segmentation/work_dirs/dv3-r101/seg_mask_module_deeplabv3_resnet101_citys_log.txt "
    "argument line"
)
SEG_STAGE1 = "segmentation/train_mask_module.py"
SEG_MASKD_LOSS = "segmentation/losses/maskd.py MasKDLoss"
SEG_STAGE2 = "segmentation/train_maskd.py"
MMRAZOR = "open-mmlab/mmrazor configs/distill/"
CIRKD = "winycg/CIRKD "


def _detection_stage1(pair: str, source: str, optim: dict[str, Any], clip: float) -> list[Row]:
    path = f"coco/{pair}/learn_masks.yaml"
    rows = [Row(path, f"optim.{k}", v, source) for k, v in optim.items()]
    return [
        *rows,
        Row(path, "optim.schedule", "cosine", source + ": " + ITER_COSINE),
        Row(path, "optim.min_lr", 1e-6, source),
        Row(path, "optim.warmup_steps", 0, source + ": lr_config _delete_=True"),
        Row(path, "trainer.max_steps", 2000, source + ": IterBasedRunner max_iters=2000"),
        Row(path, "trainer.gradient_clip_val", clip, source + ": optimizer_config, see its row"),
        Row(path, "data.batch_size", 2, "mmdet samples_per_gpu=2 on 8 GPUs"),
        Row(path, "trainer.devices", 8, "mmdet samples_per_gpu=2 on 8 GPUs"),
        Row(path, "masks.num_tokens", 6, source + ": MasKDHook num_tokens=6"),
        Row(path, "masks.weighted", True, source + ": MasKDHook weight_mask=True"),
        Row(path, "masks.teacher_mode", "eval", "mmdetection/maskd_hook.py: BatchNorm eval()"),
    ]


def _segmentation_stage1(pair: str) -> list[Row]:
    path = f"cityscapes/{pair}/learn_masks.yaml"
    return [
        Row(path, "optim.name", "sgd", SEG_STAGE1 + ": torch.optim.SGD"),
        Row(path, "optim.lr", 0.1, SEG_LOG + ": lr=0.1"),
        Row(path, "optim.momentum", 0.9, SEG_LOG + ": momentum=0.9"),
        Row(path, "optim.weight_decay", 1e-3, SEG_LOG + ": weight_decay=0.001"),
        Row(path, "optim.schedule", "poly", SEG_STAGE1 + ": adjust_lr (1 - i/max)^0.9"),
        Row(path, "optim.power", 0.9, SEG_STAGE1 + ": adjust_lr power=0.9"),
        Row(path, "optim.min_lr", 0.0, SEG_STAGE1 + ": adjust_lr decays to 0"),
        Row(path, "trainer.max_steps", 10000, SEG_LOG + ": max_iterations=10000"),
        Row(path, "data.batch_size", 2, SEG_LOG + ": batch_size=16, num_gpus=8"),
        Row(path, "trainer.devices", 8, SEG_LOG + ": batch_size=16, num_gpus=8"),
        Row(path, "data.size", [512, 1024], SEG_LOG + ": crop_size=[512, 1024]"),
        Row(path, "masks.teacher_mode", "train", SEG_STAGE1 + ": self.model.train()"),
        Row(path, "masks.num_tokens", 8, SEG_STAGE1 + ": MaskModule(channels=19, num_tokens=8)"),
        Row(path, "masks.weighted", False, "released token file: mask_token only"),
    ]


MMDET = "open-mmlab/mmdetection v2.14 "
GROUP_SAMPLER = (
    MMDET + "mmdet/datasets/builder.py: GroupSampler / DistributedGroupSampler for every "
    "shuffled training loader, flag width / height > 1 (mmdet/datasets/custom.py): two groups"
)
MMDET_EXTRA_LEVELS = (
    MMDET + "configs/_base_/models/retinanet_r50_fpn.py add_extra_convs='on_input' (P6 from C5); "
    "mmdet/models/necks/fpn.py relu_before_extra_convs=False"
)
FCOS_MSTRAIN = (
    MMRAZOR_MASKD + "fcos_r101-fcos_r50_coco.py Resize img_scale=[(1333, 640), (1333, 800)], "
    "multiscale_mode='value'; "
    + MMDET
    + "configs/fcos/fcos_r50_caffe_fpn_gn-head_mstrain_640-800_2x_coco.py"
)
FCOS_CENTERNESS = (
    MMRAZOR_MASKD
    + "fcos_r101-fcos_r50_coco.py student centerness_on_reg=False; "
    + MMDET
    + "mmdet/models/dense_heads/fcos_head.py default centerness_on_reg=False (teacher)"
)
SEG_SYNC_BN = {
    "teacher.yaml": "winycg/CIRKD train_baseline.py: nn.SyncBatchNorm when distributed",
    "learn_masks.yaml": SEG_STAGE1 + ": the teacher built with nn.SyncBatchNorm under DDP",
    "distill.yaml": "segmentation/train_maskd.py: the student's nn.SyncBatchNorm under DDP",
}
COCO_PAIRS = ("fasterrcnn_r101_r50", "retinanet_r101_r50", "fcos_r101_r50")
STAGES = ("teacher.yaml", "learn_masks.yaml", "distill.yaml")
# The group each stage builds its models in (maskd train / learn-masks / distill).
MODELS = {
    "teacher.yaml": ("model",),
    "learn_masks.yaml": ("teacher",),
    "distill.yaml": ("student", "teacher"),
}


def _model_options(pair: str, options: dict[str, Any], source: str, stages=STAGES) -> list[Row]:
    """One row per builder option of every model of the pair's stages."""
    return [
        Row(f"coco/{pair}/{stage}", f"{group}.options.{key}", value, source)
        for stage in stages
        for group in MODELS[stage]
        for key, value in options.items()
    ]


def _aspect_ratio_groups() -> list[Row]:
    return [
        Row(f"coco/{pair}/{stage}", "data.aspect_ratio_group_factor", 0, GROUP_SAMPLER)
        for pair in COCO_PAIRS
        for stage in STAGES
    ]


def _segmentation_sync_bn() -> list[Row]:
    return [
        Row(f"cityscapes/{pair}/{stage}", "trainer.sync_batchnorm", True, source)
        for pair in ("deeplabv3_r101_r18", "deeplabv3_r101_mobilenetv3")
        for stage, source in SEG_SYNC_BN.items()
    ]


# COCO pair: (the authors' mmrazor config, MasKD weight, custom-mask warm-up, head term and
# its setting in that config; None: no head term).
DETECTION_TERMS = {
    "fasterrcnn_r101_r50": (
        "fpn_r101-fpn_r50_coco.py",
        1.0,
        7330,
        ("rcnn_smoothl1", "mmdet.SmoothL1Loss loss_weight=1 on 'roi_head.bbox_head.fc_reg'"),
    ),
    "retinanet_r101_r50": (
        "retinanet_r101-retinanet_r50_coco.py",
        7.0,
        7000,
        ("retinanet_l1", "mmdet.L1Loss loss_weight=1 on 'bbox_head.retina_reg'"),
    ),
    "fcos_r101_r50": ("fcos_r101-fcos_r50_coco.py", 10.0, 5000, None),
}


def _detection_terms() -> list[Row]:
    """MasKD's layer, weight and custom-mask warm-up, and the head term, per COCO pair."""
    rows = []
    for pair, (cfg, weight, warmup, head) in DETECTION_TERMS.items():
        path, source = f"coco/{pair}/distill.yaml", MMRAZOR_MASKD + cfg
        maskd = "distill.terms[kind=maskd]"
        rows += [
            Row(path, f"{maskd}.student", "backbone.fpn", source + ": MasKDLoss on 'neck'"),
            Row(path, f"{maskd}.weight", weight, source + ": MasKDLoss loss_weight"),
            Row(path, f"{maskd}.custom_mask_warmup", warmup, source + ": custom_mask_warmup"),
        ]
        if head is not None:
            kind, setting = head
            rows.append(
                Row(path, f"distill.terms[kind={kind}].weight", 1.0, f"{source}: {setting}")
            )
    return rows


def _segmentation_terms(pair: str, name: str = "maskd") -> list[Row]:
    """A Cityscapes MasKD term: the authors' loss scale, eps and raw logits."""
    path, key = f"cityscapes/{pair}/distill.yaml", f"distill.terms[name={name}]"
    return [
        Row(path, f"{key}.weight", 0.5, SEG_MASKD_LOSS + ": loss = square_loss * 0.5"),
        Row(path, f"{key}.eps", 1e-5, SEG_MASKD_LOSS + ": mask.sum((2, 3)) + 1e-5"),
        Row(path, f"{key}.align", False, SEG_STAGE2 + ": criterion_kd on the raw logits"),
    ]


def _peer_terms(
    path: str, kind: str, source: str, settings: dict[str, tuple[Any, str]]
) -> list[Row]:
    """One row per option of a peer config's term: ``{option: (value, where in source)}``."""
    return [
        Row(path, f"distill.terms[kind={kind}].{key}", value, f"{source}: {where}")
        for key, (value, where) in settings.items()
    ]


RECIPES: list[Row] = [
    # Stage 1, detection (issue items 3, 5, 7).
    *_detection_stage1(
        "fasterrcnn_r101_r50",
        MMDET_MASKD + "faster_rcnn_r101_fpn_2x_coco.py",
        {
            "name": "sgd",  # optimizer = dict(lr=0.1) merged into the base schedule's SGD
            "lr": 0.1,
            "momentum": 0.9,  # mmdet configs/_base_/schedules/schedule_2x.py
            "weight_decay": 1e-4,  # mmdet configs/_base_/schedules/schedule_2x.py
        },
        clip=0.0,  # schedule_2x.py: grad_clip=None
    ),
    *_detection_stage1(
        "retinanet_r101_r50",
        MMDET_MASKD + "retinanet_r101_fpn_2x_coco.py",
        {"name": "adam", "lr": 0.01, "weight_decay": 1e-3},
        clip=0.0,  # mmdet retinanet_r50_fpn_1x_coco.py keeps schedule_1x.py's grad_clip=None
    ),
    *_detection_stage1(
        "fcos_r101_r50",
        MMDET_MASKD + "fcos_r101_caffe_fpn_gn-head_mstrain_640-800_2x_coco.py",
        {"name": "adam", "lr": 0.01, "weight_decay": 1e-3},
        clip=35.0,  # mmdet fcos_r50_caffe_fpn_gn-head_1x_coco.py: grad_clip max_norm=35
    ),
    # Stage 1, segmentation (issue item 4).
    *_segmentation_stage1("deeplabv3_r101_r18"),
    *_segmentation_stage1("deeplabv3_r101_mobilenetv3"),
    # Stage 2 (issue item 5).
    Row(
        "coco/fasterrcnn_r101_r50/distill.yaml",
        "trainer.gradient_clip_val",
        0.0,
        MMRAZOR_MASKD + "fpn_r101-fpn_r50_coco.py: no optimizer_config, base schedule_2x "
        "grad_clip=None (the RetinaNet and FCOS configs add 35 themselves)",
    ),
    Row(
        "coco/fcos_r101_r50/teacher.yaml",
        "optim.warmup",
        "constant",
        "open-mmlab/mmdetection v2 configs/fcos/fcos_r50_caffe_fpn_gn-head_1x_coco.py: "
        "lr_config warmup='constant'",
    ),
    Row(
        "coco/fcos_r101_r50/teacher.yaml",
        "optim.warmup_factor",
        1 / 3,
        "open-mmlab/mmdetection v2 configs/fcos/fcos_r50_caffe_fpn_gn-head_1x_coco.py: "
        "warmup_ratio=1.0 / 3",
    ),
    Row(
        "coco/fcos_r101_r50/distill.yaml",
        "optim.warmup",
        "linear",
        MMRAZOR_MASKD + "fcos_r101-fcos_r50_coco.py: lr_config warmup='linear'",
    ),
    Row(
        "coco/fcos_r101_r50/distill.yaml",
        "optim.warmup_factor",
        1 / 3,
        MMRAZOR_MASKD + "fcos_r101-fcos_r50_coco.py: warmup_ratio=1.0 / 3",
    ),
    Row(
        "coco/fcos_r101_r50/distill.yaml",
        "optim.warmup_steps",
        500,
        MMRAZOR_MASKD + "fcos_r101-fcos_r50_coco.py: warmup_iters=500",
    ),
    Row(
        "coco/retinanet_r101_r50/distill.yaml",
        "optim.warmup_steps",
        1000,
        MMRAZOR_MASKD + "retinanet_r101-retinanet_r50_coco.py: lr_config warmup_iters=1000",
    ),
    Row(
        "coco/retinanet_r101_r50/distill.yaml",
        "optim.lr",
        0.02,
        MMRAZOR_MASKD + "retinanet_r101-retinanet_r50_coco.py: optimizer lr=0.02",
    ),
    Row(
        "coco/retinanet_r101_r50/distill.yaml",
        "trainer.gradient_clip_val",
        35.0,
        MMRAZOR_MASKD + "retinanet_r101-retinanet_r50_coco.py: grad_clip max_norm=35",
    ),
    Row(
        "coco/fcos_r101_r50/distill.yaml",
        "trainer.gradient_clip_val",
        35.0,
        MMRAZOR_MASKD + "fcos_r101-fcos_r50_coco.py: grad_clip max_norm=35",
    ),
    Row(
        "coco/fcos_r101_r50/distill.yaml",
        "optim.lr",
        0.01,
        MMRAZOR_MASKD + "fcos_r101-fcos_r50_coco.py: optimizer lr=0.01",
    ),
    # mmcv's bias rules (issue item 7): paramwise_cfg bias_lr_mult / bias_decay_mult.
    *[
        Row(f"coco/fcos_r101_r50/{stage}", key, value, source)
        for stage, source in (
            ("distill.yaml", MMRAZOR_MASKD + "fcos_r101-fcos_r50_coco.py: opt_paramwise_cfg"),
            ("teacher.yaml", MMDET + "configs/fcos/fcos_r50_caffe_fpn_gn-head_1x_coco.py"),
        )
        for key, value in (("optim.bias_lr_mult", 2.0), ("optim.bias_weight_decay", False))
    ],
    *[
        Row(f"coco/{pair}/distill.yaml", key, value, MMRAZOR_MASKD + f"{cfg}: no bias rules")
        for pair, cfg in (
            ("retinanet_r101_r50", "retinanet_r101-retinanet_r50_coco.py"),
            ("fasterrcnn_r101_r50", "fpn_r101-fpn_r50_coco.py"),
        )
        for key, value in (("optim.bias_lr_mult", 1.0), ("optim.bias_weight_decay", True))
    ],
    # RetinaNet (issue items 5 and 6): the student's FPN and head from the teacher's checkpoint,
    # mmdet's P6 from C5 and P7 without ReLU in every stage.
    Row(
        "coco/retinanet_r101_r50/distill.yaml",
        "student.init_from.prefixes",
        {"backbone.fpn": "backbone.fpn", "head": "head"},
        MMRAZOR_MASKD + "retinanet_r101-retinanet_r50_coco.py: init_cfg prefix 'neck' / "
        "'bbox_head' (torchvision's backbone.fpn / head)",
    ),
    Row(
        "coco/retinanet_r101_r50/distill.yaml",
        "student.init_from.path",
        SameAs("teacher.weights"),
        MMRAZOR_MASKD + "retinanet_r101-retinanet_r50_coco.py: init_cfg checkpoint = the teacher's",
    ),
    *_model_options(
        "retinanet_r101_r50",
        {"extra_levels_from": "c5", "relu_before_p7": False},
        MMDET_EXTRA_LEVELS,
    ),
    # FCOS (issue item 8): multi-scale 640/800, centerness on the classification tower.
    *_model_options("fcos_r101_r50", {"min_size": [640, 800], "max_size": 1333}, FCOS_MSTRAIN),
    *_model_options("fcos_r101_r50", {"centerness_on": "cls"}, FCOS_CENTERNESS),
    # MobileNet student weight decay (issue item 7), the ResNet student's the script default.
    Row(
        "cityscapes/deeplabv3_r101_mobilenetv3/distill.yaml",
        "optim.weight_decay",
        2e-4,
        "segmentation/train_scripts/train_maskd/deeplabv3_mbv2.sh: --weight-decay 2e-4",
    ),
    Row(
        "cityscapes/deeplabv3_r101_r18/distill.yaml",
        "optim.weight_decay",
        5e-4,
        "segmentation/train_maskd.py: --weight-decay default 5e-4",
    ),
    # The teachers, as the mmdet checkpoints the authors distil from were trained.
    Row(
        "coco/retinanet_r101_r50/teacher.yaml",
        "optim.lr",
        0.01,
        MMDET + "configs/retinanet/retinanet_r50_fpn_1x_coco.py: optimizer lr=0.01",
    ),
    *[
        Row(
            f"coco/{pair}/teacher.yaml",
            "trainer.gradient_clip_val",
            clip,
            MMDET + f"{source}: grad_clip",
        )
        for pair, clip, source in (
            ("retinanet_r101_r50", 0.0, "configs/_base_/schedules/schedule_1x.py"),
            ("fasterrcnn_r101_r50", 0.0, "configs/_base_/schedules/schedule_1x.py"),
            ("fcos_r101_r50", 35.0, "configs/fcos/fcos_r50_caffe_fpn_gn-head_1x_coco.py"),
        )
    ],
    # Batches of one aspect-ratio group, SyncBatchNorm for the segmenters (issue item 8).
    *_aspect_ratio_groups(),
    *_segmentation_sync_bn(),
    # Stage-2 terms: MasKD and the authors' head terms.
    *_detection_terms(),
    *_segmentation_terms("deeplabv3_r101_r18"),
    *_segmentation_terms("deeplabv3_r101_mobilenetv3"),
    Row(
        "cityscapes/deeplabv3_r101_r18/distill.yaml",
        "distill.terms[name=maskd_aux].level_weights",
        0.4,
        SEG_STAGE2 + ": kd_loss += 0.4 * lambda_kd * criterion_kd(s_outputs[1], t_outputs[1])",
    ),
    Row(
        "cityscapes/deeplabv3_r101_r18/distill.yaml",
        "distill.terms[name=maskd_aux].tokens_from",
        "model.classifier.4",
        SEG_STAGE2 + ": one criterion_kd (one MaskModule) for the main and auxiliary logits",
    ),
    *_segmentation_terms("deeplabv3_r101_r18", "maskd_aux"),
    # The peer methods' settings (their papers' code).
    *_peer_terms(
        "coco/retinanet_r101_r50/cwd.yaml",
        "cwd",
        MMRAZOR + "mmdet/cwd/cwd_fpn_frcnn_r101_frcnn_r50_1x_coco.py (the RetinaNet config's base)",
        {"tau": (1.0, "ChannelWiseDivergence tau=1"), "weight": (10.0, "loss_weight=10")},
    ),
    *_peer_terms(
        "coco/retinanet_r101_r50/fgd.yaml",
        "fgd",
        "yzd-v/FGD configs/distillers/fgd/fgd_retina_r101_fpn_2x_distill_retina_r50_fpn_2x_coco.py",
        {"detector": ("retinanet", "the RetinaNet coefficients (maskd.terms.fgd)")},
    ),
    *_peer_terms(
        "cityscapes/deeplabv3_r101_r18/cwd.yaml",
        "cwd",
        MMRAZOR + "mmseg/cwd/cwd_logits_pspnet_r101_d8_pspnet_r18_d8_512x1024_cityscapes_80k.py",
        {
            "student": ("model.classifier.4", "recorder 'decode_head.conv_seg' (the logits)"),
            "tau": (1.0, "ChannelWiseDivergence tau=1"),
            "weight": (5.0, "loss_weight=5"),
            "align": (False, "no connector"),
        },
    ),
    *_peer_terms(
        "cityscapes/deeplabv3_r101_r18/logits_kd.yaml",
        "logits_kd",
        CIRKD + "losses/kd.py CriterionKD, train_kd.py",
        {"tau": (1.0, "--kd-temperature default 1.0"), "weight": (1.0, "--lambda-kd 1.0")},
    ),
    *_peer_terms(
        "cityscapes/deeplabv3_r101_r18/fitnet.yaml",
        "fitnet",
        CIRKD + "train_kd.py",
        {
            "student": (
                "model.classifier.3",
                "criterion_fitnet(s_outputs[-1], ...): models/deeplabv3.py x_feat_after_aspp, "
                "the head's 3x3 conv + BN + ReLU before the classifier conv",
            ),
            "teacher": ("model.classifier.3", "criterion_fitnet(..., t_outputs[-1])"),
            "align": (True, "losses/fitnet.py CriterionFitNet: a 1x1 conv on the student"),
        },
    ),
]


@cache
def _config(path: str) -> dict[str, Any]:
    """The options ``maskd <command> --config configs/<path>`` reads (``base`` files merged)."""
    return load_config(CONFIGS / path)


_MISSING = object()


_SELECT = re.compile(r"^(\w+)\[(\w+)=([\w.]+)\]$")


def _field(entry: dict[str, Any], field: str) -> Any:
    """A list entry's field; a term that sets no ``name`` is named by its ``kind``."""
    if field == "name":
        return entry.get("name", entry.get("kind"))
    return entry.get(field)


def _lookup(cfg: dict[str, Any], key: str) -> Any:
    """The value at a dotted key; ``terms[kind=maskd]`` is the one list entry with that field.

    The key splits on the dots outside brackets (a selector's value may be a layer path).
    Missing keys, and a selector that matches no entry or several, give ``_MISSING``.
    """
    value: Any = cfg
    for part in re.findall(r"[^.\[]+(?:\[[^\]]*\])?", key):
        select = _SELECT.match(part)
        name = select.group(1) if select else part
        if not isinstance(value, dict) or name not in value:
            return _MISSING
        value = value[name]
        if select:
            field, want = select.group(2), select.group(3)
            found = [v for v in value or [] if isinstance(v, dict) and _field(v, field) == want]
            if len(found) != 1:
                return _MISSING
            value = found[0]
    return value


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, int | float) and isinstance(got, int | float):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=0.0)
    return got == want


@pytest.mark.parametrize("row", RECIPES, ids=lambda r: f"{r.config}:{r.key}")
def test_config_matches_the_authors_recipe(row: Row) -> None:
    cfg = _config(row.config)
    want = row.expected
    if isinstance(want, SameAs):
        want = _lookup(cfg, want.key)
        assert want is not _MISSING, f"{row.config} sets no {row.expected.key}"
    got = _lookup(cfg, row.key)
    assert got is not _MISSING, f"{row.config} sets no {row.key} (want {want!r})"
    assert _same(got, want), (
        f"{row.config} {row.key} = {got!r}, the authors' value is {want!r} ({row.source})"
    )


def test_table_rows_are_unique_and_name_existing_configs() -> None:
    keys = [(r.config, r.key) for r in RECIPES]
    assert len(keys) == len(set(keys))
    assert all((CONFIGS / r.config).is_file() for r in RECIPES)
    assert all(r.source for r in RECIPES)


# Every shipped stage-2 config: the terms `maskd distill` runs, in order, as (kind, weight).
SHIPPED_TERMS: dict[str, list[tuple[str, float]]] = {
    "coco/fasterrcnn_r101_r50/distill.yaml": [("maskd", 1.0), ("rcnn_smoothl1", 1.0)],
    "coco/retinanet_r101_r50/distill.yaml": [("maskd", 7.0), ("retinanet_l1", 1.0)],
    "coco/retinanet_r101_r50/cwd.yaml": [("cwd", 10.0)],
    "coco/retinanet_r101_r50/fgd.yaml": [("fgd", 1.0)],
    "coco/retinanet_r101_r50/fitnet.yaml": [("fitnet", 1.0)],
    "coco/fcos_r101_r50/distill.yaml": [("maskd", 10.0)],
    "cityscapes/deeplabv3_r101_r18/distill.yaml": [("maskd", 0.5), ("maskd", 0.5)],
    "cityscapes/deeplabv3_r101_r18/cwd.yaml": [("cwd", 5.0)],
    "cityscapes/deeplabv3_r101_r18/fitnet.yaml": [("fitnet", 1.0)],
    "cityscapes/deeplabv3_r101_r18/logits_kd.yaml": [("logits_kd", 1.0)],
    "cityscapes/deeplabv3_r101_mobilenetv3/distill.yaml": [("maskd", 0.5)],
    "demo/detection/distill.yaml": [("maskd", 10.0)],
    "demo/segmentation/distill.yaml": [("maskd", 13.5)],
}


def _distill_configs() -> list[str]:
    return sorted(
        str(p.relative_to(CONFIGS))
        for folder in ("coco", "cityscapes", "demo")
        for p in (CONFIGS / folder).rglob("*.yaml")
        if "distill" in load_config(p)
    )


def test_the_term_table_names_every_shipped_distill_config() -> None:
    assert sorted(SHIPPED_TERMS) == _distill_configs()


@pytest.mark.parametrize("path", sorted(SHIPPED_TERMS))
def test_shipped_config_runs_its_terms(path: str) -> None:
    """The term list ``maskd distill`` builds from the config (its layers as run_distill)."""
    import torch

    from maskd import models
    from maskd.engine.jobs import DistillArgs, distill_terms
    from maskd.models.registry import DEFAULT_CLASSES
    from maskd.terms import check_spec

    cfg = _config(path)
    distill = DistillArgs(**cfg["distill"])
    student, teacher = cfg["student"], cfg["teacher"]
    task = models.task_of(student["name"])
    pairs = distill.pairs
    if pairs is None:  # the two models' default layers, as run_distill
        classes = DEFAULT_CLASSES[task]
        with torch.device("meta"):
            s_layers = models.build(student["name"], classes, **student.get("options", {}))[1]
            t_layers = models.build(teacher["name"], classes, **teacher.get("options", {}))[1]
        pairs = dict(zip(s_layers, t_layers, strict=True))
    specs = distill_terms(distill, task, student["name"], pairs)
    # a term that sets no weight has weight 1 (maskd.terms.Term)
    assert [(s["kind"], s.get("weight", 1.0)) for s in specs] == SHIPPED_TERMS[path]
    for spec in specs:
        check_spec(spec)  # a known kind, known options, its layers (and tokens) given
        if spec["kind"] == "maskd":
            assert spec["tokens"] == distill.tokens
    # a peer config runs its term alone: no MasKD tokens, no shorthand MasKD term
    if "maskd" not in {kind for kind, _ in SHIPPED_TERMS[path]}:
        assert distill.tokens is None


def _mmcv_cosine(base_lr: float, min_lr: float, it: int, max_iters: int) -> float:
    """mmcv CosineAnnealingLrUpdaterHook.get_lr with by_epoch=False (annealing_cos)."""
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * it / max_iters))


@pytest.mark.parametrize("pair", ["fasterrcnn_r101_r50", "retinanet_r101_r50", "fcos_r101_r50"])
def test_detection_stage1_lr_follows_mmcv_per_iteration_cosine(pair: str) -> None:
    """The lr our schedule gives each step is the one mmcv set before that iteration."""
    cfg = _config(f"coco/{pair}/learn_masks.yaml")
    spec = OptimSpec(**cfg["optim"])
    total = cfg["trainer"]["max_steps"]
    for it in (0, 1, 500, 1000, 1999):
        want = _mmcv_cosine(spec.lr, 1e-6, it, 2000)
        assert math.isclose(spec.lr * lr_factor(it, total, spec), want, rel_tol=1e-12), it


@pytest.mark.parametrize("pair", ["deeplabv3_r101_r18", "deeplabv3_r101_mobilenetv3"])
def test_segmentation_stage1_lr_matches_the_logged_lr_column(pair: str) -> None:
    """The authors' log prints, at iteration k (1-based), the lr set for step k - 1."""
    cfg = _config(f"cityscapes/{pair}/learn_masks.yaml")
    spec = OptimSpec(**cfg["optim"])
    total = cfg["trainer"]["max_steps"]
    # "Iters: 10/10000 || Lr: 0.099919", "Iters: 6800/10000 || Lr: 0.035872",
    # "Iters: 10000/10000 || Lr: 0.000025" (seg_mask_module_..._citys_log.txt)
    for k, logged in ((10, 0.099919), (6800, 0.035872), (10000, 0.000025)):
        assert round(spec.lr * lr_factor(k - 1, total, spec), 6) == logged, k
