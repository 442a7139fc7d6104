"""Pure-torch implementations of the kernel entry points: run anywhere, define correctness.

``rebuild`` (``materialize``, ``precondition``): an optional function ``rebuild(root, r0, r1) ->
fp32 (r1 - r0, n)``, rows ``r0 .. r1-1`` of a stored symmetric root, that replaces the torch
rebuild of those rows: the dispatcher passes its ``rebuild_symmetric`` custom op here (the C
kernel on the CPU, Triton on CUDA, bit-identically), so ``torch.compile`` sees one call.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..quant import Quantized, dequantize, dequantize_symmetric, quantize, quantize_symmetric, symmetric_panels
from .types import QuantizedMatrix

__all__ = ["dequantize", "materialize", "precondition", "quantize", "quantize_symmetric"]

RebuildFn = Callable[[QuantizedMatrix, int, int], torch.Tensor]


def materialize(
    root: torch.Tensor | QuantizedMatrix,
    dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
    rebuild: RebuildFn | None = None,
) -> torch.Tensor:
    """A dense ``dtype`` matrix from a dense or quantized root.

    ``out``: a contiguous ``dtype`` (n, n) workspace to write a quantized root into, so repeated
    steps reuse one buffer; a dense root is returned as it is (converted to ``dtype``).
    """
    if isinstance(root, torch.Tensor):
        return root.to(dtype)
    n = root.order
    if root.symmetric and rebuild is not None:
        dense = rebuild(root, 0, n)
        return dense.to(dtype) if out is None else out.copy_(dense)
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
    *,
    rebuild: RebuildFn | None = None,
) -> torch.Tensor:
    """``left @ grad @ right`` in ``dtype`` matmuls, returned in fp32.

    A quantized root is rebuilt dense for its matmul (lone blocks run largest roots first, so
    this adds nothing to the step's peak on the benchmarked models: ``optim.preconditioning``). A
    symmetric root of order above ``PANEL_ORDER`` is applied in panels of rows rebuilt one at a
    time (``grad @ right`` as ``(right @ grad^T)^T``), so with the CPU kernel no dense copy of it
    exists (the torch rebuild of such an order still makes one: its gather index would be
    larger). Panels cost speed: a matmul per quarter of the root, interleaved with its rebuild,
    made the steady step of ``benchmarks/step_time.py``'s MLP 13 % longer than one rebuild and
    one matmul (a one-off comparison: 49.8 against 44.1 ms).
    """
    if not (_panelled(left) or _panelled(right)):
        # a larger stored right root is rebuilt first and freed before the left one is: one
        # product less is held beside it (dense roots are read as they are, in the usual order)
        if isinstance(right, QuantizedMatrix) and right.order > _order(left):
            x = grad.to(dtype) @ materialize(right, dtype, rebuild=rebuild)
            return (materialize(left, dtype, rebuild=rebuild) @ x).float()
        x = materialize(left, dtype, rebuild=rebuild) @ grad.to(dtype)
        return (x @ materialize(right, dtype, rebuild=rebuild)).float()
    g_r_t = _apply(right, grad.to(dtype).mT, dtype, rebuild)  # (grad @ right)^T
    return _apply(left, g_r_t.mT, dtype, rebuild).float()


PANEL_ORDER = 2048  # a dense fp32 root above this takes more than 16 MiB


def _order(root: torch.Tensor | QuantizedMatrix) -> int:
    return root.shape[-1] if isinstance(root, torch.Tensor) else root.order


def _panelled(root: torch.Tensor | QuantizedMatrix) -> bool:
    return isinstance(root, QuantizedMatrix) and root.symmetric and root.order > PANEL_ORDER


def _panel_rows(order: int) -> int:
    """A quarter of the root a panel."""
    return -(-order // 4)


def _panels(root: QuantizedMatrix, rebuild: RebuildFn | None):
    """``(r0, r1, fp32 panel)`` of a symmetric root: from ``rebuild`` when given, else from the
    torch rebuild through one reused buffer (:func:`symmetric_panels`)."""
    n, step = root.order, _panel_rows(root.order)
    if rebuild is not None:
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            yield r0, r1, rebuild(root, r0, r1)
        return
    q = Quantized(root.codes, root.absmax, root.diag)
    yield from symmetric_panels(q, root.codebook, n, root.bits, root.block_size, rows=step)


def _apply(root: torch.Tensor | QuantizedMatrix, x: torch.Tensor, dtype: torch.dtype,
           rebuild: RebuildFn | None = None) -> torch.Tensor:
    """``root @ x`` in ``dtype``; a panelled root a panel of rows at a time."""
    if not _panelled(root):
        return materialize(root, dtype, rebuild=rebuild) @ x
    out = torch.empty(root.order, x.shape[1], dtype=dtype, device=x.device)
    for r0, r1, panel in _panels(root, rebuild):
        torch.mm(panel.to(dtype), x, out=out[r0:r1])
    return out
