"""Export a trained or distilled model as a plain state dict that needs no maskd to load.

The file holds only ``{name: tensor}`` in torchvision's module layout: the detector itself,
or the inner torchvision segmenter of a ``SegmentationTask``. It loads

- with maskd: ``maskd.models.build(name, num_classes, weights=path)``;
- without maskd: into the matching torchvision builder, e.g.
  ``torchvision.models.detection.retinanet_resnet50_fpn(weights=None,
  weights_backbone=None, num_classes=K + 1).load_state_dict(torch.load(path))``.

A ``<out>.json`` beside it records the model name, class count, builder options and the
torchvision call that rebuilds the architecture.
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

__all__ = ["export_checkpoint", "native_state_dict", "torchvision_call"]

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


# registry options with no torchvision counterpart (they change no tensor names)
_MASKD_ONLY_OPTIONS = {
    "frozen_bn",
    "trainable_backbone_layers",
    "layers",
    "aux_loss",
    "aux_weight",
    "ignore_index",
}


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


def torchvision_call(name: str, num_classes: int, options: Mapping[str, Any]) -> str:
    """Python code that rebuilds ``name``'s architecture with torchvision alone."""
    # builder options that are torchvision detector arguments (not maskd-only switches)
    sizes = "".join(f", {k}={v!r}" for k, v in options.items() if k not in _MASKD_ONLY_OPTIONS)
    if name in _TORCHVISION_DETECTION:
        return (
            f"torchvision.models.detection.{name}(weights=None, weights_backbone=None, "
            f"num_classes={num_classes + 1}{sizes})"
        )
    if name in _TORCHVISION_SEGMENTATION:
        aux = "" if name.startswith("lraspp") else f", aux_loss={options.get('aux_loss', True)}"
        return (
            f"torchvision.models.segmentation.{name}(weights=None, weights_backbone=None, "
            f"num_classes={num_classes}{aux})"
        )
    arch, _, rest = name.partition("_")
    if rest.startswith("resnet") and rest.endswith("_fpn"):
        backbone = rest.removesuffix("_fpn")
        cls = {"fasterrcnn": "FasterRCNN", "retinanet": "RetinaNet", "fcos": "FCOS"}[arch]
        extra = (
            ""
            if arch == "fasterrcnn"
            else ", returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)"
        )
        return (
            f"torchvision.models.detection.{cls}(resnet_fpn_backbone(backbone_name={backbone!r}, "
            f"weights=None, norm_layer=torch.nn.BatchNorm2d, trainable_layers=5{extra}), "
            f"num_classes={num_classes + 1}{sizes})"
        )
    return f"maskd.models.build({name!r}, {num_classes}) (no torchvision builder of this name)"


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
        ``(out, info)`` with info = ``{model, num_classes, options, torchvision}``.
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
    }
    out.with_name(out.name + ".json").write_text(json.dumps(info, indent=2) + "\n")
    return out, info
