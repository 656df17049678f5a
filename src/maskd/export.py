"""Export a trained or distilled model as a plain state dict that needs no maskd to load.

The file holds only ``{name: tensor}`` in torchvision's module layout: the detector itself,
or the inner torchvision segmenter of a ``SegmentationTask``. It loads

- with maskd: ``maskd.models.build(name, num_classes, weights=path, **options)`` (the
  builder options the model was trained with);
- without maskd: into the matching torchvision builder, e.g.
  ``torchvision.models.detection.retinanet_resnet50_fpn(weights=None,
  weights_backbone=None, num_classes=K + 1).load_state_dict(torch.load(path))``, where
  torchvision has the architecture: not for mmdet's P7 without a ReLU
  (``relu_before_p7: false``) or FCOS centerness on the classification tower
  (``centerness_on: cls``), nor for models torchvision has no builder for.

A ``<out>.json`` beside it records the model name, class count, builder options, the
torchvision call that rebuilds the architecture (``null`` where there is none, with the
reason under ``torchvision_gap``) and the maskd call that loads the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from maskd.engine.checkpoint import atomic_save
from maskd.errors import UserValueError
from maskd.torch_files import load_file

__all__ = [
    "export_checkpoint",
    "maskd_call",
    "native_state_dict",
    "torchvision_call",
    "torchvision_gap",
]

# Registry names that torchvision builds under the same name.
_TORCHVISION_DETECTION = {
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "retinanet_resnet50_fpn",
    "fcos_resnet50_fpn",
}
_TORCHVISION_SEGMENTATION = {
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "fcn_resnet50",
    "fcn_resnet101",
    "lraspp_mobilenet_v3_large",
}


# registry options with no torchvision counterpart that change no tensor name or shape
_MASKD_ONLY_OPTIONS = {
    "frozen_bn",
    "trainable_backbone_layers",
    "layers",
    "aux_loss",
    "aux_weight",
    "ignore_index",
    "box_regression_bias",  # an initial value only
    "regress_ranges",  # which locations train on which box: training only
}
# registry options that shape the architecture, handled by torchvision_call itself
_ARCHITECTURE_OPTIONS = {"extra_levels_from", "relu_before_p7", "centerness_on"}


def native_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The torchvision-layout state dict of a registry model.

    Unwraps ``SegmentationTask`` (its ``model`` attribute) and gives every
    ``FrozenBatchNorm2d`` the ``num_batches_tracked`` counter of ``BatchNorm2d``, so the
    dict loads strictly into torchvision's builders (which use ``BatchNorm2d`` when built
    without weights).
    """
    from maskd.tasks import SegmentationTask

    net = model.model if isinstance(model, SegmentationTask) else model
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    for name, module in net.named_modules():
        if isinstance(module, FrozenBatchNorm2d):
            state[f"{name}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return state


def torchvision_gap(name: str, options: Mapping[str, Any]) -> str | None:
    """Why torchvision alone cannot rebuild ``name`` with these builder options, or ``None``."""
    if options.get("relu_before_p7", True) is False:
        return (
            "P7 = conv(P6) without a ReLU (relu_before_p7: false, mmdet's RetinaNet); "
            "torchvision's LastLevelP6P7 always applies one"
        )
    if options.get("centerness_on") == "cls":
        return (
            "centerness on the classification tower (centerness_on: cls, mmdet's FCOS); "
            "torchvision's FCOSHead has it on the regression tower, under other weight names"
        )
    if name in _TORCHVISION_DETECTION or name in _TORCHVISION_SEGMENTATION:
        return None
    arch, _, rest = name.partition("_")
    if (
        arch in ("fasterrcnn", "retinanet", "fcos")
        and rest.startswith("resnet")
        and rest.endswith("_fpn")
    ):
        return None
    return f"torchvision has no builder for {name!r}"


def maskd_call(name: str, num_classes: int, options: Mapping[str, Any], weights: str) -> str:
    """Python code for the model ``name`` with maskd, the exported ``weights`` loaded
    (``maskd.models.build`` returns the model and its default layers: ``[0]`` is the model)."""
    extra = "".join(f", {k}={_literal(v)}" for k, v in options.items())
    return f"maskd.models.build({name!r}, {num_classes}, weights={weights!r}{extra})[0]"


def _literal(value: Any) -> str:
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


def torchvision_call(name: str, num_classes: int, options: Mapping[str, Any]) -> str | None:
    """Python code that rebuilds ``name``'s architecture with ``torch`` and ``torchvision`` alone.

    ``None`` where torchvision has no such model: :func:`torchvision_gap` says why, and
    :func:`maskd_call` gives the way to load it. A ``min_size`` list (multi-scale training)
    becomes the tuple torchvision's transform draws from; ``extra_levels_from: c5`` becomes
    torchvision's ``LastLevelP6P7(C5 channels, 256)``, whose P6 then reads C5.
    """
    if torchvision_gap(name, options) is not None:
        return None
    # builder options that are torchvision detector arguments (not maskd-only switches)
    sizes = "".join(
        f", {k}={_literal(v)}"
        for k, v in options.items()
        if k not in _MASKD_ONLY_OPTIONS and k not in _ARCHITECTURE_OPTIONS
    )
    if name in _TORCHVISION_SEGMENTATION:
        aux = "" if name.startswith("lraspp") else f", aux_loss={options.get('aux_loss', True)}"
        return (
            f"torchvision.models.segmentation.{name}(weights=None, weights_backbone=None, "
            f"num_classes={num_classes}{aux})"
        )
    from_c5 = options.get("extra_levels_from", "p5") == "c5"
    if name in _TORCHVISION_DETECTION and not from_c5:
        return (
            f"torchvision.models.detection.{name}(weights=None, weights_backbone=None, "
            f"num_classes={num_classes + 1}{sizes})"
        )
    arch, _, rest = name.partition("_")
    backbone = rest.removesuffix("_fpn")
    cls = {"fasterrcnn": "FasterRCNN", "retinanet": "RetinaNet", "fcos": "FCOS"}[arch]
    extra = ""
    if arch != "fasterrcnn":
        # torchvision's P6 reads C5 when the block's input channels differ from 256
        p6_in = (512 if backbone in ("resnet18", "resnet34") else 2048) if from_c5 else 256
        extra = (
            ", returned_layers=[2, 3, 4], extra_blocks="
            f"torchvision.ops.feature_pyramid_network.LastLevelP6P7({p6_in}, 256)"
        )
    return (
        f"torchvision.models.detection.{cls}("
        f"torchvision.models.detection.backbone_utils.resnet_fpn_backbone("
        f"backbone_name={backbone!r}, weights=None, norm_layer=torch.nn.BatchNorm2d, "
        f"trainable_layers=5{extra}), num_classes={num_classes + 1}{sizes})"
    )


def _read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    obj = load_file(path, argument="checkpoint")
    meta = obj.get("maskd") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping) or "model" not in meta or "weights_prefix" not in meta:
        raise UserValueError(
            f"checkpoint: {str(path)!r} is not a checkpoint of 'maskd train' or 'maskd distill' "
            "(no model description inside)"
        )
    prefix = meta["weights_prefix"]
    state = {k[len(prefix) :]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
    return state, dict(meta)


def _load_strict(model: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    """``load_state_dict`` that tolerates only BatchNorm counters (absent in FrozenBatchNorm2d)."""
    result = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise UserValueError(
            f"checkpoint {where!r} does not match its model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> tuple[Path, dict[str, Any]]:
    """Write the trained (train) or distilled (distill) model of ``checkpoint`` to ``out``.

    The weights are first loaded strictly into a freshly built registry model, so a file
    that would not load is never written.

    Returns:
        ``(out, info)`` with info = ``{model, num_classes, options, torchvision,
        torchvision_gap, maskd}`` (see the module docstring).
    """
    from maskd import models

    state, meta = _read_checkpoint(Path(checkpoint))
    spec = meta["model"]
    num_classes = int(meta["num_classes"])
    options = dict(spec.get("options") or {})
    model, _ = models.build(spec["name"], num_classes, **options)
    _load_strict(model, state, str(checkpoint))
    out = Path(out)
    atomic_save(native_state_dict(model), out)
    info = {
        "model": spec["name"],
        "num_classes": num_classes,
        "options": options,
        "torchvision": torchvision_call(spec["name"], num_classes, options),
        "torchvision_gap": torchvision_gap(spec["name"], options),
        "maskd": maskd_call(spec["name"], num_classes, options, str(out)),
    }
    out.with_name(out.name + ".json").write_text(json.dumps(info, indent=2) + "\n")
    return out, info
