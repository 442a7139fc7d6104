"""Triton kernels for stored symmetric matrices (``quant.quantize_symmetric``'s layout).

The layout (``quant/blockwise.py``): an fp32 diagonal, and the strict upper triangle's rows
``x[i, i+1:]`` (i = 0 .. n-2) concatenated, row i starting at flat element
``start(i) = n i - i (i + 1) / 2``, each row cut into its own blocks of ``block_size`` (the last
one partial) with one scale per block (fp32 or bf16; ``bstart[i]`` is the first block of row
i), codes 4-bit packed over the flat triangle (element 2k low nibble, 2k + 1 high nibble: a
byte may hold the end of one row and the start of the next) or 8-bit. This is how every storage
keeps its inverse roots (4-bit, bf16 scales by default) and how ``cholesky8`` keeps its 8-bit
Cholesky factor (as the upper triangle of C^T). Element (a, b) of the matrix is read from
(min(a, b), max(a, b)), so any tile of rows and columns is decoded straight from the codes.

Kernels (every one batched over ``k`` roots of one format: program axis 1):

``_rebuild_kernel``
    Rows ``r0 .. r1-1`` of each root as dense fp32, bit for bit the torch rebuild (each value
    is the same single fp32 product of codebook value and scale). The "workspace" path: the
    rebuilt roots then go to cuBLAS (``torch.bmm``).
``_matmul_kernel``
    ``S @ X`` (``LEFT``) or ``X @ S`` with the root's tiles decoded inside the matmul loop: the
    "fused" path, no dense root in memory. fp32 accumulation; ``COMPUTE`` picks the tile dot's
    input type (fp32 IEEE, bf16, fp16).
``_store_kernel``
    Store: one program per ``UNITS`` blocks takes each block's absmax (rounded to bf16 with
    ``ROUND_BF16``), normalizes with IEEE division and writes the code index of every element
    (the number of codebook midpoints strictly below it, NaN last): into the codes for 8 bits,
    into a byte-per-element buffer that ``_pack_kernel`` packs for 4 bits (programs own whole
    blocks, and a code byte can be shared by two blocks). Bit for bit ``quantize_symmetric``.

Interpreter (``TRITON_INTERPRET=1``): bf16 rounding by integer arithmetic (``_round_bf16``),
bf16 / fp16 dot inputs emulated by rounding fp32 tiles, as in ``triton_quant``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..quant.blockwise import _triangle_layout
from ..quant.codebooks import midpoints
from .triton_quant import _bucketize, _is_interpreted, _lookup, _round_bf16

__all__ = ["INTERPRETED", "matmul", "matmul_config", "quantize_symmetric", "rebuild"]

_COMPUTE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _sym_value(codes_ptr, absmax_ptr, cb_ptr, diag_ptr, bstart_ptr, a, b, n, mask,
               BLOCK_SIZE: tl.constexpr, BITS: tl.constexpr, SELECT: tl.constexpr):
    """fp32 elements (a, b) (broadcastable int32 index tensors) of one stored symmetric matrix; 0 where ~mask."""
    i = tl.minimum(a, b)
    j = tl.maximum(a, b)
    on_diag = mask & (i == j)
    off = mask & (i != j)
    c = j - i - 1  # position in triangle row i
    i64 = i.to(tl.int64)
    f = i64 * n - (i64 * (i64 + 1)) // 2 + c
    if BITS == 4:
        byte = tl.load(codes_ptr + (f >> 1), mask=off, other=0).to(tl.int32)
        code = (byte >> ((f & 1) * 4).to(tl.int32)) & 0xF
    else:
        code = tl.load(codes_ptr + f, mask=off, other=0).to(tl.int32)
    block = tl.load(bstart_ptr + i, mask=off, other=0) + c // BLOCK_SIZE
    scale = tl.load(absmax_ptr + block, mask=off, other=0.0).to(tl.float32)
    value = _lookup(cb_ptr, code, BITS, SELECT) * scale
    d = tl.load(diag_ptr + i, mask=on_diag, other=0.0).to(tl.float32)
    return tl.where(off, value, tl.where(on_diag, d, 0.0))


@triton.jit
def _as_compute(x, COMPUTE: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 tile -> the dot-product input type (fp32 tiles rounded to bf16 / fp16 when emulating)."""
    if COMPUTE == 1:
        if EMULATE:
            x = _round_bf16(x)
        else:
            x = x.to(tl.bfloat16)
    elif COMPUTE == 2:
        if EMULATE:
            x = x.to(tl.float16).to(tl.float32)
        else:
            x = x.to(tl.float16)
    return x


@triton.jit
def _dot(a, b, acc, COMPUTE: tl.constexpr, EMULATE: tl.constexpr):
    a = _as_compute(a, COMPUTE, EMULATE)
    b = _as_compute(b, COMPUTE, EMULATE)
    if COMPUTE == 0 or EMULATE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _rebuild_kernel(codes_ptr, absmax_ptr, cb_ptr, diag_ptr, bstart_ptr, out_ptr,
                    n, r0, rows, code_stride, scale_stride,
                    BLOCK_SIZE: tl.constexpr, BITS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    tiles_c = tl.cdiv(n, BC)
    pr = pid // tiles_c
    pc = pid - pr * tiles_c
    row = pr * BR + tl.arange(0, BR)
    col = pc * BC + tl.arange(0, BC)
    mask = (row[:, None] < rows) & (col[None, :] < n)
    v = _sym_value(codes_ptr + k * code_stride, absmax_ptr + k * scale_stride, cb_ptr, diag_ptr + k * n, bstart_ptr,
                   r0 + row[:, None], col[None, :], n, mask, BLOCK_SIZE, BITS, False)
    offs = k * rows * n + row[:, None].to(tl.int64) * n + col[None, :]
    tl.store(out_ptr + offs, v, mask=mask)


@triton.jit
def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped program ordering (GROUP_M m-tiles share each n-tile sweep) for L2 reuse."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _matmul_kernel(codes_ptr, absmax_ptr, cb_ptr, diag_ptr, bstart_ptr, x_ptr, out_ptr,
                   M, N, n, code_stride, scale_stride, stride_xb, stride_xm, stride_xn,
                   LEFT: tl.constexpr, BLOCK_SIZE: tl.constexpr, BITS: tl.constexpr,
                   COMPUTE: tl.constexpr, EMULATE: tl.constexpr, ROUND_OUT: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """out[b] (M x N) = S_b @ X[b] (LEFT, M = n) or X[b] @ S_b (N = n)."""
    k = tl.program_id(1).to(tl.int64)
    codes_ptr += k * code_stride
    absmax_ptr += k * scale_stride
    diag_ptr += k * n
    x_ptr += k * stride_xb
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, n, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < n
        if LEFT:
            a = _sym_value(codes_ptr, absmax_ptr, cb_ptr, diag_ptr, bstart_ptr, rm[:, None], rk[None, :], n,
                           m_ok[:, None] & k_ok[None, :], BLOCK_SIZE, BITS, True)
            b_ptrs = x_ptr + rk[:, None].to(tl.int64) * stride_xm + rn[None, :].to(tl.int64) * stride_xn
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        else:
            a_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :].to(tl.int64) * stride_xn
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            b = _sym_value(codes_ptr, absmax_ptr, cb_ptr, diag_ptr, bstart_ptr, rk[:, None], rn[None, :], n,
                           k_ok[:, None] & n_ok[None, :], BLOCK_SIZE, BITS, True)
        acc = _dot(a, b, acc, COMPUTE, EMULATE)
    if ROUND_OUT:
        acc = _round_bf16(acc)  # bf16 output in the interpreter, whose own cast truncates
    offs = k * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _store_kernel(x_ptr, stride_r, stride_c, n, nscales, block_row_ptr, bstart_ptr, mids_ptr, absmax_ptr, idx_ptr,
                  BLOCK_SIZE: tl.constexpr, BSP: tl.constexpr, UNITS: tl.constexpr, BITS: tl.constexpr,
                  ROUND_BF16: tl.constexpr):
    pid = tl.program_id(0)
    u = pid * UNITS + tl.arange(0, UNITS)  # scale (block) ids
    ok = u < nscales
    i = tl.load(block_row_ptr + u, mask=ok, other=0)
    c0 = i + 1 + (u - tl.load(bstart_ptr + i, mask=ok, other=0)) * BLOCK_SIZE
    t = tl.arange(0, BSP)
    c = c0[:, None] + t[None, :]
    mask = ok[:, None] & (t[None, :] < BLOCK_SIZE) & (c < n)
    i64 = i.to(tl.int64)[:, None]
    v = tl.load(x_ptr + i64 * stride_r + c.to(tl.int64) * stride_c, mask=mask, other=0.0).to(tl.float32)
    a = tl.abs(v)
    # max() may drop NaN on the GPU; the sum term is 0, or NaN when the block holds a NaN
    amax = tl.max(a, axis=1) + tl.sum(tl.where(a != a, a, 0.0), axis=1)
    if ROUND_BF16:
        amax = _round_bf16(amax)
    tl.store(absmax_ptr + u, amax, mask=ok)
    scale = tl.where(amax > 0, amax, 1.0)
    idx = _bucketize(tl.math.div_rn(v, scale[:, None]), mids_ptr, BITS)
    f = i64 * n - (i64 * (i64 + 1)) // 2 + (c - i[:, None] - 1)
    tl.store(idx_ptr + f, idx.to(tl.uint8), mask=mask)


@triton.jit
def _pack_kernel(idx_ptr, codes_ptr, numel, nbytes, UNITS: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * UNITS + tl.arange(0, UNITS)
    lo = tl.load(idx_ptr + 2 * p, mask=2 * p < numel, other=0).to(tl.int32)
    hi = tl.load(idx_ptr + 2 * p + 1, mask=2 * p + 1 < numel, other=0).to(tl.int32)
    tl.store(codes_ptr + p, (lo | (hi << 4)).to(tl.uint8), mask=p < nbytes)


INTERPRETED: bool = _is_interpreted(_rebuild_kernel)
"""Whether these kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""


# ----------------------------------------------------------------------------- launch helpers


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _tile_elems() -> int:
    """Elements per program: under the interpreter as many as numpy vectorizes well (each program
    costs a fixed ~0.1 s of tracing there), on a GPU a register-sized tile."""
    return 1 << 18 if INTERPRETED else 4096


@functools.lru_cache(maxsize=64)
def _tables(n: int, block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 first block of every triangle row (n entries), and the triangle row of every block."""
    _, bstarts = _triangle_layout(n, block_size)
    bstart = torch.tensor(bstarts[:n] if n else [0], dtype=torch.int32)
    counts = torch.tensor([bstarts[i + 1] - bstarts[i] for i in range(max(n - 1, 0))], dtype=torch.int64)
    block_row = torch.repeat_interleave(torch.arange(counts.numel(), dtype=torch.int32), counts)
    if block_row.numel() == 0:
        block_row = torch.zeros(1, dtype=torch.int32)
    return bstart.to(device), block_row.to(device)


def _sizes(n: int, bits: int, block_size: int) -> tuple[int, int, int]:
    """(triangle elements, code bytes, scales) of an order-n root."""
    starts, bstarts = _triangle_layout(n, block_size)
    numel = starts[-1]
    return numel, (numel + 1) // 2 if bits == 4 else numel, bstarts[-1]


def _check(codes, absmax, diag, codebook, n, bits, block_size):
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r} is not supported; choose 4 or 8")
    if codebook.numel() != 2**bits:
        raise ValueError(f"a {bits}-bit codebook needs {2**bits} values, got {codebook.numel()}")
    numel, nbytes, nscales = _sizes(n, bits, block_size)
    if codes.dim() != 2 or codes.dtype != torch.uint8 or codes.shape[1] < nbytes:
        raise ValueError(f"codes must be uint8 (k, >= {nbytes}) for order {n}, got {tuple(codes.shape)} {codes.dtype}")
    if absmax.dim() != 2 or absmax.shape[1] < nscales or absmax.shape[0] != codes.shape[0]:
        raise ValueError(f"absmax must be (k, >= {nscales}) for order {n}, got {tuple(absmax.shape)}")
    if diag.dim() != 2 or diag.shape != (codes.shape[0], n):
        raise ValueError(f"diag must be (k, {n}), got {tuple(diag.shape)}")
    if n * n > _INT32_MAX:
        raise ValueError(f"a root of order {n} is too large for the Triton kernels")


def _operands(codes, absmax, diag, codebook, device):
    codes = codes if codes.stride(-1) == 1 else codes.contiguous()
    if absmax.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        absmax = absmax.float()
    absmax = absmax if absmax.stride(-1) == 1 else absmax.contiguous()
    diag = diag.to(torch.float32).contiguous()
    cb = codebook.detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous()
    return codes, absmax, diag, cb


def rebuild(codes, absmax, diag, codebook, n: int, bits: int, block_size: int, r0: int = 0, r1: int | None = None):
    """Rows ``r0 .. r1-1`` of ``k`` stored symmetric matrices: fp32 ``(k, r1 - r0, n)``.

    ``codes`` (k, bytes), ``absmax`` (k, scales), ``diag`` (k, n): one row per root."""
    r1 = n if r1 is None else r1
    _check(codes, absmax, diag, codebook, n, bits, block_size)
    device = codes.device
    k, rows = codes.shape[0], r1 - r0
    out = torch.empty(k, rows, n, dtype=torch.float32, device=device)
    if k == 0 or rows == 0 or n == 0:
        return out
    codes, absmax, diag, cb = _operands(codes, absmax, diag, codebook, device)
    bstart, _ = _tables(n, block_size, device)
    bc = min(1024 if INTERPRETED else 128, _next_pow2(n))
    br = max(1, min(_tile_elems() // bc, _next_pow2(rows)))
    grid = (triton.cdiv(rows, br) * triton.cdiv(n, bc), k)
    _rebuild_kernel[grid](codes, absmax, cb, diag, bstart, out, n, r0, rows, codes.stride(0), absmax.stride(0),
                          BLOCK_SIZE=block_size, BITS=bits, BR=br, BC=bc)
    return out


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def matmul_config(M: int, N: int, K: int, batch: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes for a ``batch x M x N`` output with inner dimension ``K``. No autotuning: under
    the interpreter the largest tiles that fit (fewest programs); on a GPU 64 x 64 x 32 tiles for
    fp32 products and 128 x 128 x 64 for 16-bit ones, halved while there are fewer programs than SMs."""
    if INTERPRETED:
        return {"BM": min(64, max(16, _next_pow2(M))), "BN": min(64, max(16, _next_pow2(N))),
                "BK": min(64, max(16, _next_pow2(K))), "GROUP_M": 8, "num_warps": 4, "num_stages": 1}
    low = dtype != torch.float32
    bm = min(128 if low else 64, max(32, _next_pow2(M)))
    bn = min(128 if low else 64, max(32, _next_pow2(N)))
    sms = _sm_count(device)
    while batch * triton.cdiv(M, bm) * triton.cdiv(N, bn) < sms and max(bm, bn) > 32:
        if bn >= bm:
            bn //= 2
        else:
            bm //= 2
    return {"BM": bm, "BN": bn, "BK": 32, "GROUP_M": 8, "num_warps": 8 if bm * bn >= 128 * 128 else 4,
            "num_stages": 3}


def matmul(codes, absmax, diag, codebook, x, n: int, bits: int, block_size: int, *, left: bool,
           dtype: torch.dtype = torch.float32, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``S_b @ x[b]`` (``left``) or ``x[b] @ S_b`` for ``k`` stored symmetric ``S``, decoded tile by tile.

    ``x`` (k, m, N); ``dtype``: the dot's input type (fp32 / bf16 / fp16), fp32 accumulation."""
    if dtype not in _COMPUTE:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {tuple(_COMPUTE)}")
    _check(codes, absmax, diag, codebook, n, bits, block_size)
    if x.dim() != 3 or x.shape[0] != codes.shape[0] or x.shape[1 if left else 2] != n:
        raise ValueError(f"x must be (k, {n}, N) (left) or (k, M, {n}) (right), got {tuple(x.shape)}")
    device = x.device
    k, M, N = x.shape
    out = torch.empty(k, M, N, dtype=out_dtype, device=device)
    if k == 0 or M == 0 or N == 0:
        return out
    if x.dtype not in _COMPUTE:
        x = x.float()
    codes, absmax, diag, cb = _operands(codes, absmax, diag, codebook, device)
    bstart, _ = _tables(n, block_size, device)
    cfg = matmul_config(M, N, n, k, dtype, device)
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]), k)
    _matmul_kernel[grid](
        codes, absmax, cb, diag, bstart, x, out, M, N, n, codes.stride(0), absmax.stride(0),
        x.stride(0), x.stride(1), x.stride(2),
        LEFT=left, BLOCK_SIZE=block_size, BITS=bits, COMPUTE=_COMPUTE[dtype],
        EMULATE=INTERPRETED and dtype != torch.float32, ROUND_OUT=INTERPRETED and out_dtype == torch.bfloat16, **cfg,
    )  # fmt: skip
    return out


def quantize_symmetric(x: torch.Tensor, codebook: torch.Tensor, bits: int, block_size: int,
                       scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quant.quantize_symmetric`` bit for bit for fp32 and bf16 scales: (codes, absmax, diag)."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r} is not supported; choose 4 or 8")
    if scale_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the Triton store takes fp32 or bf16 scales, got {scale_dtype}")
    if x.dim() != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"quantize_symmetric needs a square matrix, got shape {tuple(x.shape)}")
    if codebook.numel() != 2**bits:
        raise ValueError(f"a {bits}-bit codebook needs {2**bits} values, got {codebook.numel()}")
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.float()
    n, device = x.shape[0], x.device
    if n * n > _INT32_MAX:
        raise ValueError(f"a matrix of order {n} is too large for the Triton store")
    numel, nbytes, nscales = _sizes(n, bits, block_size)
    diag = x.diagonal().to(torch.float32, copy=True)
    codes = torch.empty(nbytes, dtype=torch.uint8, device=device)
    absmax = torch.empty(nscales, dtype=torch.float32, device=device)
    if numel == 0:
        return codes, absmax.to(scale_dtype), diag
    cb = codebook.detach().reshape(-1).to(device=device, dtype=torch.float32)
    mids = midpoints(cb).contiguous()
    bstart, block_row = _tables(n, block_size, device)
    idx = torch.empty(numel, dtype=torch.uint8, device=device) if bits == 4 else codes
    bsp = _next_pow2(min(block_size, n - 1))  # no block is longer than the first triangle row
    units = max(1, min(_tile_elems() // bsp, _next_pow2(nscales)))
    _store_kernel[(triton.cdiv(nscales, units),)](
        x, x.stride(0), x.stride(1), n, nscales, block_row, bstart, mids, absmax, idx,
        BLOCK_SIZE=block_size, BSP=bsp, UNITS=units, BITS=bits, ROUND_BF16=scale_dtype == torch.bfloat16,
    )  # fmt: skip
    if bits == 4:
        units = min(_tile_elems() if INTERPRETED else 1024, _next_pow2(nbytes))
        _pack_kernel[(triton.cdiv(nbytes, units),)](idx, codes, numel, nbytes, UNITS=units)
    return codes, absmax.to(scale_dtype), diag
