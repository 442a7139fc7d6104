"""Pure-torch implementations of the kernel entry points: run anywhere, define correctness."""

from __future__ import annotations

import torch

from ..quant import Quantized, dequantize, dequantize_symmetric, quantize
from .types import QuantizedMatrix

__all__ = ["dequantize", "materialize", "precondition", "quantize"]


def materialize(
    root: torch.Tensor | QuantizedMatrix, dtype: torch.dtype = torch.float32, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """A dense ``dtype`` matrix from a dense or quantized root.

    ``out``: a contiguous ``dtype`` (n, n) workspace to write a quantized root into, so repeated
    steps reuse one buffer; a dense root is returned as it is (converted to ``dtype``).
    """
    if isinstance(root, torch.Tensor):
        return root.to(dtype)
    n = root.order
    if root.symmetric:
        q = Quantized(root.codes, root.absmax, root.diag)
        return dequantize_symmetric(q, root.codebook, n, root.bits, root.block_size, dtype=dtype, out=out)
    return dequantize(
        Quantized(root.codes, root.absmax, root.diag),
        root.codebook,
        (n, n),
        root.bits,
        root.block_size,
        dtype=dtype,
        out=out,
    )


def precondition(
    grad: torch.Tensor,
    left: torch.Tensor | QuantizedMatrix,
    right: torch.Tensor | QuantizedMatrix,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``left @ grad @ right`` in ``dtype`` matmuls, returned in fp32."""
    out = materialize(left, dtype) @ grad.to(dtype) @ materialize(right, dtype)
    return out.float()
