"""Align connectors: map a student level onto the teacher's channels before a term's loss."""

from __future__ import annotations

from typing import Literal

from torch import nn

from maskd.errors import UserValueError

__all__ = ["AlignMode", "build_connector"]

AlignMode = bool | Literal["auto"]


def build_connector(c_student: int, c_teacher: int, mode: AlignMode, where: str) -> nn.Module:
    """A 1x1 conv ``C_s → C_t`` (``mode=True``, or ``"auto"`` with different channels), else
    the identity.

    Raises:
        ValueError: ``mode`` is not True/False/"auto", or ``mode=False`` with different channels.
    """
    if mode not in (True, False, "auto"):
        raise UserValueError(f"{where}: align must be true, false or 'auto', got {mode!r}")
    if mode is True or (mode == "auto" and c_student != c_teacher):
        return nn.Conv2d(c_student, c_teacher, kernel_size=1)
    if c_student != c_teacher:
        raise UserValueError(
            f"{where}: align=false needs equal channels, but the student level has "
            f"{c_student} and the teacher level {c_teacher}; use align: true"
        )
    return nn.Identity()
