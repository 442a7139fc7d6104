"""Swin Transformer (Liu et al. 2021) sized for CIFAR.

Patch size 2 and window size 4: a 32x32 image becomes a 16x16 token map, attended inside
non-overlapping 4x4 windows; every second block shifts the windows by half a window (with an
attention mask that keeps the wrapped-around regions apart) so information crosses window
borders. Each window adds a learned relative position bias. Patch merging halves the
resolution and doubles the width between stages (16 -> 8 -> 4 -> 2 at 32x32).

As in the original, a stage whose resolution is at most the window size uses one window
covering the whole map and no shift. Token maps are kept channels-last, ``(B, H, W, C)``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_model
from .layers import (
    DropPath,
    Mlp,
    classifier_head,
    init_patch_embed,
    init_transformer_weights,
    scale_embed_dim,
)

__all__ = ["SwinTransformer", "swin_tiny"]

# Additive attention bias between tokens from different regions of a shifted window. Every token
# sees at least its own region, so no row is fully masked and -inf is safe (and exact).
_MASK_VALUE = float("-inf")


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """``(B, H, W, C)`` -> ``(B * num_windows, window_size**2, C)``, windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, C)


def window_reverse(windows: Tensor, window_size: int, H: int, W: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B * num_windows, window_size**2, C)`` -> ``(B, H, W, C)``."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def relative_position_index(window_size: int) -> Tensor:
    """``(N, N)`` index into the ``(2w-1)**2`` bias table for every query/key pair of a window."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ).flatten(1)  # (2, N)
    relative = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # (2, N, N), >= 0
    return relative[0] * (2 * window_size - 1) + relative[1]


def shifted_window_mask(resolution: int, window_size: int, shift_size: int) -> Tensor:
    """``(num_windows, N, N)`` additive mask for windows cyclically shifted by ``shift_size``.

    After the shift, a window at the map border holds tokens from up to four regions that are
    not neighbours in the image; tokens only attend within their own region.
    """
    region = torch.zeros(1, resolution, resolution, 1)
    bands = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for rows in bands:
        for cols in bands:
            region[:, rows, cols, :] = label
            label += 1
    region = window_partition(region, window_size).squeeze(-1)  # (num_windows, N)
    different = region[:, None, :] != region[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, _MASK_VALUE)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows of ``window_size**2`` tokens with a learned
    relative position bias (one table entry per relative offset and head)."""

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x``: ``(B * num_windows, N, C)``; ``mask``: ``(num_windows, N, N)`` additive, or None."""
        Bw, N, C = x.shape
        qkv = self.qkv(x).view(Bw, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (Bw, heads, N, head_dim)

        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(N, N, self.num_heads).permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:
            num_windows = mask.shape[0]
            # Windows are ordered batch-major, so window i of the flat batch uses mask[i % nW].
            bias = (bias + mask.unsqueeze(1)).repeat(Bw // num_windows, 1, 1, 1)
        dropout_p = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p)
        x = x.transpose(1, 2).reshape(Bw, N, C)
        return self.proj_drop(self.proj(x))


class SwinBlock(nn.Module):
    """Pre-norm Swin block on a ``resolution x resolution`` map: (shifted) window attention, then
    MLP, each with a residual and stochastic depth."""

    def __init__(
        self,
        dim: int,
        resolution: int,
        num_heads: int,
        window_size: int = 4,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if resolution <= window_size:  # one window covers the map: nothing to shift
            window_size, shift_size = resolution, 0
        if resolution % window_size:
            raise ValueError(f"resolution {resolution} is not divisible by window_size {window_size}")
        self.resolution = resolution
        self.window_size = window_size
        self.shift_size = shift_size

        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        mask = shifted_window_mask(resolution, window_size, shift_size) if shift_size else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        shortcut = x
        x = self.norm1(x)
        if self.shift_size:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = self.attn(window_partition(x, self.window_size), self.attn_mask)
        x = window_reverse(windows, self.window_size, H, W)
        if self.shift_size:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, window_size={self.window_size}, shift_size={self.shift_size}"


class PatchMerging(nn.Module):
    """Halve the resolution and double the width: concatenate each 2x2 neighbourhood (4C), then
    LayerNorm and a bias-free Linear(4C, 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinTransformer(nn.Module):
    """Swin classifier: patch embedding, stages of Swin blocks with patch merging in between,
    final LayerNorm, global average pooling over tokens, linear head.

    Stage ``i`` has width ``embed_dim * 2**i`` and ``num_heads[i]`` heads. ``drop_path_rate`` is
    the stochastic-depth rate of the last block, increasing linearly over all blocks.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 32,
        patch_size: int = 2,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        resolutions = _stage_resolutions(img_size, patch_size, window_size, len(depths))
        self.img_size = img_size

        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = iter(torch.linspace(0, drop_path_rate, sum(depths)).tolist())
        stages = []
        for i, (depth, heads, resolution) in enumerate(zip(depths, num_heads, resolutions)):
            dim = embed_dim * 2**i
            layers: list[nn.Module] = [
                SwinBlock(
                    dim,
                    resolution,
                    heads,
                    window_size=window_size,
                    shift_size=window_size // 2 if j % 2 else 0,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=next(rates),
                )
                for j in range(depth)
            ]
            if i < len(depths) - 1:
                layers.append(PatchMerging(dim))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = classifier_head(self.num_features, num_classes)

        self.apply(init_transformer_weights)
        init_patch_embed(self.patch_embed)

    def no_weight_decay_keywords(self) -> set[str]:
        """Parameter-name substrings usually excluded from weight decay."""
        return {"relative_position_bias_table"}

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features ``(B, num_features)``."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected {self.img_size}x{self.img_size} inputs, got {tuple(x.shape[-2:])}"
            )
        x = self.patch_embed(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        x = self.stages(self.pos_drop(self.patch_norm(x)))
        return self.norm(x).mean(dim=(1, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def _stage_resolutions(img_size: int, patch_size: int, window_size: int, num_stages: int) -> list[int]:
    """Token-map side length of each stage; ValueError if patching, windowing or merging cannot work."""
    if img_size % patch_size:
        raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
    resolutions = [img_size // patch_size]
    for stage in range(num_stages):
        resolution = resolutions[-1]
        if resolution > window_size and resolution % window_size:
            raise ValueError(
                f"img_size={img_size} gives a {resolution}x{resolution} token map at stage {stage}, "
                f"which is not divisible into {window_size}x{window_size} windows"
            )
        if stage == num_stages - 1:
            break
        if resolution % 2:
            raise ValueError(
                f"img_size={img_size} gives an odd {resolution}x{resolution} token map at stage "
                f"{stage}, which patch merging cannot halve; use an img_size divisible by "
                f"patch_size * 2**(num_stages - 1) = {patch_size * 2 ** (num_stages - 1)}"
            )
        resolutions.append(resolution // 2)
    return resolutions


@register_model
def swin_tiny(
    num_classes: int = 10, in_chans: int = 3, img_size: int = 32, width: float = 1.0, **kwargs: Any
) -> SwinTransformer:
    """Swin-T for CIFAR: patch 2, window 4, embed 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24);
    27.5M params at 100 classes, 32x32.

    ``width`` scales ``embed_dim``, rounded so every stage width stays divisible by its heads.
    Passing ``depths`` alone picks heads 3, 6, 12, ... for that many stages.
    """
    depths = tuple(kwargs.pop("depths", (2, 2, 6, 2)))
    num_heads = tuple(kwargs.pop("num_heads", (3 * 2**i for i in range(len(depths)))))
    # Stage i has width embed_dim * 2**i, divisible by num_heads[i] iff embed_dim is a multiple of
    # num_heads[i] / gcd(num_heads[i], 2**i).
    multiple = math.lcm(*(h // math.gcd(h, 2**i) for i, h in enumerate(num_heads)))
    embed_dim = scale_embed_dim(kwargs.pop("embed_dim", 96), width, multiple)
    return SwinTransformer(
        num_classes=num_classes,
        in_chans=in_chans,
        img_size=img_size,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        **kwargs,
    )
