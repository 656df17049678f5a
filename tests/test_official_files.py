"""Files released by the authors (hunto/MasKD, commit b5af34f), used as real external inputs.

They live outside the repository, in ``shared/official/`` beside (or inside) the checkout, or
in the folder named by ``MASKD_OFFICIAL_DIR``; every test here skips when they are absent
(a clean clone, CI).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from maskd import load_official_tokens
from maskd.config_files import load_config
from maskd.distiller import Distiller
from maskd.tasks import SegmentationTask

ROOT = Path(__file__).resolve().parents[1]
TOKENS = "deeplabv3_resnet101_citys_mask_tokens.pth"
LOG = "deeplabv3_resnet101_citys_stage1_log.txt"


def _official(name: str) -> Path:
    env = os.environ.get("MASKD_OFFICIAL_DIR")
    folders = [Path(env)] if env else []
    folders += [ROOT / "shared" / "official", ROOT.parent / "shared" / "official"]
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    pytest.skip(f"the authors' released {name} is not here (shared/official or MASKD_OFFICIAL_DIR)")


class Seg19(nn.Module):
    """A small segmenter whose logits have Cityscapes' 19 classes, the tokens' channels."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Conv2d(8, 19, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": self.head(F.relu(self.body(x)))}


def test_released_cityscapes_tokens_drive_a_distillation_step() -> None:
    path = _official(TOKENS)
    raw = torch.load(path, map_location="cpu", weights_only=True)["mask_token"]
    (tok,) = load_official_tokens(path)
    assert (tok.num_tokens, tok.channels, tok.weighted) == (8, 19, False)
    torch.testing.assert_close(tok.mask_token.detach(), raw, rtol=0, atol=0)

    teacher, student = SegmentationTask(Seg19(0), 19), SegmentationTask(Seg19(1), 19)
    layer = "model.head"
    maskd = {"kind": "maskd", "student": layer, "teacher": layer, "tokens": {layer: [tok]},
             "weight": 0.5, "eps": 1e-5, "align": False}  # fmt: skip
    distiller = Distiller(student, teacher, [maskd]).train()
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 32, 64, generator=g)
    targets = torch.randint(0, 19, (2, 32, 64), generator=g)
    losses = distiller(images, targets)

    # By hand, as the authors' segmentation/losses/maskd.py states it, with the file's tokens:
    # L[n,k,c] = sum_p (m s - m t)^2 / (sum_p m + 1e-5), averaged over n, k, c; weight 0.5.
    with torch.no_grad():
        t = teacher.model(images)["out"]  # the distiller keeps the teacher in eval mode
        masks = torch.einsum("kc,nchw->nkhw", raw, t).sigmoid()
    s = student.model(images)["out"]
    m = masks.unsqueeze(2)  # [N, K, 1, H, W]
    diff = (m * s.unsqueeze(1) - m * t.unsqueeze(1)) ** 2  # [N, K, C, H, W]
    area = masks.sum(dim=(2, 3))[:, :, None] + 1e-5
    want = 0.5 * (diff.sum(dim=(3, 4)) / area).mean()
    assert float(masks.std()) > 0.1 and float(masks.min()) < 0.5 < float(masks.max())
    torch.testing.assert_close(losses["loss_maskd"], want)

    # Gradients reach the student, and are the by-hand loss's.
    weight = student.model.head.weight
    (got,) = torch.autograd.grad(losses["loss_maskd"], weight, retain_graph=True)
    (expected,) = torch.autograd.grad(want, weight)
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, expected)
    assert all(p.grad is None for p in teacher.parameters())


def _logged_arguments() -> dict[str, str]:
    text = _official(LOG).read_text()
    line = re.search(r"Namespace\((.*)\)\s*$", text, flags=re.MULTILINE)
    assert line, "no argument line in the log"
    return dict(re.findall(r"(\w+)=('[^']*'|\[[^\]]*\]|[^,]+)", line.group(1)))


@pytest.mark.parametrize("pair", ["deeplabv3_r101_r18", "deeplabv3_r101_mobilenetv3"])
def test_cityscapes_stage1_configs_match_the_logged_run(pair: str) -> None:
    args = _logged_arguments()
    cfg = load_config(ROOT / "configs" / "cityscapes" / pair / "learn_masks.yaml")
    assert cfg["optim"]["lr"] == float(args["lr"])
    assert cfg["optim"]["momentum"] == float(args["momentum"])
    assert cfg["optim"]["weight_decay"] == float(args["weight_decay"])
    assert cfg["trainer"]["max_steps"] == int(args["max_iterations"])
    gpus = int(args["num_gpus"])
    assert cfg["trainer"]["devices"] == gpus
    assert cfg["data"]["batch_size"] * gpus == int(args["batch_size"])
    assert cfg["data"]["size"] == yaml.safe_load(args["crop_size"])
    assert cfg["masks"]["num_tokens"] == 8 and cfg["masks"]["teacher_mode"] == "train"
