"""A small model whose layers return a tensor, an ordered dict of two maps (as an FPN does)
and a tuple: shared by the recorder and taps tests."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn


class Split(nn.Module):
    """Returns an OrderedDict of two feature maps, as an FPN does."""

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict(low=x, high=x[:, :, ::2, ::2])


class Merge(nn.Module):
    def forward(self, feats: OrderedDict[str, Tensor], scale: float = 1.0) -> tuple[Tensor, Tensor]:
        return feats["low"] * 2 * scale, feats["high"] + 1


class Counted(nn.Module):
    """Counts its calls (a stopped forward must not reach it)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, pair: tuple[Tensor, Tensor]) -> Tensor:
        self.calls += 1
        return pair[0].mean() + pair[1].mean()


class Tiny(nn.Module):
    """stem (conv, [BatchNorm,] ReLU) → split → merge(·, scale) → head."""

    def __init__(self, norm: bool = False, scale: float = 1.0) -> None:
        super().__init__()
        layers = [nn.Conv2d(3, 4, 3, padding=1), *([nn.BatchNorm2d(4)] if norm else []), nn.ReLU()]
        self.stem = nn.Sequential(*layers)
        self.split = Split()
        self.merge = Merge()
        self.head = Counted()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.merge(self.split(self.stem(x)), self.scale))
