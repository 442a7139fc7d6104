"""Small models for the 8x8 digits data (1 channel, 10 classes); they train in seconds on a CPU.

Both work at any ``img_size``: the MLP flattens ``in_chans * img_size**2`` inputs, the CNN
ends in global average pooling.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from ._registry import register_model
from .layers import classifier_head, init_conv_net_weights, scale_channels

__all__ = ["MLPClassifier", "SmallCNN", "mlp", "small_cnn"]


class MLPClassifier(nn.Module):
    """Flatten -> ``depth`` x (Linear(hidden) -> GELU) -> Linear(num_classes)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 8,
        hidden: int = 256,
        depth: int = 2,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        layers: list[nn.Module] = [nn.Flatten()]
        in_features = in_chans * img_size * img_size
        for _ in range(depth):
            layers += [nn.Linear(in_features, hidden), nn.GELU()]
            in_features = hidden
        self.body = nn.Sequential(*layers)
        self.num_features = hidden
        self.head = classifier_head(hidden, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                # He init keeps activations from shrinking through the un-normalised stack.
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class SmallCNN(nn.Module):
    """3x3 conv-BN-ReLU layers (the first at stride 1, the rest at stride 2), global average
    pooling, linear head."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        channels: Sequence[int] = (32, 64, 128),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = in_chans
        for i, out_channels in enumerate(channels):
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_channels
        self.head = classifier_head(in_channels, num_classes)
        self.apply(init_conv_net_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


@register_model
def mlp(
    num_classes: int = 10, in_chans: int = 1, img_size: int = 8, width: float = 1.0, **kwargs: Any
) -> MLPClassifier:
    """Two-hidden-layer GELU MLP (``hidden=256`` scaled by ``width``); 85k params on 8x8 digits."""
    hidden = scale_channels(kwargs.pop("hidden", 256), width)
    return MLPClassifier(
        num_classes=num_classes, in_chans=in_chans, img_size=img_size, hidden=hidden, **kwargs
    )


@register_model
def small_cnn(
    num_classes: int = 10, in_chans: int = 1, img_size: int = 8, width: float = 1.0, **kwargs: Any
) -> SmallCNN:
    """32-64-128 channel CNN (scaled by ``width``); 94k params on 8x8 digits. ``img_size`` is
    unused (global pooling)."""
    channels = tuple(scale_channels(c, width) for c in kwargs.pop("channels", (32, 64, 128)))
    return SmallCNN(num_classes=num_classes, in_chans=in_chans, channels=channels, **kwargs)
