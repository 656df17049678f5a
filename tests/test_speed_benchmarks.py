"""The speed benchmarks of the quality table's steps (memory layout, mixed precision, teacher
cache), at a small size: each variant pair computes the same losses (bfloat16: close ones),
and the cache variants do what they say (the hit steps are served, the miss steps computed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def small(monkeypatch):
    """The benchmarks at 64 px, batch 2."""
    sys.path.insert(0, str(BENCHMARKS))
    import memory_format
    import teacher_cache

    for module in (memory_format, teacher_cache):
        monkeypatch.setattr(module, "BATCH", 2)
    monkeypatch.setattr(memory_format, "SIZE", 64)
    monkeypatch.setattr(
        memory_format, "STUDENT", ("fcos_resnet18_fpn", {"min_size": 64, "max_size": 64})
    )
    monkeypatch.setattr(
        memory_format, "TEACHER", ("fcos_resnet50_fpn", {"min_size": 64, "max_size": 64})
    )
    monkeypatch.setattr(teacher_cache, "STUDENT", memory_format.STUDENT)
    monkeypatch.setattr(teacher_cache, "TEACHER", memory_format.TEACHER)
    torch.set_num_threads(1)
    return memory_format, teacher_cache


def test_both_layouts_give_the_same_losses(small) -> None:
    memory_format, _ = small
    out = memory_format.measure_pairs(memory_format.layouts, steps=1, warmup=0)
    assert set(out) == {"teacher", "student", "maskd"}
    for kind, result in out.items():
        first = result["first_step_losses"]
        assert first["nchw"].keys() == first["nhwc"].keys() and first["nchw"], kind
        assert result["first_step_max_relative_loss_difference"] < 1e-4, kind
        assert result["paired_median_speedup"] > 0
    assert "loss_maskd" in out["maskd"]["first_step_losses"]["nhwc"]


def test_the_cached_step_gives_the_plain_steps_losses(small) -> None:
    _, teacher_cache = small
    out = teacher_cache.measure(steps=1, warmup=0)
    assert out["first_step_losses"]["plain"].keys() == out["first_step_losses"]["miss"].keys()
    assert out["first_step_max_relative_loss_difference"] < 1e-4
    assert out["paired_median_ratio_to_plain"]["plain"] == 1.0
    # a sample's trunk output: C3-C5 of ResNet-50 at 64 px (8x8, 4x4, 2x2), float32
    assert out["cache_bytes_per_sample"] == 4 * (512 * 64 + 1024 * 16 + 2048 * 4)


def test_bfloat16_steps_run_under_autocast_and_stay_close(small) -> None:
    import mixed_precision

    memory_format, _ = small
    out = memory_format.measure_pairs(mixed_precision.precisions, steps=2, warmup=0)
    assert set(out) == {"teacher", "student", "maskd"}
    for kind, result in out.items():
        full, half = result["first_step_losses"]["float32"], result["first_step_losses"]["bfloat16"]
        assert full.keys() == half.keys() and full, kind
        rel = max(abs(half[k] - v) / abs(v) for k, v in full.items())
        assert rel == pytest.approx(result["first_step_max_relative_loss_difference"])
        # bfloat16 rounds the forward: other values, within a few percent
        assert 0 < rel < 0.05, kind
        times = result["all_step_s"]
        ratios = sorted(a / b for a, b in zip(times["float32"], times["bfloat16"], strict=True))
        assert result["paired_median_speedup"] == pytest.approx(sum(ratios) / 2)
    assert "loss_maskd" in out["maskd"]["first_step_losses"]["bfloat16"]


def test_a_report_is_written_where_out_says(small, tmp_path) -> None:
    import argparse
    import json

    memory_format, _ = small
    args = argparse.Namespace(out=tmp_path / "new", steps=1, warmup=0)
    report = memory_format.header("memory_format", args, maskd="T = 6")
    path = memory_format.write_report(args, "memory_format", report)
    assert path == tmp_path / "new" / "memory_format_cpu.json"
    assert json.loads(path.read_text()) == report
    assert report["setting"]["steps"] == 1 and report["setting"]["batch"] == 2


def test_the_cpu_is_named_with_its_vector_and_bfloat16_extensions(monkeypatch, tmp_path) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    import cpu_info

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 avx512f avx512_bf16 "
        "amx_tile amx_bf16 sse\nprocessor\t: 1\nmodel name\t: Some Xeon\n"
    )
    monkeypatch.setattr(cpu_info, "CPUINFO", info)
    assert cpu_info.cpu_model() == "Some Xeon (AVX-512)"
    assert cpu_info.cpu_flags() == ["amx_bf16", "amx_tile", "avx512_bf16"]
    info.write_text("model name\t: Old Core\nflags\t\t: fpu sse avx2\n")
    assert (cpu_info.cpu_model(), cpu_info.cpu_flags()) == ("Old Core (AVX2)", [])
    monkeypatch.setattr(cpu_info, "CPUINFO", tmp_path / "missing")
    assert cpu_info.cpu_flags() == [] and cpu_info.cpu_model().endswith("(no AVX2)")
