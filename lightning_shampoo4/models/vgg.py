"""CIFAR VGG with BatchNorm (Simonyan & Zisserman 2015; the CIFAR variant with one linear head).

At 32x32 the five max-pools leave a 1x1x512 map, so the classifier is a single
``Linear(512, num_classes)`` instead of the ImageNet three-layer head. For other input sizes a
max-pool that would take the map below 1x1 is left out, and an adaptive average pool to 1x1
(a no-op at 32x32) feeds the head, so any ``img_size >= 1`` works.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

from torch import Tensor, nn

from ._registry import register_model
from .layers import classifier_head, init_conv_net_weights, scale_channels

__all__ = ["VGG", "VGG19_CFG", "vgg19_bn"]

LayerSpec = Union[int, str]

# Output channels of each 3x3 conv-BN-ReLU; "M" is a 2x2 max-pool.
VGG19_CFG: tuple[LayerSpec, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, 256, "M",
    512, 512, 512, 512, "M",
    512, 512, 512, 512, "M",
)  # fmt: skip


class VGG(nn.Module):
    """VGG feature stack from ``cfg`` (ints: conv-BN-ReLU channels, "M": max-pool), global average
    pooling and a linear head. Max-pools are skipped once the map is 1 pixel wide for ``img_size``."""

    def __init__(
        self,
        cfg: Sequence[LayerSpec],
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 32,
    ) -> None:
        super().__init__()
        if img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {img_size}")
        layers: list[nn.Module] = []
        channels, size = in_chans, img_size
        for spec in cfg:
            if spec == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2, 2))
                    size //= 2
            else:
                out_channels = int(spec)
                layers += [
                    nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
                channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels
        self.classifier = classifier_head(channels, num_classes)

        self.apply(init_conv_net_weights)
        if isinstance(self.classifier, nn.Linear):
            nn.init.normal_(self.classifier.weight, std=0.01)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features ``(B, num_features)``."""
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))


@register_model
def vgg19_bn(
    num_classes: int = 10, in_chans: int = 3, img_size: int = 32, width: float = 1.0, **kwargs: Any
) -> VGG:
    """CIFAR VGG-19 with BatchNorm; 20.1M params at 100 classes."""
    cfg = [spec if spec == "M" else scale_channels(int(spec), width) for spec in VGG19_CFG]
    return VGG(cfg, num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
