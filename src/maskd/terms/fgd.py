"""FGD (Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022).

Per level, with student ``S`` (aligned) and teacher ``T`` features ``[N, C, H, W]``:

- Masks from the ground-truth boxes mapped onto the level's grid: ``M_fg(p) = 1 / area`` of
  the smallest-area box covering ``p`` (its largest ``1/area``; area in cells, ``(y2 − y1 + 1)
  · (x2 − x1 + 1)`` after floor/ceil), 0 elsewhere; ``M_bg = [M_fg = 0] / Σ [M_fg = 0]``.
- Teacher attention with temperature τ: spatial ``A^S = H·W · softmax_p(mean_c |T| / τ)``,
  channel ``A^C = C · softmax_c(mean_p |T| / τ)``.
- Focal terms: ``L_fg = Σ M_fg A^S A^C (S − T)² / N`` and ``L_bg`` likewise with ``M_bg``.
- Attention transfer: ``L_at = (Σ |A^C_S − A^C_T| + Σ |A^S_S − A^S_T|) / N``, the student's
  attention computed the same way from ``S``.
- Global relation: a GcBlock per side, ``x + W₂ ReLU(LN(W₁ Σ_p softmax_p(W_k x) x))``;
  ``L_glb = Σ (G_S(S) − G_T(T))² / N``.

``loss = α L_fg + β L_bg + γ L_at + λ L_glb``. Boxes are mapped through the padded input
size (the authors divide by the unpadded image shape; the two agree when no padding is
added). The GcBlocks of both sides train with the student.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskd._checks import check_number
from maskd._precision import accum_dtype
from maskd.errors import UserValueError
from maskd.terms.base import FeatureTerm, TermContext

__all__ = ["FGD_DEFAULTS", "FGDTerm", "GlobalContext", "fgd_attention", "fgd_masks"]

# The authors' coefficients per detector, (temperature, α, β, γ, λ), from yzd-v/FGD's
# configs/distillers/fgd/: fgd_retina_r101_fpn_2x_distill_retina_r50_fpn_2x_coco.py,
# fgd_fcos_r101_distill_fcos_r50_2x_coco.py and
# fgd_faster_rcnn_r101_fpn_2x_distill_faster_rcnn_r50_fpn_2x_coco.py.
FGD_DEFAULTS: dict[str, tuple[float, float, float, float, float]] = {
    "retinanet": (0.5, 0.001, 0.0005, 0.0005, 0.000005),
    "fcos": (0.8, 0.0016, 0.0008, 0.0008, 0.000008),
    "faster_rcnn": (0.5, 0.00005, 0.000025, 0.00005, 0.0000005),
}


def fgd_masks(
    boxes: Sequence[Tensor], input_size: tuple[int, int], height: int, width: int
) -> tuple[Tensor, Tensor]:
    """Foreground and background masks ``[N, H, W]`` of one level.

    Args:
        boxes: per image, ``[B, 4]`` boxes (x1, y1, x2, y2) in input pixels.
        input_size: ``(H_in, W_in)`` of the (padded) input the boxes refer to.
        height, width: the level's grid.
    """
    h_in, w_in = input_size
    device = boxes[0].device if len(boxes) else torch.device("cpu")
    fg = torch.zeros(len(boxes), height, width, device=device)
    for i, b in enumerate(boxes):
        if b.numel() == 0:
            continue
        b = b.detach().double()
        x1 = torch.floor(b[:, 0] / w_in * width).long().clamp(0, width)
        x2 = torch.ceil(b[:, 2] / w_in * width).long().clamp(0, width)
        y1 = torch.floor(b[:, 1] / h_in * height).long().clamp(0, height)
        y2 = torch.ceil(b[:, 3] / h_in * height).long().clamp(0, height)
        area = 1.0 / ((y2 + 1 - y1) * (x2 + 1 - x1)).float()
        for j in range(b.shape[0]):
            window = fg[i, y1[j] : y2[j] + 1, x1[j] : x2[j] + 1]
            torch.maximum(window, area[j], out=window)
    bg = (fg == 0).float()
    bg = bg / bg.sum(dim=(1, 2), keepdim=True).clamp_min(1.0)
    return fg, bg


def fgd_attention(x: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Spatial ``[N, H, W]`` and channel ``[N, C]`` attention of ``x`` ``[N, C, H, W]``."""
    n, c, h, w = x.shape
    value = x.to(accum_dtype(x)).abs()
    spatial = h * w * torch.softmax(value.mean(dim=1).reshape(n, -1) / temperature, dim=1)
    channel = c * torch.softmax(value.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial.reshape(n, h, w), channel


class GlobalContext(nn.Module):
    """FGD's GcBlock: ``x + W₂ ReLU(LN(W₁ c))`` with the attention-pooled context ``c``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 2, 1)
        self.mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.mask.bias)
        nn.init.zeros_(self.transform[-1].weight)  # starts as the identity
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        weights = torch.softmax(self.mask(x).reshape(n, 1, -1), dim=2)  # [N, 1, HW]
        context = torch.bmm(x.reshape(n, c, -1), weights.transpose(1, 2))  # [N, C, 1]
        return x + self.transform(context.reshape(n, c, 1, 1))


class FGDTerm(FeatureTerm):
    """Focal and global distillation of aligned features (detection; needs boxes).

    Args:
        detector: ``retinanet``, ``fcos`` or ``faster_rcnn``: the authors' coefficients
            (:data:`FGD_DEFAULTS`), each overridable below.
        temperature, alpha, beta, gamma, lambda_: τ, α (foreground), β (background),
            γ (attention), λ (global relation).
        **kwargs: :class:`~maskd.terms.base.FeatureTerm`'s; ``align`` defaults to ``auto``
            (a 1x1 conv only where channels differ, as the authors).
    """

    kind = "fgd"
    default_align = "auto"

    def __init__(
        self,
        *args: object,
        detector: str = "retinanet",
        temperature: float | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        gamma: float | None = None,
        lambda_: float | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if detector not in FGD_DEFAULTS:
            raise UserValueError(
                f"fgd term: detector must be one of {sorted(FGD_DEFAULTS)}, got {detector!r}"
            )
        given = (temperature, alpha, beta, gamma, lambda_)
        values = [d if v is None else v for v, d in zip(given, FGD_DEFAULTS[detector], strict=True)]
        for label, v in zip(
            ("temperature", "alpha", "beta", "gamma", "lambda_"), values, strict=True
        ):
            check_number(v, f"fgd term: {label}", low=0, low_open=label == "temperature")
        self.detector = detector
        self.temperature, self.alpha, self.beta, self.gamma, self.lambda_ = map(float, values)
        self.student_context = nn.ModuleList()
        self.teacher_context = nn.ModuleList()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, temperature={self.temperature}, alpha={self.alpha}, "
            f"beta={self.beta}, gamma={self.gamma}, lambda_={self.lambda_}"
        )

    def build(
        self, student: Sequence[Tensor], teacher: Sequence[Tensor], levels: list[str]
    ) -> None:
        super().build(student, teacher, levels)
        self.student_context = nn.ModuleList(
            GlobalContext(t.shape[1]).to(t.device) for t in teacher
        )
        self.teacher_context = nn.ModuleList(
            GlobalContext(t.shape[1]).to(t.device) for t in teacher
        )

    def level_loss(self, s: Tensor, t: Tensor, index: int, ctx: TermContext) -> Tensor:
        if ctx.boxes is None or ctx.input_size is None:
            raise UserValueError(
                "fgd term needs the ground-truth boxes of the batch, which maskd reads from a "
                "torchvision-style detection transform (model.transform); this student has none"
            )
        n, _, h, w = t.shape
        s, t = s.to(accum_dtype(s)), t.to(accum_dtype(s))
        fg, bg = fgd_masks(ctx.boxes, ctx.input_size, h, w)
        spatial_t, channel_t = fgd_attention(t, self.temperature)
        spatial_s, channel_s = fgd_attention(s, self.temperature)
        weight = spatial_t.unsqueeze(1) * channel_t[:, :, None, None]  # [N, C, H, W]
        sq = weight * (s - t).square()
        fg_loss = (sq * fg.unsqueeze(1)).sum() / n
        bg_loss = (sq * bg.unsqueeze(1)).sum() / n
        at_loss = ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / n
        glb = self.student_context[index](s) - self.teacher_context[index](t)
        glb_loss = glb.square().sum() / n
        return (
            self.alpha * fg_loss
            + self.beta * bg_loss
            + self.gamma * at_loss
            + self.lambda_ * glb_loss
        )
