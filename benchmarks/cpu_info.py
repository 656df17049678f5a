"""What a report says of the CPU it ran on: CPU kernels, and so speeds and the floats they
compute, depend on its instruction set (Linux's /proc/cpuinfo; elsewhere what platform knows)."""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_field(field: str) -> str | None:
    """The first ``field : value`` line's value in /proc/cpuinfo, or None where there is none."""
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(field)), None)


def cpu_model() -> str:
    """The CPU's model name and widest vector extension, e.g. ``"AMD EPYC (AVX-512)"``."""
    name = _cpuinfo_field("model name") or platform.processor() or "unknown"
    flags = (_cpuinfo_field("flags") or "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({isa})"


def cpu_flags() -> list[str]:
    """The CPU's bfloat16 and AMX feature flags, or [] where they cannot be read."""
    flags = (_cpuinfo_field("flags") or "").split()
    return sorted(f for f in set(flags) if "bf16" in f or f.startswith("amx"))
