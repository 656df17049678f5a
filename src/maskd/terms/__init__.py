"""Stage-2 distillation terms: one module per method, built from a spec.

A spec is a mapping such as ``{"kind": "cwd", "student": "backbone.fpn", "teacher":
"backbone.fpn", "weight": 3.0, "tau": 4.0}``: ``kind`` picks the term, every other key is
an argument of its class (see each module). :class:`maskd.Distiller` takes a list of them.

| kind | paper | compares | options |
|---|---|---|---|
| ``maskd`` | Huang et al. 2023 | aligned features inside the teacher's token masks | ``tokens``, ``tokens_from``, ``level_weights``, ``custom_mask_warmup``, ``eps``, ``token_weights``, ``align`` |
| ``fitnet`` | Romero et al. 2015 | aligned features, MSE | ``align`` |
| ``cwd`` | Shu et al. 2021 | per-channel spatial softmax, KL | ``tau``, ``align`` |
| ``fgd`` | Yang et al. 2022 | box-split, attention-weighted features; global relation | ``detector``, ``temperature``, ``alpha``, ``beta``, ``gamma``, ``lambda_`` |
| ``logits_kd`` | Hinton et al. 2015 | per-pixel class distribution, KL | ``tau`` |
| ``retinanet_l1`` | Huang et al. 2023 (their code) | RetinaNet box-regression outputs, L1 | (none) |
| ``rcnn_smoothl1`` | Huang et al. 2023 (their code) | Faster R-CNN RoI box regression, SmoothL1 | (none) |

Every term takes ``weight`` and ``name``; the layer terms (all but the last two) also
``student``, ``teacher`` (layer paths) and ``resize``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from maskd.errors import UserTypeError, UserValueError
from maskd.terms.base import (
    DryRun,
    FeatureTerm,
    Term,
    TermContext,
    TermInputs,
    is_diagnostic,
    total_loss,
)
from maskd.terms.cwd import CWDTerm, channel_wise_divergence
from maskd.terms.fgd import FGDTerm, fgd_attention, fgd_masks
from maskd.terms.fitnet import FitNetTerm, fitnet_loss
from maskd.terms.head import HeadTerm
from maskd.terms.logits_kd import LogitsKDTerm, pixel_kd_loss
from maskd.terms.maskd import MaskdTerm
from maskd.terms.rcnn_smoothl1 import RCNNSmoothL1Term
from maskd.terms.retinanet_l1 import RetinaNetL1Term

__all__ = [
    "TERMS",
    "CWDTerm",
    "DryRun",
    "FGDTerm",
    "FeatureTerm",
    "FitNetTerm",
    "HeadTerm",
    "LogitsKDTerm",
    "MaskdTerm",
    "RCNNSmoothL1Term",
    "RetinaNetL1Term",
    "Term",
    "TermContext",
    "TermInputs",
    "build_term",
    "channel_wise_divergence",
    "check_spec",
    "fgd_attention",
    "fgd_masks",
    "fitnet_loss",
    "is_diagnostic",
    "pixel_kd_loss",
    "total_loss",
]

TERMS: dict[str, type[Term]] = {
    cls.kind: cls
    for cls in (
        MaskdTerm,
        FitNetTerm,
        CWDTerm,
        FGDTerm,
        LogitsKDTerm,
        RetinaNetL1Term,
        RCNNSmoothL1Term,
    )
}


def _options(cls: type[Term]) -> list[str]:
    """The option names a term kind takes (its and its bases' constructor arguments)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if not (isinstance(klass, type) and issubclass(klass, Term)):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"):
                names.append(p.name)
    return sorted(set(names))


def _required(cls: type[Term]) -> list[str]:
    if not issubclass(cls, FeatureTerm):
        return []
    return ["student", "teacher", "tokens"] if cls is MaskdTerm else ["student", "teacher"]


def check_spec(spec: object, complete: bool = True) -> type[Term]:
    """The term class of a spec whose kind and option names are valid (values unchecked).

    With ``complete=False`` the layer paths and a ``maskd`` term's tokens may be missing
    (filled in later, as ``maskd distill`` does from its other options).

    Raises:
        ValueError: unknown ``kind`` or option (the valid ones are named), a layer path or
            the tokens missing.
        TypeError: ``spec`` is not a mapping.
    """
    if not isinstance(spec, Mapping):
        raise UserTypeError(f"a distillation term must be a mapping with a 'kind', got {spec!r}")
    kind = spec.get("kind")
    if not isinstance(kind, str) or kind not in TERMS:
        raise UserValueError(
            f"unknown distillation term kind {kind!r}; valid kinds: {sorted(TERMS)}"
        )
    cls = TERMS[kind]
    valid = _options(cls)
    unknown = sorted(str(k) for k in spec if k != "kind" and k not in valid)
    if unknown:
        raise UserValueError(f"{kind} term: unknown options {unknown}; valid options: {valid}")
    missing = [k for k in _required(cls) if k not in spec] if complete else []
    if missing:
        what = {"student": "student layer path", "teacher": "teacher layer path"}
        raise UserValueError(
            f"{kind} term: {' and '.join(what.get(k, k) for k in missing)} missing"
        )
    return cls


def build_term(spec: Mapping[str, object] | Term) -> Term:
    """A term from its spec (a built term is returned as it is).

    Raises:
        ValueError: unknown ``kind`` or option, or a bad option value (the valid choices are
            named).
        TypeError: ``spec`` is not a mapping, or an option value has the wrong type.
    """
    if isinstance(spec, Term):
        return spec
    cls = check_spec(spec)
    return cls(**{k: v for k, v in spec.items() if k != "kind"})
