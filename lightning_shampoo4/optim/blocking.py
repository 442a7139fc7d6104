"""How a parameter tensor maps onto Shampoo blocks (``docs/algorithms.md``).

Size-1 dims are squeezed; rank <= 1 tensors get no preconditioner; rank >= 2 tensors are
seen as ``(shape[0], prod(rest))`` (a conv weight O x I x kh x kw becomes O x I*kh*kw); each
dim above ``max_order`` is cut into pieces of ``max_order`` plus a remainder, and every
(row piece, column piece) tile gets its own left and right factor.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple


class Block(NamedTuple):
    """One tile of the matrix view: rows ``r0:r1``, columns ``c0:c1``."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def rows(self) -> int:
        return self.r1 - self.r0

    @property
    def cols(self) -> int:
        return self.c1 - self.c0


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The 2-D view Shampoo preconditions, or None for tensors that get the base update."""
    dims = [d for d in shape if d != 1]
    if len(dims) < 2:
        return None
    return dims[0], math.prod(dims[1:])


def split(size: int, max_order: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` pieces of at most ``max_order`` (3072, 1200 -> 1200, 1200, 672)."""
    return [(s, min(s + max_order, size)) for s in range(0, size, max_order)]


@functools.lru_cache(maxsize=4096)
def blocks_for(shape: tuple[int, ...], max_order: int) -> tuple[tuple[int, int] | None, tuple[Block, ...]]:
    """The matrix view of ``shape`` and its tiles (empty when Shampoo does not apply)."""
    mshape = matrix_shape(shape)
    if mshape is None:
        return None, ()
    rows, cols = mshape
    tiles = tuple(Block(r0, r1, c0, c1) for r0, r1 in split(rows, max_order) for c0, c1 in split(cols, max_order))
    return mshape, tiles
