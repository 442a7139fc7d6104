"""Pure-torch implementations of the kernel entry points: run anywhere, define correctness."""

from __future__ import annotations

import torch

from ..quant import Quantized, dequantize, dequantize_symmetric, quantize, symmetric_panels
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
    """``left @ grad @ right`` in ``dtype`` matmuls, returned in fp32.

    A quantized symmetric root is applied in panels of rows rebuilt one at a time
    (``grad @ right`` as ``(right @ grad^T)^T``), so no dense copy of it exists: the step's
    transient memory stays near the 32-bit step's, which reads its stored dense roots.
    """
    if not (_panelled(left) or _panelled(right)):
        return (materialize(left, dtype) @ grad.to(dtype) @ materialize(right, dtype)).float()
    g_r_t = _apply(right, grad.to(dtype).mT, dtype)  # (grad @ right)^T
    return _apply(left, g_r_t.mT, dtype).float()


def _panelled(root: torch.Tensor | QuantizedMatrix) -> bool:
    return isinstance(root, QuantizedMatrix) and root.symmetric and root.order > 256


def _panel_rows(order: int) -> int:
    """A quarter of the root a panel: measured as fast as one matmul with the whole root."""
    return -(-order // 4)


def _apply(root: torch.Tensor | QuantizedMatrix, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``root @ x`` in ``dtype``; a panelled root a panel of rows at a time."""
    if not _panelled(root):
        return materialize(root, dtype) @ x
    out = torch.empty(root.order, x.shape[1], dtype=dtype, device=x.device)
    q = Quantized(root.codes, root.absmax, root.diag)
    rows = _panel_rows(root.order)
    for r0, r1, panel in symmetric_panels(q, root.codebook, root.order, root.bits, root.block_size, rows=rows):
        torch.mm(panel.to(dtype), x, out=out[r0:r1])
    return out
