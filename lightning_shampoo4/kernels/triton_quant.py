"""Triton kernels for block-wise quantization, bit-identical to :mod:`lightning_shampoo4.quant`.

The layout is the one of ``quant/blockwise.py`` (read its module docstring first). A tensor is
seen as a stored matrix ``S`` of ``rows x cols`` (``x.T`` when ``transpose=True``), cut row-wise
into blocks of ``block_size``; one absmax per block (fp32, or rounded to bf16); 4-bit codes packed flat over the
row-major elements of ``S`` (element 2k low nibble, 2k + 1 high nibble), 8-bit codes one per byte.

Kernels
-------
``_absmax_kernel``
    One program reduces ``UNITS`` blocks (flat over ``rows x nblocks``) to their absmax. The
    input is read through its strides, so ``x.T`` is never copied; diag-real zeroes the
    diagonal before the reduction; a NaN anywhere in a block makes its absmax NaN, like
    ``torch.amax``.
``_encode_kernel``
    One program writes ``UNITS`` whole bytes of codes. For 4 bits a byte is the element pair
    (2k, 2k + 1) of the flat row-major index, so a pair that straddles two rows (odd ``cols``)
    is still written by exactly one program and no byte is shared. Each value is divided by
    its block's absmax with IEEE round-to-nearest division (``div_rn``, the same result as
    torch's ``/``) and its index is the number of codebook midpoints strictly below it
    (``torch.bucketize(right=False)``): a 15-compare count for 4 bits, an 8-step binary search
    over the midpoints for 8 bits; NaN maps to the last index like ``bucketize``.
``_dequant_kernel``
    2-D tiles of the output. Codes are gathered from the flat buffer (transposed reads for
    ``transpose=True``), looked up in the codebook, scaled by the block absmax (the same
    single fp32 multiply as the reference), the fp32 diagonal written back for diag-real, and
    the result stored as fp32, bf16 or fp16 (round to nearest even).

``_load_codes`` and ``_lookup`` (codes of arbitrary (i, j) index tiles, codebook values) are
shared with the kernels of ``triton_symmetric`` (stored symmetric matrices).

The two passes of quantization read the input twice; quantization runs once per T1 / T2
steps, while dequantization is on the hot path of the eigenvector storage.

Interpreter (``TRITON_INTERPRET=1``, how the kernels are tested on the CPU): it truncates on
fp32 -> bf16 casts and computes bf16 arithmetic wrongly, so every value is upcast to fp32
right after ``tl.load`` and, when running interpreted, bf16 rounding is done by
:func:`_round_bf16` with integer arithmetic. No libdevice and no autotuning: block sizes come
from simple heuristics.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..quant.blockwise import Quantized, packed_numel
from ..quant.codebooks import midpoints

__all__ = ["INTERPRETED", "dequantize", "quantize"]

_INT32_MAX = 2**31 - 1
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _round_bf16(x):
    """Round fp32 values to the nearest bf16 value (ties to even), returned as fp32.

    Used in the interpreter only, whose own fp32 -> bf16 cast truncates. NaN stays NaN.
    """
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    bits = bits & -65536
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def _bucketize(v, mids_ptr, BITS: tl.constexpr):
    """Number of midpoints strictly below ``v`` (int32), NaN -> last index."""
    NQ: tl.constexpr = 1 << BITS
    idx = tl.zeros(v.shape, dtype=tl.int32)
    if BITS <= 4:
        # 15 uniform scalar loads and compares: no gathers.
        for j in tl.static_range(NQ - 1):
            m = tl.load(mids_ptr + j)
            idx += (m < v).to(tl.int32)
    else:
        # Binary lifting: the largest c with mids[c - 1] < v, one gather per bit.
        for s in tl.static_range(BITS):
            probe = idx + (1 << (BITS - 1 - s))
            m = tl.load(mids_ptr + probe - 1)
            idx = tl.where(m < v, probe, idx)
    return tl.where(v != v, NQ - 1, idx)


@triton.jit
def _encode(
    x_ptr,
    absmax_ptr,
    mids_ptr,
    e,
    numel,
    cols,
    nblocks,
    stride_r,
    stride_c,
    BLOCK_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    OFFDIAG: tl.constexpr,
):
    """Codes (int32) of the stored elements with flat row-major indices ``e``; 0 past the end."""
    ok = e < numel
    r = e // cols
    c = e - r * cols
    ptrs = x_ptr + r.to(tl.int64) * stride_r + c.to(tl.int64) * stride_c
    v = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    if OFFDIAG:
        v = tl.where(r == c, 0.0, v)
    amax = tl.load(absmax_ptr + r * nblocks + c // BLOCK_SIZE, mask=ok, other=1.0)
    scale = tl.where(amax > 0, amax, 1.0)
    v = tl.math.div_rn(v, scale)
    idx = _bucketize(v, mids_ptr, BITS)
    return tl.where(ok, idx, 0)


@triton.jit
def _load_codes(codes_ptr, i, j, cols, mask, BITS: tl.constexpr):
    """Codebook indices (int32) of stored elements (i, j) (broadcastable int32 index tensors)
    of a matrix with ``cols`` columns; 0 where ~mask."""
    f = i * cols + j
    if BITS == 4:
        byte = tl.load(codes_ptr + (f >> 1), mask=mask, other=0).to(tl.int32)
        code = (byte >> ((f & 1) * 4)) & 0xF
    else:
        code = tl.load(codes_ptr + f, mask=mask, other=0).to(tl.int32)
    return code


@triton.jit
def _lookup(cb_ptr, code, BITS: tl.constexpr, SELECT: tl.constexpr):
    """Codebook values of ``code``: a gather from the (L1-resident) table, or, for 4 bits with
    ``SELECT``, a 15-select tree over 16 uniform scalars, which needs no memory per element
    (inside a software-pipelined matmul loop a gather would be staged in shared memory)."""
    if SELECT and BITS == 4:
        b0 = (code & 1) != 0
        b1 = (code & 2) != 0
        b2 = (code & 4) != 0
        b3 = (code & 8) != 0
        v0 = tl.where(b0, tl.load(cb_ptr + 1), tl.load(cb_ptr + 0))
        v1 = tl.where(b0, tl.load(cb_ptr + 3), tl.load(cb_ptr + 2))
        v2 = tl.where(b0, tl.load(cb_ptr + 5), tl.load(cb_ptr + 4))
        v3 = tl.where(b0, tl.load(cb_ptr + 7), tl.load(cb_ptr + 6))
        v4 = tl.where(b0, tl.load(cb_ptr + 9), tl.load(cb_ptr + 8))
        v5 = tl.where(b0, tl.load(cb_ptr + 11), tl.load(cb_ptr + 10))
        v6 = tl.where(b0, tl.load(cb_ptr + 13), tl.load(cb_ptr + 12))
        v7 = tl.where(b0, tl.load(cb_ptr + 15), tl.load(cb_ptr + 14))
        w0 = tl.where(b1, v1, v0)
        w1 = tl.where(b1, v3, v2)
        w2 = tl.where(b1, v5, v4)
        w3 = tl.where(b1, v7, v6)
        value = tl.where(b3, tl.where(b2, w3, w2), tl.where(b2, w1, w0))
    else:
        value = tl.load(cb_ptr + code)
    return value


@triton.jit
def _decode(codes_ptr, absmax_ptr, cb_ptr, i, j, cols, nblocks, mask, BLOCK_SIZE: tl.constexpr, BITS: tl.constexpr):
    """fp32 values of stored elements (i, j) (broadcastable int32 index tensors); 0 where ~mask.

    The stored matrix has ``cols`` columns and ``nblocks`` absmax blocks per row.
    """
    code = _load_codes(codes_ptr, i, j, cols, mask, BITS)
    value = _lookup(cb_ptr, code, BITS, False)
    amax = tl.load(absmax_ptr + i * nblocks + j // BLOCK_SIZE, mask=mask, other=0.0)
    return tl.where(mask, value * amax, 0.0)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _absmax_kernel(
    x_ptr,
    absmax_ptr,
    rows,
    cols,
    nblocks,
    stride_r,
    stride_c,
    BLOCK_SIZE: tl.constexpr,
    BSP: tl.constexpr,
    UNITS: tl.constexpr,
    OFFDIAG: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    u = pid * UNITS + tl.arange(0, UNITS)  # block ids, flat over (rows, nblocks) = absmax layout
    u_ok = u < rows * nblocks
    r = u // nblocks
    b = u - r * nblocks
    t = tl.arange(0, BSP)
    c = b[:, None] * BLOCK_SIZE + t[None, :]
    mask = u_ok[:, None] & (t[None, :] < BLOCK_SIZE) & (c < cols)
    ptrs = x_ptr + r[:, None].to(tl.int64) * stride_r + c.to(tl.int64) * stride_c
    v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if OFFDIAG:
        v = tl.where(r[:, None] == c, 0.0, v)
    a = tl.abs(v)
    # max() may drop NaN on the GPU; the sum term is 0, or NaN when the block holds a NaN.
    amax = tl.max(a, axis=1) + tl.sum(tl.where(a != a, a, 0.0), axis=1)
    if ROUND_BF16:  # bf16 scales: the nearest bf16 value, and the block is normalized by it
        amax = _round_bf16(amax)
    tl.store(absmax_ptr + u, amax, mask=u_ok)


@triton.jit
def _encode_kernel(
    x_ptr,
    absmax_ptr,
    mids_ptr,
    codes_ptr,
    numel,
    nbytes,
    cols,
    nblocks,
    stride_r,
    stride_c,
    BLOCK_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    UNITS: tl.constexpr,
    OFFDIAG: tl.constexpr,
):
    pid = tl.program_id(0)
    p = pid * UNITS + tl.arange(0, UNITS)  # byte index of the codes buffer
    if BITS == 4:
        lo = _encode(
            x_ptr, absmax_ptr, mids_ptr, 2 * p, numel, cols, nblocks, stride_r, stride_c, BLOCK_SIZE, BITS, OFFDIAG
        )
        hi = _encode(
            x_ptr, absmax_ptr, mids_ptr, 2 * p + 1, numel, cols, nblocks, stride_r, stride_c, BLOCK_SIZE, BITS, OFFDIAG
        )
        byte = lo | (hi << 4)
    else:
        byte = _encode(
            x_ptr, absmax_ptr, mids_ptr, p, numel, cols, nblocks, stride_r, stride_c, BLOCK_SIZE, BITS, OFFDIAG
        )
    tl.store(codes_ptr + p, byte.to(tl.uint8), mask=p < nbytes)


@triton.jit
def _dequant_kernel(
    codes_ptr,
    absmax_ptr,
    cb_ptr,
    diag_ptr,
    out_ptr,
    out_rows,
    out_cols,
    cols,
    nblocks,
    BLOCK_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    HAS_DIAG: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(out_cols, BC)
    pr = pid // tiles_c
    pc = pid - pr * tiles_c
    a = pr * BR + tl.arange(0, BR)
    b = pc * BC + tl.arange(0, BC)
    zero = tl.zeros((BR, BC), dtype=tl.int32)
    mask = (a[:, None] < out_rows) & (b[None, :] < out_cols)
    if TRANSPOSE:
        i = b[None, :] + zero  # stored S = out^T
        j = a[:, None] + zero
    else:
        i = a[:, None] + zero
        j = b[None, :] + zero
    v = _decode(codes_ptr, absmax_ptr, cb_ptr, i, j, cols, nblocks, mask, BLOCK_SIZE, BITS)
    if HAS_DIAG:
        on_diag = mask & (i == j)
        d = tl.load(diag_ptr + i, mask=on_diag, other=0.0)
        v = tl.where(on_diag, d, v)
    if ROUND_BF16:
        v = _round_bf16(v)
    offs = a[:, None].to(tl.int64) * out_cols + b[None, :]
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def _is_interpreted(fn) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old triton
        return False
    return isinstance(fn, InterpretedFunction)


INTERPRETED: bool = _is_interpreted(_dequant_kernel)
"""Whether these kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` when
this module was first imported); only then can they run on CPU tensors."""


# ----------------------------------------------------------------------------- launch helpers


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _tile_elems() -> int:
    """Elements per program: large under the interpreter (fewer, vectorized numpy programs)."""
    return 16384 if INTERPRETED else 4096


def _check_args(bits: int, block_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r} is not supported; choose 4 or 8")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive integer")


def _prepare_codebook(codebook: torch.Tensor, bits: int, device: torch.device) -> torch.Tensor:
    if codebook.numel() != 2**bits:
        raise ValueError(f"a {bits}-bit codebook needs {2**bits} values, got {codebook.numel()}")
    return codebook.detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous()


def _stored_view(x: torch.Tensor, transpose: bool) -> tuple[torch.Tensor, int, int, int, int]:
    """(tensor to read, rows, cols, row stride, col stride) of the stored matrix S."""
    if transpose:
        if x.dim() != 2:
            raise ValueError(f"transpose=True needs a matrix, got shape {tuple(x.shape)}")
        return x, x.shape[1], x.shape[0], x.stride(1), x.stride(0)
    if x.dim() == 0:
        return x.reshape(1, 1), 1, 1, 0, 0
    if x.dim() == 1:
        return x, 1, x.shape[0], 0, x.stride(0)
    cols = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, cols)  # a view whenever the strides allow it
    return x2, rows, cols, x2.stride(0), x2.stride(1)


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
    """Block-wise quantize ``x`` with Triton; same result as :func:`lightning_shampoo4.quant.quantize`
    for fp32 and bf16 scales (``scale_dtype``)."""
    _check_args(bits, block_size)
    if scale_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the Triton quantizer stores fp32 or bf16 scales, got {scale_dtype}")
    cb = _prepare_codebook(codebook, bits, x.device)
    x = x.detach()
    if x.dtype not in _OUT_DTYPES:
        x = x.float()
    src, rows, cols, stride_r, stride_c = _stored_view(x, transpose)
    diag = None
    if offdiag:
        if x.dim() != 2 or x.shape[0] != x.shape[1]:
            raise ValueError(f"offdiag=True needs a square matrix, got shape {tuple(x.shape)}")
        diag = x.diagonal().to(torch.float32, copy=True)
    nblocks = -(-cols // block_size)
    numel = rows * cols
    if numel > _INT32_MAX // 2 or rows * nblocks > _INT32_MAX:
        raise ValueError(f"tensor of shape {tuple(x.shape)} is too large for the Triton quantizer (2**30 elements max)")
    absmax = torch.empty(rows, nblocks, dtype=torch.float32, device=x.device)
    nbytes = packed_numel(numel, bits)
    codes = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    if numel == 0:
        absmax.zero_()
        return Quantized(codes, absmax.to(scale_dtype), diag)

    bsp = _next_pow2(block_size)
    units = max(1, min(_tile_elems() // bsp, _next_pow2(rows * nblocks)))
    _absmax_kernel[(triton.cdiv(rows * nblocks, units),)](
        src, absmax, rows, cols, nblocks, stride_r, stride_c,
        BLOCK_SIZE=block_size, BSP=bsp, UNITS=units, OFFDIAG=offdiag, ROUND_BF16=scale_dtype == torch.bfloat16,
    )  # fmt: skip

    mids = midpoints(cb).contiguous()  # the reference's fp32 decision boundaries
    units = max(16, min(_tile_elems() // 2 if bits == 4 else _tile_elems() // 4, _next_pow2(nbytes)))
    _encode_kernel[(triton.cdiv(nbytes, units),)](
        src, absmax, mids, codes, numel, nbytes, cols, nblocks, stride_r, stride_c,
        BLOCK_SIZE=block_size, BITS=bits, UNITS=units, OFFDIAG=offdiag,
    )  # fmt: skip
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
) -> torch.Tensor:
    """Rebuild the tensor of ``shape`` (before any transpose) with Triton; see :func:`quant.dequantize`."""
    _check_args(bits, block_size)
    codes, absmax, diag = Quantized(*q)
    device = codes.device
    cb = _prepare_codebook(codebook, bits, device)
    shape = tuple(int(s) for s in shape)
    if transpose and len(shape) != 2:
        raise ValueError(f"transpose=True needs a matrix shape, got {shape}")
    stored = (shape[1], shape[0]) if transpose else shape
    rows = math.prod(stored[:-1]) if len(stored) else 1
    cols = stored[-1] if len(stored) else 1
    numel = rows * cols
    nblocks = -(-cols // block_size)
    if codes.dtype != torch.uint8 or codes.numel() < packed_numel(numel, bits):
        raise ValueError(
            f"codes must be uint8 with at least {packed_numel(numel, bits)} entries for shape {shape} at {bits} bits, "
            f"got {codes.dtype} with {codes.numel()}"
        )
    if absmax.numel() != rows * nblocks:
        raise ValueError(f"absmax must hold {rows * nblocks} blocks for shape {shape}, got {absmax.numel()}")
    if diag is not None and (len(stored) != 2 or stored[0] != stored[1] or diag.numel() != stored[0]):
        raise ValueError(f"a diagonal needs a square shape of its length, got shape {shape} and {diag.numel()} values")
    if numel > _INT32_MAX // 2:
        raise ValueError(f"shape {shape} is too large for the Triton dequantizer (2**30 elements max)")

    kernel_dtype = dtype if dtype in _OUT_DTYPES else torch.float32
    out = torch.empty(shape, dtype=kernel_dtype, device=device)
    if numel == 0:
        return out.to(dtype)
    out_rows, out_cols = (cols, rows) if transpose else (rows, cols)
    codes = codes.reshape(-1).contiguous()
    absmax = absmax.reshape(-1).to(torch.float32).contiguous()
    diag_t = diag.reshape(-1).to(device=device, dtype=torch.float32).contiguous() if diag is not None else absmax

    elems = _tile_elems()
    if transpose:
        bc = min(64, _next_pow2(out_cols))
    else:
        bc = min(128 if not INTERPRETED else 1024, _next_pow2(out_cols))
    br = max(1, min(elems // bc, _next_pow2(out_rows)))
    grid = (triton.cdiv(out_rows, br) * triton.cdiv(out_cols, bc),)
    _dequant_kernel[grid](
        codes, absmax, cb, diag_t, out, out_rows, out_cols, cols, nblocks,
        BLOCK_SIZE=block_size, BITS=bits, TRANSPOSE=transpose, HAS_DIAG=diag is not None,
        ROUND_BF16=INTERPRETED and kernel_dtype == torch.bfloat16, BR=br, BC=bc,
    )  # fmt: skip
    return out if kernel_dtype == dtype else out.to(dtype)
