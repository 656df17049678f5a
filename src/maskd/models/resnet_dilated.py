"""A ResNet-18 that accepts dilation, for output-stride-8 segmentation backbones.

torchvision's ``BasicBlock`` raises on ``dilation > 1``, so ResNet-18/34 cannot be built
with ``replace_stride_with_dilation``. :class:`DilatedBasicBlock` is a drop-in block with the
same attribute names, so the network is torchvision's own ``ResNet`` class and its state-dict
keys are exactly those of ``torchvision.models.resnet18`` (ImageNet weights load unchanged).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torchvision.models.resnet import ResNet

from maskd.errors import UserValueError


class DilatedBasicBlock(nn.Module):
    """ResNet basic block (two 3×3 convs) whose convs may be dilated.

    Both 3×3 convs use the block's dilation with ``padding = dilation``, so a stride-1
    block keeps the spatial size: input ``[N, inplanes, H, W]`` →
    output ``[N, planes, H/stride, W/stride]``.
    """

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise UserValueError(
                f"DilatedBasicBlock supports groups=1 and base_width=64 only, "
                f"got groups={groups}, base_width={base_width}"
            )
        if dilation < 1:
            raise UserValueError(f"dilation must be >= 1, got {dilation}")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(
            inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def resnet18_dilated(
    replace_stride_with_dilation: Sequence[bool] = (False, True, True),
    norm_layer: Callable[..., nn.Module] | None = None,
) -> ResNet:
    """ResNet-18 with strides of the chosen stages replaced by dilation.

    With the default ``(False, True, True)`` the output stride is 8: ``layer4`` returns
    ``[N, 512, H/8, W/8]`` for an input ``[N, 3, H, W]``. Randomly initialised; load
    ImageNet weights with :func:`maskd.models.weights.load_backbone_weights`.
    """
    flags = list(replace_stride_with_dilation)
    if len(flags) != 3:
        raise UserValueError(
            f"replace_stride_with_dilation must have 3 entries (layer2..layer4), got {flags}"
        )
    return ResNet(
        DilatedBasicBlock,  # type: ignore[arg-type]
        [2, 2, 2, 2],
        replace_stride_with_dilation=flags,
        norm_layer=norm_layer,
    )
