"""Vision Transformer (Dosovitskiy et al. 2021) sized for CIFAR.

Patch size 4 turns a 32x32 image into 8x8 = 64 tokens plus a class token. Learned position
embeddings, pre-norm blocks (LayerNorm -> attention / MLP -> residual), GELU, stochastic depth
increasing linearly over depth, and a linear head on the final class token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._registry import register_model
from .layers import (
    Attention,
    DropPath,
    Mlp,
    classifier_head,
    init_patch_embed,
    init_transformer_weights,
    scale_embed_dim,
)

__all__ = ["VisionTransformer", "vit_small", "vit_tiny"]


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(Attn(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT classifier on ``img_size x img_size`` inputs cut into ``patch_size`` patches.

    ``drop_path_rate`` is the stochastic-depth rate of the last block; block ``i`` uses
    ``drop_path_rate * i / (depth - 1)``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 32,
        patch_size: int = 4,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.img_size = img_size
        self.num_features = embed_dim
        num_patches = (img_size // patch_size) ** 2

        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(
            *(
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rate)
                for rate in rates
            )
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = classifier_head(embed_dim, num_classes)

        self.apply(init_transformer_weights)
        init_patch_embed(self.patch_embed)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameter names usually excluded from weight decay."""
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: Tensor) -> Tensor:
        """Final-norm class token ``(B, embed_dim)``."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected {self.img_size}x{self.img_size} inputs, got {tuple(x.shape[-2:])}"
            )
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, num_patches, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.norm(self.blocks(x))
        return x[:, 0]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def _vit(
    embed_dim: int,
    num_heads: int,
    num_classes: int,
    in_chans: int,
    img_size: int,
    width: float,
    **kwargs: Any,
) -> VisionTransformer:
    num_heads = kwargs.pop("num_heads", num_heads)
    embed_dim = scale_embed_dim(kwargs.pop("embed_dim", embed_dim), width, num_heads)
    return VisionTransformer(
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        embed_dim=embed_dim,
        num_heads=num_heads,
        **kwargs,
    )


@register_model
def vit_small(
    num_classes: int = 10, in_chans: int = 3, img_size: int = 32, width: float = 1.0, **kwargs: Any
) -> VisionTransformer:
    """ViT-S/4 for CIFAR: embed 384, depth 12, 6 heads; 21.4M params at 100 classes, 32x32."""
    return _vit(384, 6, num_classes, in_chans, img_size, width, **kwargs)


@register_model
def vit_tiny(
    num_classes: int = 10, in_chans: int = 3, img_size: int = 32, width: float = 1.0, **kwargs: Any
) -> VisionTransformer:
    """ViT-Ti/4 for CIFAR: embed 192, depth 12, 3 heads; 5.4M params at 100 classes, 32x32."""
    return _vit(192, 3, num_classes, in_chans, img_size, width, **kwargs)
