"""Stage-2 distillation terms beside MasKD: one module per method, built from a spec.

A spec is a mapping such as ``{"kind": "cwd", "student": "backbone.fpn", "teacher":
"backbone.fpn", "weight": 3.0, "tau": 4.0}``: ``kind`` picks the term, every other key is
an argument of its class (see each module).

| kind | paper | compares | options |
|---|---|---|---|
| ``fitnet`` | Romero et al. 2015 | aligned features, MSE | ``align`` |
| ``cwd`` | Shu et al. 2021 | per-channel spatial softmax, KL | ``tau``, ``align`` |
| ``fgd`` | Yang et al. 2022 | box-split, attention-weighted features; global relation | ``detector``, ``temperature``, ``alpha``, ``beta``, ``gamma``, ``lambda_`` |
| ``logits_kd`` | Hinton et al. 2015 | per-pixel class distribution, KL | ``tau`` |
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from maskd.errors import UserTypeError, UserValueError
from maskd.terms.base import FeatureTerm, TermContext
from maskd.terms.cwd import CWDTerm, channel_wise_divergence
from maskd.terms.fgd import FGDTerm, fgd_attention, fgd_masks
from maskd.terms.fitnet import FitNetTerm, fitnet_loss
from maskd.terms.logits_kd import LogitsKDTerm, pixel_kd_loss

__all__ = [
    "TERMS",
    "CWDTerm",
    "FGDTerm",
    "FeatureTerm",
    "FitNetTerm",
    "LogitsKDTerm",
    "TermContext",
    "build_term",
    "channel_wise_divergence",
    "fgd_attention",
    "fgd_masks",
    "fitnet_loss",
    "pixel_kd_loss",
]

TERMS: dict[str, type[FeatureTerm]] = {
    cls.kind: cls for cls in (FitNetTerm, CWDTerm, FGDTerm, LogitsKDTerm)
}


def _options(cls: type[FeatureTerm]) -> list[str]:
    names: list[str] = []
    for klass in (cls, FeatureTerm):
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"):
                names.append(p.name)
    return sorted(set(names))


def build_term(spec: Mapping[str, object] | FeatureTerm) -> FeatureTerm:
    """A term from its spec (a built term is returned as it is).

    Raises:
        ValueError: unknown ``kind`` or option, or a bad option value (the valid choices are
            named).
        TypeError: ``spec`` is not a mapping.
    """
    if isinstance(spec, FeatureTerm):
        return spec
    if not isinstance(spec, Mapping):
        raise UserTypeError(f"a distillation term must be a mapping with a 'kind', got {spec!r}")
    options = dict(spec)
    kind = options.pop("kind", None)
    if kind not in TERMS:
        raise UserValueError(
            f"unknown distillation term kind {kind!r}; valid kinds: {sorted(TERMS)}"
        )
    cls = TERMS[kind]
    valid = _options(cls)
    unknown = sorted(k for k in options if k not in valid)
    if unknown:
        raise UserValueError(f"{kind} term: unknown options {unknown}; valid options: {valid}")
    missing = [k for k in ("student", "teacher") if k not in options]
    if missing:
        raise UserValueError(f"{kind} term: {' and '.join(missing)} layer path missing")
    return cls(**options)
