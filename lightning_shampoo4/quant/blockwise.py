"""Block-wise absmax quantization, the pure-torch reference.

Layout (SPEC.md section 2), the contract the Triton kernels reproduce exactly:

* A tensor is seen as a matrix of rows (``x.reshape(-1, x.shape[-1])``; a 1-D tensor is one
  row). Each row is cut into blocks of ``block_size`` consecutive elements, the last one
  possibly partial, so a block never spans two rows. For an eigenvector matrix U we quantize
  U^T (``transpose=True``), so every block lies inside one eigenvector.
* One fp32 absmax per block, shape ``(rows, ceil(cols / block_size))``.
* Each value is divided by its block's absmax (a zero block stays zero) and mapped to the
  nearest codebook entry: index = number of codebook midpoints strictly below it.
* 4-bit indices are packed in one flat uint8 buffer over the row-major elements: element 2k
  in the low nibble, 2k + 1 in the high nibble, so odd sizes need no padding per row.
  8-bit indices are one per byte.
* Diag-real (``offdiag=True``, square matrices): the diagonal is kept in fp32 and zeroed
  before the absmax, only the off-diagonal is quantized.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .codebooks import midpoints


class Quantized(NamedTuple):
    """The parts of one quantized tensor; ``diag`` is None unless diag-real."""

    codes: torch.Tensor
    absmax: torch.Tensor
    diag: torch.Tensor | None = None


def packed_numel(numel: int, bits: int) -> int:
    """Bytes of codes for ``numel`` values."""
    return (numel + 1) // 2 if bits == 4 else numel


def _as_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    cols = shape[-1]
    return math.prod(shape[:-1]), cols


def _check_args(bits: int, block_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r} is not supported; choose 4 or 8")
    if block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive integer")


def pack4(idx: torch.Tensor) -> torch.Tensor:
    """Pack a flat uint8 tensor of 4-bit indices two per byte (2k low, 2k+1 high)."""
    idx = idx.reshape(-1)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_zeros(1)])
    pairs = idx.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack4`: the first ``numel`` indices as a flat uint8 tensor."""
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    return out[:numel]


def quantize(
    x: torch.Tensor,
    codebook: torch.Tensor,
    bits: int = 4,
    block_size: int = 64,
    *,
    offdiag: bool = False,
    transpose: bool = False,
) -> Quantized:
    """Quantize ``x`` (any shape, fp32 / bf16 / fp16) block-wise; see the module docstring."""
    _check_args(bits, block_size)
    if codebook.numel() != 2**bits:
        raise ValueError(f"a {bits}-bit codebook needs {2**bits} values, got {codebook.numel()}")
    x = x.detach().float()
    if transpose:
        if x.dim() != 2:
            raise ValueError(f"transpose=True needs a matrix, got shape {tuple(x.shape)}")
        x = x.t()
    diag = None
    if offdiag:
        if x.dim() != 2 or x.shape[0] != x.shape[1]:
            raise ValueError(f"offdiag=True needs a square matrix, got shape {tuple(x.shape)}")
        diag = x.diagonal().clone()
        x = x.clone()
        x.diagonal().zero_()
    rows, cols = _as_rows(tuple(x.shape))
    nblocks = -(-cols // block_size)
    padded = torch.zeros(rows, nblocks * block_size, dtype=torch.float32, device=x.device)
    padded[:, :cols] = x.reshape(rows, cols)
    blocks = padded.view(rows, nblocks, block_size)
    absmax = blocks.abs().amax(dim=-1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalized = blocks / safe.unsqueeze(-1)
    mids = midpoints(codebook.to(x.device))
    idx = torch.bucketize(normalized, mids, right=False).to(torch.uint8)
    idx = idx.view(rows, nblocks * block_size)[:, :cols].reshape(-1)
    codes = pack4(idx) if bits == 4 else idx.contiguous()
    return Quantized(codes, absmax, diag)


def dequantize(
    q: Quantized | tuple,
    codebook: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    bits: int = 4,
    block_size: int = 64,
    *,
    transpose: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rebuild the tensor of ``shape`` (the shape before any transpose) from its parts."""
    _check_args(bits, block_size)
    codes, absmax, diag = Quantized(*q)
    shape = tuple(shape)
    stored = (shape[1], shape[0]) if transpose else shape
    rows, cols = _as_rows(stored)
    numel = rows * cols
    idx = unpack4(codes, numel) if bits == 4 else codes[:numel]
    values = codebook.to(codes.device)[idx.long()].view(rows, cols)
    scale = absmax.reshape(rows, -1).repeat_interleave(block_size, dim=-1)[:, :cols]
    out = (values * scale).view(stored)
    if diag is not None:
        out.diagonal().copy_(diag)
    if transpose:
        out = out.t()
    return out.to(dtype).contiguous()
