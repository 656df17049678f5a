"""What ``trainer.precision=bf16-mixed`` saves on the training steps of the detection quality
table, on this CPU.

Setting: the models, batch and threads of ``benchmarks/memory_format.py`` (FCOS ResNet-50
FPN teacher, FCOS ResNet-18 FPN student, 128 px, batch 16, one thread), every model in
channels-last layout as ``detection_sparse_fast`` trains it. Three steps, each in float32 and
under CPU autocast to bfloat16 (what Lightning's ``bf16-mixed`` does on CPU: the forward's
convolutions and matrix products run in bfloat16, the weights, gradients and optimizer stay
float32):

- ``teacher``: one training step of the teacher;
- ``student``: the same for the student alone;
- ``maskd``: one MasKD distillation step (the table's term, as in memory_format.py).

Each pair runs on two copies of the same initial weights, interleaved step by step; the ratio
of a pair is the median of its per-step ratios (float32 / bfloat16: above 1 means bfloat16 is
faster). The first steps' losses are reported with their relative difference: bfloat16 keeps
8 bits of mantissa, so they agree to about 1e-3, not to rounding; what that does to a trained
model is the quality table's to say (detection_sparse_fast, its own draw).

How much faster depends on the CPU: bfloat16 dot products need AVX512-BF16 or AMX (listed in
the report's ``cpu_flags``); without them oneDNN emulates them and bfloat16 can be slower.

    python benchmarks/mixed_precision.py [--steps 6] [--warmup 1] [--threads 1]

Writes benchmarks/results/mixed_precision_cpu.json.
"""

from __future__ import annotations

import torch

from cpu_info import cpu_flags
from memory_format import (
    TOKENS,
    Step,
    TrainStep,
    header,
    measure_pairs,
    parse_args,
    write_report,
)

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


def precisions(kind: str, num_classes: int, dry) -> dict[str, TrainStep]:
    """The pair this benchmark compares: ``kind``'s channels-last step in float32 and under
    bfloat16 autocast."""
    return {name: Step(kind, torch.channels_last, num_classes, dry, autocast=dtype)
            for name, dtype in PRECISIONS.items()}  # fmt: skip


def main() -> None:
    args = parse_args(__doc__)
    maskd = f"T = {TOKENS} weighted tokens on 5 FPN levels, custom mask on, align"
    report = {
        **header("mixed_precision", args, layout="channels_last", maskd=maskd),
        "cpu_flags": cpu_flags(),
        "steps": measure_pairs(precisions, args.steps, args.warmup),
    }
    write_report(args, "mixed_precision", report)


if __name__ == "__main__":
    main()
