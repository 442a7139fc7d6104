"""Small value types passed to the kernel entry points (never stored in optimizer state)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class QuantizedMatrix(NamedTuple):
    """A square ``order x order`` matrix stored block-wise quantized (see ``quant.blockwise``).

    ``diag`` is the fp32 diagonal of a diag-real matrix, or None. ``symmetric``: only the
    strict upper triangle is stored (``quant.quantize_symmetric``; ``absmax`` flat).
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    diag: torch.Tensor | None
    order: int
    codebook: torch.Tensor
    bits: int
    block_size: int
    symmetric: bool = False
