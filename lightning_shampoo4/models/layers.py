"""Building blocks shared by the model zoo: width scaling, stochastic depth, attention, MLP."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def scale_channels(channels: int, width: float, min_value: int = 4) -> int:
    """``channels * width`` rounded to an int, at least ``min_value``, so thin test models stay valid."""
    return max(min_value, int(round(channels * width)))


def scale_embed_dim(dim: int, width: float, multiple: int) -> int:
    """``dim * width`` rounded to a multiple of ``multiple`` (the head count), at least one multiple."""
    return multiple * max(1, int(round(dim * width / multiple)))


def classifier_head(in_features: int, num_classes: int) -> nn.Module:
    """Linear classifier, or an identity when ``num_classes == 0`` (the model returns features)."""
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``drop_prob``.

    Survivors are scaled by ``1 / (1 - drop_prob)`` so the expected value is unchanged; an
    identity in eval mode or when ``drop_prob == 0``.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(mask_shape).bernoulli_(keep_prob)
    return x * mask / keep_prob


class DropPath(nn.Module):
    """Module form of :func:`drop_path`, applied to a residual branch before the addition."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """Transformer feed-forward block: Linear -> GELU -> Dropout -> Linear -> Dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Global multi-head self-attention over tokens ``(B, N, C)``, via fused SDPA."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        dropout_p = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


def init_transformer_weights(module: nn.Module) -> None:
    """Init for transformer submodules (use with ``model.apply``).

    Linear weights ~ trunc_normal(std=0.02) and zero biases keep the residual stream small at
    the start; LayerNorm starts as the identity.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_patch_embed(conv: nn.Conv2d) -> None:
    """Init a patch-embedding conv like the linear layer it is (xavier on the flattened kernel)."""
    nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def init_conv_net_weights(module: nn.Module) -> None:
    """Init for conv nets (use with ``model.apply``): kaiming-normal convs (fan_out, ReLU), BN as
    the identity, zero biases."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
