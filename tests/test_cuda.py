"""GPU checks of the distillation terms and stage 2 (skipped where CUDA is not available)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from maskd.distiller import Distiller, total_loss
from maskd.terms import channel_wise_divergence, fitnet_loss, pixel_kd_loss
from maskd.tokens import ReceptiveTokens
from tiny_detectors import detection_batch, detector

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FPN = "backbone.fpn"


@cuda
def test_term_kernels_on_cuda_match_the_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 8, 16, 20, generator=g), torch.randn(2, 8, 16, 20, generator=g)
    for fn in (fitnet_loss, channel_wise_divergence, pixel_kd_loss):
        torch.testing.assert_close(fn(s.cuda(), t.cuda()).cpu(), fn(s, t), rtol=1e-5, atol=1e-6)


@cuda
def test_distillation_step_with_every_term_on_cuda_under_bf16_autocast() -> None:
    student = detector("fcos", 0, FrozenBatchNorm2d).cuda()
    teacher = detector("fcos", 1).cuda()
    torch.manual_seed(3)
    tokens = {FPN: [ReceptiveTokens(256, 4, weighted=True) for _ in range(5)]}
    terms = [
        {"kind": "fitnet", "student": FPN, "teacher": FPN},
        {"kind": "cwd", "student": FPN, "teacher": FPN},
        {"kind": "fgd", "student": FPN, "teacher": FPN, "detector": "fcos"},
    ]
    example = torch.zeros(1, 3, 64, 64, device="cuda")
    maskd = {"kind": "maskd", "student": FPN, "teacher": FPN, "tokens": tokens}
    d = Distiller(student, teacher, [maskd, *terms], example_input=example).train()
    images, targets = detection_batch()
    images = [i.cuda() for i in images]
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    full = {k: float(v.detach()) for k, v in d(images, targets).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = d(images, targets)
    total = total_loss(losses)
    total.backward()
    for key in ("loss_maskd", "loss_fitnet", "loss_cwd", "loss_fgd"):
        value = float(losses[key])
        assert value == value and abs(value - full[key]) <= 0.05 * abs(full[key]) + 1e-3, key
    grads = [p.grad for p in d.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
