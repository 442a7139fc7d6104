"""CIFAR-style ResNet (He et al. 2016) with BasicBlocks.

The stem is a single 3x3 conv with stride 1 and no max-pool, so 32x32 inputs keep a 32x32 map
in the first stage (the ImageNet stem would shrink them to 8x8 at once). Four stages of
64/128/256/512 channels, global average pooling and a linear classifier.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from ._registry import register_model
from .layers import classifier_head, init_conv_net_weights, scale_channels

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet34"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (a 1x1 conv-BN projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, one BasicBlock stage per entry of ``layers`` (the first at stride 1,
    the rest at stride 2), global average pooling, linear head.

    ``zero_init_residual`` starts every block as the identity (last BN scale = 0), which helps
    large-batch training.
    """

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 10,
        in_chans: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError(f"layers {tuple(layers)} and widths {tuple(widths)} differ in length")
        self.stem = nn.Sequential(
            _conv3x3(in_chans, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages = []
        in_channels = widths[0]
        for i, (num_blocks, channels) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_channels, channels, stride))
                in_channels = channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_channels
        self.fc = classifier_head(in_channels, num_classes)

        self.apply(init_conv_net_weights)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features ``(B, num_features)``."""
        return self.pool(self.stages(self.stem(x))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


def _resnet(
    layers: Sequence[int], num_classes: int, in_chans: int, width: float, **kwargs: Any
) -> ResNet:
    widths = tuple(scale_channels(c, width) for c in kwargs.pop("widths", (64, 128, 256, 512)))
    return ResNet(layers, num_classes=num_classes, in_chans=in_chans, widths=widths, **kwargs)


@register_model
def resnet18(
    num_classes: int = 10, in_chans: int = 3, img_size: int = 32, width: float = 1.0, **kwargs: Any
) -> ResNet:
    """CIFAR ResNet-18, blocks [2, 2, 2, 2]; 11.2M params at 100 classes. ``img_size`` is unused
    (fully convolutional + global pooling)."""
    return _resnet((2, 2, 2, 2), num_classes, in_chans, width, **kwargs)


@register_model
def resnet34(
    num_classes: int = 10, in_chans: int = 3, img_size: int = 32, width: float = 1.0, **kwargs: Any
) -> ResNet:
    """CIFAR ResNet-34, blocks [3, 4, 6, 3]; 21.3M params at 100 classes. ``img_size`` is unused."""
    return _resnet((3, 4, 6, 3), num_classes, in_chans, width, **kwargs)
