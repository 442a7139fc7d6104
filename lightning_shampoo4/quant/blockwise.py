"""Block-wise absmax quantization, the pure-torch reference.

Layout (docs/algorithms.md), the contract the C and Triton kernels reproduce exactly:

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

Symmetric storage (:func:`quantize_symmetric`): a symmetric matrix keeps its diagonal in fp32
and only its strict upper triangle quantized. The triangle rows ``x[i, i+1:]`` (i = 0 .. n-2)
are the rows of the layout above, concatenated: codes pack the flattened triangle, and each
triangle row has its own blocks, so ``absmax`` is flat with ``ceil((n-1-i) / block_size)``
entries for row i. Blocks inside rows gave a slightly lower error than blocks running across
the flattened triangle (benchmarks/quant_speed.py) for about 2/n more bytes per n^2.

``scale_dtype`` (fp16 / bf16) stores the absmax in 16 bits, rounded to the nearest
representable value, and the block is normalized by that; a block maximum just above a
rounded-down scale takes the codebook's end code. Rounding the scale up instead would inflate
every block maximum by up to one ulp, a bias that compounds in a state re-quantized from itself
(the Cholesky factor, EMA after EMA). fp16 scales need absmaxes in roughly [6e-5, 65504]; bf16
has fp32's range.

Implementation notes. The work runs in chunks of at most ``_CHUNK`` elements (whole rows, or
runs of whole blocks of one long row) through small reused buffers, so temporaries stay bounded
whatever the size, and the input is read in place (no padded or fp32 copy of the whole).
Dequantizing 4-bit codes gathers both values of a byte at once from a 256-entry pair table and
multiplies by the scales broadcast over (rows, blocks, block_size) views.

The index of a normalized value v is found without a search: with K cells per unit,
``cell = trunc((v + 1) * K)`` is monotone in v, so every midpoint in an earlier cell is below v
and every one in a later cell above it; K is chosen so that a cell holds at most one midpoint,
and index = (midpoints in earlier cells) + (v > the cell's midpoint). The cells of the
midpoints come from the same float operations, which makes this equal to counting midpoints,
NaN included (NaN gets the last index, as ``torch.bucketize`` gives). Codebooks that would need
more than 2**16 cells per unit (the 8-bit dynamic map, whose midpoints span seven decades) take
the same cells on a log-like scale instead: the fp32 bit pattern read as an integer, made
monotone in the value (negatives' magnitude bits flipped) and shifted right, so that every
binade gets the same number of cells (2**14 to 2**15 cells in all for the dynamic maps); values
beyond the midpoints' cells are clamped to the first or an empty last cell, NaN to the last.
Only where no shift separates the midpoints does ``torch.bucketize`` run.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from .codebooks import midpoints

# Elements per chunk of work: large enough that the ~20 torch calls per chunk cost little,
# small enough that the ~13 bytes per element of working buffers stay in cache. Inputs of
# fewer than 4 full chunks use chunks of a quarter of their size (at least _CHUNK / 4), so the
# buffers stay near 3 bytes per input element from 2**16 elements up.
_CHUNK = 1 << 16
# Dequantizing runs on every optimizer step (quantizing only at statistics and root updates):
# it works in chunks of up to 2**20 elements, one chunk for any root up to order 1024, so a step
# issues few torch calls; its buffers (~6 bytes per element) stay below the dense output's size
# plus 6 MiB. A symmetric root is rebuilt in one pass up to order 2048 (buffers about twice the
# output's size): the row-chunked path it falls back to beyond is several times slower.
_DEQUANT_CHUNK = 1 << 20
_SYMMETRIC_ONE_PASS = 2048 * 2047 // 2
_MAX_CELLS_LOG2 = 16
_SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def _check_quantize_args(codebook: torch.Tensor, bits: int, block_size: int, scale_dtype: torch.dtype) -> None:
    _check_args(bits, block_size)
    if codebook.numel() != 2**bits:
        raise ValueError(f"a {bits}-bit codebook needs {2**bits} values, got {codebook.numel()}")
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype={scale_dtype!r} is not supported; choose one of {_SCALE_DTYPES}")


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


# -- lookup tables ------------------------------------------------------------------------------
class _IndexTables(NamedTuple):
    """How to turn normalized values into indices; ``cells`` = 0 means use bucketize."""

    mids: torch.Tensor
    cells: int
    base: torch.Tensor | None = None  # uint8, midpoints in earlier cells, per cell
    mid_at: torch.Tensor | None = None  # the cell's midpoint, +inf where it has none
    shift: int = 0  # > 0 (with cells = 0): cells of the monotone bit pattern >> shift, from ``first``
    first: int = 0


def _monotone_key(bits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """fp32 bit patterns (int32) into int32 keys ordered as the values (-0 just below +0)."""
    torch.bitwise_right_shift(bits, 31, out=out)
    out.bitwise_and_(0x7FFFFFFF)
    return out.bitwise_xor_(bits)


def _key_tables(mids: torch.Tensor, device: torch.device) -> _IndexTables | None:
    """Cells of the bit-pattern key (the module docstring) with at most one midpoint each."""
    if bool((mids == 0).any()):  # -0.0 and +0.0 are equal values but different keys
        return None
    key = _monotone_key(mids.view(torch.int32), torch.empty(mids.shape, dtype=torch.int32))
    for shift in range(24, 7, -1):
        cell = key >> shift
        if bool((cell[1:] > cell[:-1]).all()):
            first = int(cell[0])
            cell = (cell - first).long()
            n = int(cell[-1]) + 2  # the last cell holds no midpoint: above them all, and NaN
            base = torch.searchsorted(cell, torch.arange(n), right=False)
            mid_at = torch.full((n,), math.inf)
            mid_at[cell] = mids
            return _IndexTables(mids.to(device), 0, base.to(torch.uint8).to(device), mid_at.to(device), shift, first)
    return None


def _cell_of(v: torch.Tensor, cells: int, out: torch.Tensor) -> torch.Tensor:
    """Cell of each value into fp32 ``out``: trunc((v + 1) * cells) clamped to [0, 2 cells]; NaN: 2 cells + 1."""
    torch.add(v, 1.0, out=out)
    out.mul_(cells)
    out.clamp_(0, 2 * cells)
    return out.nan_to_num_(nan=2 * cells + 1)


@functools.lru_cache(maxsize=32)
def _index_tables(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> _IndexTables:
    cb = torch.tensor(values, dtype=dtype)
    mids = midpoints(cb)
    usable = dtype == torch.float32 and bool(torch.isfinite(mids).all()) and bool((mids[1:] > mids[:-1]).all())
    if usable:
        for log2 in range(4, _MAX_CELLS_LOG2 + 1):
            cells = 1 << log2
            cell = _cell_of(mids, cells, torch.empty_like(mids)).to(torch.int32)
            if bool((cell[1:] > cell[:-1]).all()):
                base = torch.searchsorted(cell, torch.arange(2 * cells + 2, dtype=torch.int32), right=False)
                base[-1] = mids.numel()  # NaN: every midpoint counts as below it, like bucketize
                mid_at = torch.full((2 * cells + 2,), math.inf)
                mid_at[cell.long()] = mids
                return _IndexTables(mids.to(device), cells, base.to(torch.uint8).to(device), mid_at.to(device))
        if mids.numel() <= 256:
            keyed = _key_tables(mids, device)
            if keyed is not None:
                return keyed
    return _IndexTables(mids.to(device), 0)


def _tables_for(codebook: torch.Tensor, device: torch.device) -> _IndexTables:
    return _index_tables(_values(codebook), codebook.dtype, torch.device(device))


_VALUES: dict[int, tuple[torch.Tensor, tuple[float, ...]]] = {}


def _values(codebook: torch.Tensor) -> tuple[float, ...]:
    """The codebook's values as Python floats, read from the device once per codebook tensor
    (the package's codebooks are cached tensors), so a step does not wait on the device."""
    hit = _VALUES.get(id(codebook))
    if hit is not None and hit[0] is codebook:
        return hit[1]
    values = tuple(codebook.tolist())
    if len(_VALUES) > 64:
        _VALUES.clear()
    _VALUES[id(codebook)] = (codebook, values)  # the reference keeps the id from being reused
    return values


_PAIR_INT = {4: torch.int32, 8: torch.int64}


@functools.lru_cache(maxsize=32)
def _pair_table(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 2) table: a packed byte's low- and high-nibble codebook values.

    Returned as a 1-D integer view (one pair per entry) where the pair fits 4 or 8 bytes:
    a 1-D gather is much faster than gathering rows of two, and an integer copy is bit-exact.
    """
    cb = torch.tensor(values, dtype=dtype)
    byte = torch.arange(256)
    pairs = torch.stack([cb[byte & 0x0F], cb[byte >> 4]], dim=1).contiguous()
    as_int = _PAIR_INT.get(2 * pairs.element_size())
    if as_int is not None:
        pairs = pairs.view(as_int).view(256)
    return pairs.to(device)


# -- chunked work -------------------------------------------------------------------------------
class _Work(NamedTuple):
    """Reused buffers for one call (None where not needed); every chunk uses a prefix of each."""

    f1: torch.Tensor
    i32: torch.Tensor
    f2: torch.Tensor | None = None
    u8: torch.Tensor | None = None


def _work(
    numel: int,
    device: torch.device,
    float_dtype: torch.dtype = torch.float32,
    *,
    f2: bool = True,
    u8: bool = True,
    index_numel: int | None = None,
) -> _Work:
    numel += 2  # room for a half-used byte at either end when decoding
    return _Work(
        torch.empty(numel, dtype=float_dtype, device=device),
        torch.empty(numel if index_numel is None else index_numel + 2, dtype=torch.int32, device=device),
        torch.empty(numel, dtype=float_dtype, device=device) if f2 else None,
        torch.empty(numel, dtype=torch.uint8, device=device) if u8 else None,
    )


def _chunk_elements(numel: int) -> int:
    """Target elements per chunk for an input of ``numel`` elements."""
    return min(_CHUNK, max(_CHUNK // 4, numel // 4, 1))


def _chunks(rows: int, cols: int, block_size: int, target: int | None = None) -> list[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) pieces in row-major order: whole rows, or runs of whole blocks of one long row."""
    if rows == 0 or cols == 0:
        return []
    target = _chunk_elements(rows * cols) if target is None else target
    if cols <= target:
        step = max(1, target // cols)
        return [(r0, min(rows, r0 + step), 0, cols) for r0 in range(0, rows, step)]
    seg = max(1, target // block_size) * block_size
    return [(r, r + 1, c0, min(cols, c0 + seg)) for r in range(rows) for c0 in range(0, cols, seg)]


def _indices(v: torch.Tensor, tables: _IndexTables, out: torch.Tensor, ws: _Work) -> None:
    """Codebook indices of the flat fp32 values ``v`` into uint8 ``out``."""
    n = v.numel()
    if tables.cells:
        cell = _cell_of(v, tables.cells, ws.f2[:n])
        idx = ws.i32[:n]
        idx.copy_(cell)
        torch.index_select(tables.base, 0, idx, out=out)
        torch.index_select(tables.mid_at, 0, idx, out=ws.f2[:n])
        above = ws.i32.view(torch.bool)[:n]  # the cell indices are no longer needed
        torch.gt(v, ws.f2[:n], out=above)
        out.add_(above)
    elif tables.shift:
        cell = ws.i32[:n]
        key = _monotone_key(v.view(torch.int32), ws.f2.view(torch.int32)[:n])
        torch.bitwise_right_shift(key, tables.shift, out=cell)
        cell.sub_(tables.first).clamp_(0, tables.base.numel() - 1)
        nan = ws.f2.view(torch.bool)[:n]  # the keys are no longer needed
        torch.ne(v, v, out=nan)
        cell.masked_fill_(nan, tables.base.numel() - 1)
        torch.index_select(tables.base, 0, cell, out=out)
        torch.index_select(tables.mid_at, 0, cell, out=ws.f2[:n])
        above = ws.i32.view(torch.bool)[:n]  # the cell indices are no longer needed
        torch.gt(v, ws.f2[:n], out=above)
        out.add_(above)
    else:
        idx = ws.i32[:n]
        torch.bucketize(v, tables.mids, out_int32=True, out=idx)
        out.copy_(idx)


def _round_scales(absmax: torch.Tensor, scale_dtype: torch.dtype) -> None:
    """Replace fp32 ``absmax`` in place by the nearest ``scale_dtype`` value (ties to even)."""
    rounded = absmax.to(scale_dtype)
    if bool((torch.isinf(rounded) & torch.isfinite(absmax)).any()):
        raise ValueError(f"a block absmax exceeds the range of {scale_dtype} scales; use bf16 or fp32")
    absmax.copy_(rounded)


def _encode(
    src: torch.Tensor,
    absmax: torch.Tensor,
    idx: torch.Tensor,
    block_size: int,
    tables: _IndexTables,
    ws: _Work,
    scale_dtype: torch.dtype = torch.float32,
    diag_offset: int | None = None,
) -> None:
    """Quantize one (R, L) chunk: absmax of its blocks into ``absmax`` (R, ceil(L / block_size)),
    indices of its elements, row-major, into flat uint8 ``idx``. ``diag_offset``: the chunk's
    diagonal with that offset counts as zero (diag-real)."""
    rows, cols = src.shape
    n = rows * cols
    v = ws.f1[:n].view(rows, cols)
    if src.dtype != torch.float32 or src.stride(-1) != 1:
        v.copy_(src)
        src = v
    mag = ws.f2[:n].view(rows, cols)
    torch.abs(src, out=mag)
    if diag_offset is not None:  # the diagonal neither sets a scale nor gets a code of its own
        mag.diagonal(diag_offset).zero_()
    nfull, tail = divmod(cols, block_size)
    k = nfull * block_size
    if nfull:
        torch.amax(mag[:, :k].view(rows, nfull, block_size), dim=-1, out=absmax[:, :nfull])
    if tail:
        torch.amax(mag[:, k:], dim=-1, out=absmax[:, nfull])
    if scale_dtype != torch.float32:
        _round_scales(absmax, scale_dtype)
    safe = torch.where(absmax > 0, absmax, 1.0)
    if nfull:
        torch.div(
            src[:, :k].view(rows, nfull, block_size),
            safe[:, :nfull, None],
            out=v[:, :k].view(rows, nfull, block_size),
        )
    if tail:
        torch.div(src[:, k:], safe[:, nfull:], out=v[:, k:])
    if diag_offset is not None:
        v.diagonal(diag_offset).zero_()
    _indices(ws.f1[:n], tables, idx, ws)


def _pack_at(codes: torch.Tensor, start: int, idx: torch.Tensor) -> None:
    """Pack 4-bit indices ``idx`` of flat elements start, start + 1, ... into ``codes``.

    A chunk that starts on a high nibble completes the byte its predecessor left half full.
    """
    if start % 2:
        codes[start // 2 : start // 2 + 1].add_(idx[:1], alpha=16)
        idx = idx[1:]
        start += 1
    pairs = idx.numel() // 2
    b = start // 2
    if pairs:
        torch.add(idx[0 : 2 * pairs : 2], idx[1 : 2 * pairs : 2], alpha=16, out=codes[b : b + pairs])
    if idx.numel() % 2:
        codes[b + pairs : b + pairs + 1].copy_(idx[-1:])


def _decode(codes: torch.Tensor, start: int, numel: int, bits: int, table: torch.Tensor, ws: _Work) -> torch.Tensor:
    """Codebook values (unscaled) of flat elements start .. start + numel - 1, a view of ``ws.f1``."""
    if bits == 4:
        b0, b1 = start // 2, (start + numel + 1) // 2
        idx = ws.i32[: b1 - b0]
        idx.copy_(codes[b0:b1])
        pairs = ws.f1[: 2 * (b1 - b0)]
        target = pairs.view(-1, 2) if table.dim() == 2 else pairs.view(table.dtype)
        torch.index_select(table, 0, idx, out=target)
        first = start - 2 * b0
        return pairs[first : first + numel]
    idx = ws.i32[:numel]
    idx.copy_(codes[start : start + numel])
    vals = ws.f1[:numel]
    torch.index_select(table, 0, idx, out=vals)
    return vals


def _scale_into(vals: torch.Tensor, absmax: torch.Tensor, dst: torch.Tensor, block_size: int) -> None:
    """dst = vals * (each element's block absmax), blocks along the rows of (R, L) ``vals``."""
    rows, cols = vals.shape
    nfull, tail = divmod(cols, block_size)
    k = nfull * block_size
    if nfull:
        torch.mul(
            vals[:, :k].view(rows, nfull, block_size),
            absmax[:, :nfull, None],
            out=dst[:, :k].view(rows, nfull, block_size),
        )
    if tail:
        torch.mul(vals[:, k:], absmax[:, nfull : nfull + 1], out=dst[:, k:])


def _check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"out must be a {dtype} tensor of shape {shape} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


# -- the public functions -----------------------------------------------------------------------
def quantize(
    x: torch.Tensor,
    codebook: torch.Tensor,
    bits: int = 4,
    block_size: int = 64,
    *,
    offdiag: bool = False,
    transpose: bool = False,
    scale_dtype: torch.dtype = torch.float32,
) -> Quantized:
    """Quantize ``x`` (any shape, fp32 / bf16 / fp16) block-wise; see the module docstring.

    ``scale_dtype``: fp32 and bf16 scales also have Triton kernels; fp16 scales are torch only.
    """
    _check_quantize_args(codebook, bits, block_size, scale_dtype)
    x = x.detach()
    if transpose:
        if x.dim() != 2:
            raise ValueError(f"transpose=True needs a matrix, got shape {tuple(x.shape)}")
        x = x.t()
    diag = None
    if offdiag:
        if x.dim() != 2 or x.shape[0] != x.shape[1]:
            raise ValueError(f"offdiag=True needs a square matrix, got shape {tuple(x.shape)}")
        diag = x.diagonal().to(torch.float32, copy=True)
    rows, cols = _as_rows(tuple(x.shape))
    x2 = x.reshape(rows, cols)
    device = x.device
    absmax = torch.empty(rows, -(-cols // block_size), dtype=torch.float32, device=device)
    codes = torch.empty(packed_numel(rows * cols, bits), dtype=torch.uint8, device=device)
    chunks = _chunks(rows, cols, block_size)
    if chunks:
        tables = _tables_for(codebook, device)
        ws = _work(max((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in chunks), device, u8=bits == 4)
        for r0, r1, c0, c1 in chunks:
            start, numel = r0 * cols + c0, (r1 - r0) * (c1 - c0)
            idx = ws.u8[:numel] if bits == 4 else codes[start : start + numel]
            block_cols = slice(c0 // block_size, -(-c1 // block_size))
            _encode(
                x2[r0:r1, c0:c1], absmax[r0:r1, block_cols], idx, block_size, tables, ws, scale_dtype,
                r0 - c0 if offdiag else None,
            )
            if bits == 4:
                _pack_at(codes, start, idx)
    return Quantized(codes, absmax.to(scale_dtype), diag)


def dequantize(
    q: Quantized | tuple,
    codebook: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    bits: int = 4,
    block_size: int = 64,
    *,
    transpose: bool = False,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rebuild the tensor of ``shape`` (the shape before any transpose) from its parts.

    ``out``: a contiguous ``dtype`` tensor of ``shape`` to write into (a reusable workspace);
    it is returned.
    """
    _check_args(bits, block_size)
    codes, absmax, diag = Quantized(*q)
    shape = tuple(shape)
    stored = (shape[1], shape[0]) if transpose else shape
    rows, cols = _as_rows(stored)
    device = codes.device
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    else:
        _check_out(out, shape, dtype, device)
    out2 = out.t() if transpose else out.view(rows, cols)
    chunks = _chunks(rows, cols, block_size, _DEQUANT_CHUNK)
    if chunks:
        scales = absmax.reshape(rows, -1)
        values = _values(codebook)
        table = _pair_table(values, codebook.dtype, device) if bits == 4 else codebook.to(device)
        most = max((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in chunks)
        ws = _work(most, device, codebook.dtype, f2=False, u8=False, index_numel=most // 2 + 1 if bits == 4 else most)
        for r0, r1, c0, c1 in chunks:
            vals = _decode(codes, r0 * cols + c0, (r1 - r0) * (c1 - c0), bits, table, ws)
            _scale_into(vals.view(r1 - r0, c1 - c0), scales[r0:r1, c0 // block_size :], out2[r0:r1, c0:c1], block_size)
    if diag is not None:
        out.diagonal().copy_(diag)
    return out


# -- symmetric matrices: fp32 diagonal, quantized strict upper triangle --------------------------
@functools.lru_cache(maxsize=64)
def _triangle_layout(n: int, block_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """First flat element and first block of every triangle row 0 .. n-1 (row n-1 is empty);
    cached per order, as every store of a symmetric matrix needs it."""
    starts, blocks = [0], [0]
    for i in range(n - 1):
        length = n - 1 - i
        starts.append(starts[-1] + length)
        blocks.append(blocks[-1] + -(-length // block_size))
    return tuple(starts), tuple(blocks)


@functools.lru_cache(maxsize=16)
def _triangle_index(n: int, block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached per order, the lookups that store and rebuild a symmetric matrix in a few calls and
    no host sync (int32, about 8 bytes per element of the matrix):

    * where every element of the (n, n) matrix is read from in [strict upper triangle, diagonal]
      (n * n),
    * the block of every triangle element,
    * the flat position in the matrix of every triangle element.
    """
    starts, bstarts = _triangle_layout(n, block_size)
    numel = n * (n - 1) // 2
    i = torch.arange(n, device=device)
    r, c = torch.minimum(i[:, None], i[None, :]), torch.maximum(i[:, None], i[None, :])
    full_at = torch.where(r == c, numel + r, r * (2 * n - r - 1) // 2 + (c - r - 1)).to(torch.int32).view(-1)
    lengths = torch.arange(n - 1, 0, -1, device=device)
    row = torch.repeat_interleave(torch.arange(n - 1, device=device), lengths)
    pos = torch.arange(numel, device=device) - torch.tensor(starts[:-1], device=device)[row]
    block_of = (torch.tensor(bstarts[:-1], device=device)[row] + pos // block_size).to(torch.int32)
    tri_at = (row * (n + 1) + 1 + pos).to(torch.int32)
    return full_at, block_of, tri_at


def _triangle_masks(r0: int, r1: int, n: int, width: int, block_size: int, device: torch.device):
    """For triangle rows r0 .. r1-1: (entries above the diagonal of those matrix rows (R, n),
    valid entries of the left-aligned rows (R, width), valid blocks (R, ceil(width / block_size)))."""
    row = torch.arange(r0, r1, device=device)[:, None]
    length = n - 1 - row
    upper = torch.arange(n, device=device)[None, :] > row
    left = torch.arange(width, device=device)[None, :] < length
    nblocks = -(-width // block_size)
    blocks = torch.arange(nblocks, device=device)[None, :] < -(-length // block_size)
    return upper, left, blocks


def _quantize_triangle(
    x: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    n: int,
    bits: int,
    block_size: int,
    tables: _IndexTables,
    scale_dtype: torch.dtype,
) -> None:
    """The strict upper triangle of ``x`` into ``codes`` / ``absmax`` through the cached index:
    two passes of whole ``_CHUNK``-element runs (block maxima, then codes), so no host sync
    (but the scale-range check) and bounded buffers."""
    _, block_of, tri_at = _triangle_index(n, block_size, x.device)
    flat = x.reshape(-1)
    numel = tri_at.numel()
    chunk = min(_CHUNK, numel)
    ws = _work(chunk, x.device, u8=False)
    idx = torch.empty(chunk, dtype=torch.uint8, device=x.device)
    absmax.zero_()
    for s0 in range(0, numel, chunk):  # pass 1: block maxima
        s1 = min(numel, s0 + chunk)
        vals = torch.index_select(flat, 0, tri_at[s0:s1]).float()
        absmax.scatter_reduce_(0, block_of[s0:s1].long(), vals.abs_(), "amax")
    if scale_dtype != torch.float32:
        _round_scales(absmax, scale_dtype)
    safe = torch.where(absmax > 0, absmax, 1.0)
    for s0 in range(0, numel, chunk):  # pass 2: normalized values -> codes
        s1 = min(numel, s0 + chunk)
        v = ws.f1[: s1 - s0]
        if flat.dtype == torch.float32:
            torch.index_select(flat, 0, tri_at[s0:s1], out=v)
        else:
            v.copy_(torch.index_select(flat, 0, tri_at[s0:s1]))
        v.div_(torch.index_select(safe, 0, block_of[s0:s1], out=ws.f2[: s1 - s0]))
        _indices(v, tables, idx[: s1 - s0], ws)
        if bits == 4:
            _pack_at(codes, s0, idx[: s1 - s0])
        else:
            codes[s0:s1] = idx[: s1 - s0]


def quantize_symmetric(
    x: torch.Tensor,
    codebook: torch.Tensor,
    bits: int = 4,
    block_size: int = 64,
    *,
    scale_dtype: torch.dtype = torch.float32,
) -> Quantized:
    """Store symmetric ``x`` (n, n) as fp32 diagonal plus its quantized strict upper triangle.

    Only the upper triangle is read. The layout is in the module docstring; ``absmax`` is flat.
    """
    _check_quantize_args(codebook, bits, block_size, scale_dtype)
    if x.dim() != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"quantize_symmetric needs a square matrix, got shape {tuple(x.shape)}")
    x = x.detach()
    n, device = x.shape[0], x.device
    diag = x.diagonal().to(torch.float32, copy=True)
    starts, bstarts = _triangle_layout(n, block_size)
    codes = torch.empty(packed_numel(starts[-1], bits), dtype=torch.uint8, device=device)
    absmax = torch.empty(bstarts[-1], dtype=torch.float32, device=device)
    if 1 < n and starts[-1] <= _SYMMETRIC_ONE_PASS:
        _quantize_triangle(x, codes, absmax, n, bits, block_size, _tables_for(codebook, device), scale_dtype)
    elif n > 1:
        tables = _tables_for(codebook, device)
        step = max(1, _chunk_elements(n * (n - 1) // 2) // (n - 1))
        width = n - 1
        ws = _work(min(step, n - 1) * width, device)
        grid = torch.empty(min(step, n - 1) * width, dtype=torch.float32, device=device)
        block_buf = torch.empty(min(step, n - 1) * -(-width // block_size), dtype=torch.float32, device=device)
        for r0 in range(0, n - 1, step):
            r1 = min(n - 1, r0 + step)
            rows, width = r1 - r0, n - 1 - r0
            upper, left, blocks = _triangle_masks(r0, r1, n, width, block_size, device)
            src = grid[: rows * width].view(rows, width)
            src.zero_()  # zero padding leaves every block's absmax unchanged
            src.masked_scatter_(left, x[r0:r1].masked_select(upper).float())
            nb = -(-width // block_size)
            block_max = block_buf[: rows * nb].view(rows, nb)
            idx = ws.u8[: rows * width]
            _encode(src, block_max, idx, block_size, tables, ws, scale_dtype)
            absmax[bstarts[r0] : bstarts[r1]] = block_max.masked_select(blocks)
            idx = idx.view(rows, width).masked_select(left)
            if bits == 4:
                _pack_at(codes, starts[r0], idx)
            else:
                codes[starts[r0] : starts[r1]] = idx
    return Quantized(codes, absmax.to(scale_dtype), diag)


def _symmetric_source(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    diag: torch.Tensor,
    codebook: torch.Tensor,
    n: int,
    bits: int,
    block_size: int,
    scratch: torch.Tensor,
) -> torch.Tensor:
    """fp32 ``[scaled strict upper triangle, diagonal]`` (numel + n) of a stored symmetric matrix:
    what every element of the matrix is gathered from (``_triangle_index``). The triangle is
    decoded in place, in runs as long as the fp32 ``scratch`` buffer holds twice over (the code
    indices and the scales of a run): one run when it is the dense output."""
    _, block_of, _ = _triangle_index(n, block_size, codes.device)
    numel = n * (n - 1) // 2
    table = _pair_table(_values(codebook), codebook.dtype, codes.device) if bits == 4 else codebook.to(codes.device)
    ext = torch.empty(numel + n + 2, dtype=codebook.dtype, device=codes.device)
    scale = absmax.float()  # an fp32 gather of the (few) scales is cheaper than a mixed-dtype multiply
    room = (scratch.numel() - 2) // 2
    chunk = numel if numel <= room else room // 2 * 2  # runs but the last have even length: whole bytes
    work = _Work(ext, scratch[chunk : 2 * chunk + 2].view(torch.int32), scratch[:chunk])
    for s0 in range(0, numel, chunk):
        k = min(chunk, numel - s0)
        vals = _decode(codes, s0, k, bits, table, work._replace(f1=ext[s0:]))
        vals.mul_(torch.index_select(scale, 0, block_of[s0 : s0 + k], out=work.f2[:k]))
    ext = ext[: numel + n]
    ext[numel:].copy_(diag)
    return ext


def symmetric_panels(
    q: Quantized | tuple, codebook: torch.Tensor, n: int, bits: int = 4, block_size: int = 64, *, rows: int = 256
):
    """Yield ``(r0, r1, panel)``: rows r0 .. r1-1 (fp32, ``(r1 - r0, n)``) of the symmetric matrix
    stored by :func:`quantize_symmetric`, ``rows`` at a time through one reused buffer, so a
    product with the matrix never holds it whole: its working memory is the decoded triangle
    (half the dense matrix) plus one panel. The panel is overwritten by the next one."""
    _check_args(bits, block_size)
    codes, absmax, diag = Quantized(*q)
    if n <= 1 or n * (n - 1) // 2 > _SYMMETRIC_ONE_PASS:
        whole = dequantize_symmetric(q, codebook, n, bits, block_size)
        for r0 in range(0, n, rows):
            yield r0, min(n, r0 + rows), whole[r0 : r0 + rows]
        return
    full_at, _, _ = _triangle_index(n, block_size, codes.device)
    buf = torch.empty(max(min(rows, n) * n, 1024), dtype=torch.float32, device=codes.device)
    src = _symmetric_source(codes, absmax, diag, codebook, n, bits, block_size, buf)  # buf: its scratch
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        panel = buf[: (r1 - r0) * n]
        torch.index_select(src, 0, full_at[r0 * n : r1 * n], out=panel)
        yield r0, r1, panel.view(r1 - r0, n)


def dequantize_symmetric(
    q: Quantized | tuple,
    codebook: torch.Tensor,
    n: int,
    bits: int = 4,
    block_size: int = 64,
    *,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The symmetric (n, n) matrix stored by :func:`quantize_symmetric`; ``out`` as in :func:`dequantize`."""
    _check_args(bits, block_size)
    codes, absmax, diag = Quantized(*q)
    device = codes.device
    if out is None:
        out = torch.empty(n, n, dtype=dtype, device=device)
    else:
        _check_out(out, (n, n), dtype, device)
    if 1 < n and n * (n - 1) // 2 <= _SYMMETRIC_ONE_PASS:
        # one pass: every element gathered from the decoded triangle + diagonal through a cached
        # index (above and below the diagonal alike), instead of a masked scatter and a mirror;
        # an fp32 output is the scratch space of the decoding until the final gather
        full_at, _, _ = _triangle_index(n, block_size, device)
        scratch = out.view(-1) if out.dtype == torch.float32 else torch.empty(
            2 * min(n * (n - 1) // 2, _CHUNK) + 2, dtype=torch.float32, device=device)
        src = _symmetric_source(codes, absmax, diag, codebook, n, bits, block_size, scratch)
        torch.index_select(src.to(dtype), 0, full_at, out=out.view(-1))
        return out
    elif n > 1:
        starts, bstarts = _triangle_layout(n, block_size)
        step = max(1, _chunk_elements(n * (n - 1) // 2) // (n - 1))
        nb_max = -(-(n - 1) // block_size)
        values = _values(codebook)
        table = _pair_table(values, codebook.dtype, device) if bits == 4 else codebook.to(device)
        ws = _work(min(step, n - 1) * nb_max * block_size, device, codebook.dtype, u8=False)
        for r0 in range(0, n - 1, step):
            r1 = min(n - 1, r0 + step)
            rows, width = r1 - r0, n - 1 - r0
            nb = -(-width // block_size)
            upper, left, blocks = _triangle_masks(r0, r1, n, nb * block_size, block_size, device)
            vals = _decode(codes, starts[r0], starts[r1] - starts[r0], bits, table, ws)
            grid = ws.f2[: rows * nb * block_size].view(rows, nb * block_size)
            grid.zero_()
            grid.masked_scatter_(left, vals)
            scale = absmax.new_zeros(rows, nb)
            scale.masked_scatter_(blocks, absmax[bstarts[r0] : bstarts[r1]])
            tri = (grid.view(rows, nb, block_size) * scale[:, :, None]).view(rows, -1).masked_select(left).to(dtype)
            out[r0:r1].masked_scatter_(upper, tri)
            out.t()[r0:r1].masked_scatter_(upper, tri)
    if n > 0:
        out.diagonal().copy_(diag)
    return out
