"""One fused Triton kernel per tensor for AdamW / SGD steps with 8- or 4-bit moments.

Layout and math are those of :mod:`lightning_shampoo4.quant.moments` (read its docstring):
flat blocks of ``block_size`` elements, one fp32 absmax per block, codes one per byte (8 bits)
or two per byte (4 bits, element 2k low nibble). The kernel reproduces
``moments.reference_update`` op for op.

``_moment_kernel``
    One program owns ``UNITS`` whole blocks, so it can requantize them without talking to
    other programs. It reads the parameter, the gradient and the codes of each moment,
    dequantizes (codebook gather times block absmax), applies the AdamW or SGD update in fp32,
    writes the parameter in its own dtype, then takes the new block absmax and writes the new
    codes (nearest codebook entry: the number of midpoints strictly below the normalized
    value, as ``torch.bucketize``) and absmax in place. Parameters, gradients and 8-bit codes
    are loaded as contiguous ``UNITS x block_size`` tiles (coalesced) and split into their even
    and odd columns, which are exactly the low and high nibbles of a 4-bit code byte, so
    packing is a shift and an or.

Per element the step reads param + grad + 1 or 2 code bytes (8 bits) or nibbles (4 bits) and
writes them back: a single pass over memory instead of dequantize / update / quantize passes.
Scalars are fp32 runtime arguments (a changing learning rate never recompiles). Division and
square root are IEEE round-to-nearest (``div_rn`` / ``sqrt_rn``) like torch; compiled on a GPU
the compiler may still contract a multiply and an add into an FMA, so parameters can differ
from the reference in the last bit there (exact in the interpreter).

Interpreter (``TRITON_INTERPRET=1``): values are upcast to fp32 right after ``tl.load`` and a
bf16 parameter is rounded with ``_round_bf16`` before the store (the interpreter's own cast
truncates), as in ``triton_quant``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.blockwise import packed_numel
from ..quant.codebooks import midpoints
from .triton_quant import _bucketize, _is_interpreted, _round_bf16

__all__ = ["INTERPRETED", "moment_update"]

_BASES = {"adamw": 0, "sgd": 1}
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT32_MAX = 2**31 - 1


@triton.jit
def _split(x, UNITS: tl.constexpr, HALF: tl.constexpr):
    """The even and odd columns of a ``UNITS x 2 HALF`` tile."""
    return tl.split(tl.reshape(x, (UNITS, HALF, 2)))


@triton.jit
def _merge(x0, x1, UNITS: tl.constexpr, HALF: tl.constexpr):
    """Inverse of :func:`_split`."""
    return tl.reshape(tl.join(x0, x1), (UNITS, 2 * HALF))


@triton.jit
def _load_codes(codes_ptr, e, ok, pair, ok_pair, UNITS: tl.constexpr, HALF: tl.constexpr, BITS: tl.constexpr):
    """Codes (int32) of the even / odd elements of the blocks (``e``: the element tile)."""
    if BITS == 4:
        byte = tl.load(codes_ptr + pair, mask=ok_pair, other=0).to(tl.int32)
        lo = byte & 0xF
        hi = (byte >> 4) & 0xF
    else:
        lo, hi = _split(tl.load(codes_ptr + e, mask=ok, other=0).to(tl.int32), UNITS, HALF)
    return lo, hi


@triton.jit
def _store_codes(codes_ptr, e, ok, pair, ok_pair, lo, hi, UNITS: tl.constexpr, HALF: tl.constexpr, BITS: tl.constexpr):
    if BITS == 4:
        tl.store(codes_ptr + pair, (lo | (hi << 4)).to(tl.uint8), mask=ok_pair)
    else:
        tl.store(codes_ptr + e, _merge(lo, hi, UNITS, HALF).to(tl.uint8), mask=ok)


@triton.jit
def _requantize(x0, x1, ok0, ok1, mids_ptr, BITS: tl.constexpr):
    """Block absmax (one per row) and the codes of the even / odd tiles."""
    a0 = tl.where(ok0, tl.abs(x0), 0.0)
    a1 = tl.where(ok1, tl.abs(x1), 0.0)
    amax = tl.maximum(tl.max(a0, axis=1), tl.max(a1, axis=1))
    safe = tl.where(amax > 0, amax, 1.0)[:, None]
    c0 = _bucketize(tl.math.div_rn(x0, safe), mids_ptr, BITS)
    c1 = _bucketize(tl.math.div_rn(x1, safe), mids_ptr, BITS)
    return amax, tl.where(ok0, c0, 0), tl.where(ok1, c1, 0)


@triton.jit
def _adamw_half(p, g, m, v, w1, beta2, w2, eps, inv_bc2, decay, neg_step, HAS_DECAY: tl.constexpr):
    m = m + (g - m) * w1
    v = v * beta2 + (g * g) * w2
    denom = tl.sqrt_rn(v) * inv_bc2 + eps
    if HAS_DECAY:
        p = p * decay
    p = p + tl.math.div_rn(m, denom) * neg_step
    return p, m, v


@triton.jit
def _sgd_half(p, g, buf, momentum, weight_decay, neg_lr, HAS_DECAY: tl.constexpr, NESTEROV: tl.constexpr):
    if HAS_DECAY:
        g = g + p * weight_decay
    buf = buf * momentum + g
    if NESTEROV:
        upd = g + buf * momentum
    else:
        upd = buf
    p = p + upd * neg_lr
    return p, buf


@triton.jit
def _moment_kernel(
    p_ptr,
    g_ptr,
    c1_ptr,
    a1_ptr,
    cb1_ptr,
    mid1_ptr,
    c2_ptr,
    a2_ptr,
    cb2_ptr,
    mid2_ptr,
    numel,
    nbytes,
    nblocks,
    s0,
    s1,
    s2,
    s3,
    s4,
    s5,
    s6,
    BASE: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    UNITS: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    NESTEROV: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    HALF: tl.constexpr = BLOCK // 2
    pid = tl.program_id(0)
    u = pid.to(tl.int64) * UNITS + tl.arange(0, UNITS)  # block ids
    u_ok = u < nblocks
    e = u[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # the elements of the blocks, contiguous
    ok = e < numel
    pair = u[:, None] * HALF + tl.arange(0, HALF)[None, :]  # element pairs (2k, 2k + 1)
    ok_pair = pair < nbytes
    ok0 = 2 * pair < numel
    ok1 = 2 * pair + 1 < numel

    p0, p1 = _split(tl.load(p_ptr + e, mask=ok, other=0.0).to(tl.float32), UNITS, HALF)
    g0, g1 = _split(tl.load(g_ptr + e, mask=ok, other=0.0).to(tl.float32), UNITS, HALF)

    am1 = tl.load(a1_ptr + u, mask=u_ok, other=0.0)[:, None]
    k0, k1 = _load_codes(c1_ptr, e, ok, pair, ok_pair, UNITS, HALF, BITS)
    x0 = tl.load(cb1_ptr + k0) * am1
    x1 = tl.load(cb1_ptr + k1) * am1
    if BASE == 0:
        am2 = tl.load(a2_ptr + u, mask=u_ok, other=0.0)[:, None]
        j0, j1 = _load_codes(c2_ptr, e, ok, pair, ok_pair, UNITS, HALF, BITS)
        y0 = tl.load(cb2_ptr + j0) * am2
        y1 = tl.load(cb2_ptr + j1) * am2
        p0, x0, y0 = _adamw_half(p0, g0, x0, y0, s0, s1, s2, s3, s4, s5, s6, HAS_DECAY)
        p1, x1, y1 = _adamw_half(p1, g1, x1, y1, s0, s1, s2, s3, s4, s5, s6, HAS_DECAY)
    else:
        p0, x0 = _sgd_half(p0, g0, x0, s0, s1, s2, HAS_DECAY, NESTEROV)
        p1, x1 = _sgd_half(p1, g1, x1, s0, s1, s2, HAS_DECAY, NESTEROV)

    p_new = _merge(p0, p1, UNITS, HALF)
    if ROUND_BF16:
        p_new = _round_bf16(p_new)
    tl.store(p_ptr + e, p_new.to(p_ptr.dtype.element_ty), mask=ok)

    amax, k0, k1 = _requantize(x0, x1, ok0, ok1, mid1_ptr, BITS)
    tl.store(a1_ptr + u, amax, mask=u_ok)
    _store_codes(c1_ptr, e, ok, pair, ok_pair, k0, k1, UNITS, HALF, BITS)
    if BASE == 0:
        amax, j0, j1 = _requantize(y0, y1, ok0, ok1, mid2_ptr, BITS)
        tl.store(a2_ptr + u, amax, mask=u_ok)
        _store_codes(c2_ptr, e, ok, pair, ok_pair, j0, j1, UNITS, HALF, BITS)


INTERPRETED: bool = _is_interpreted(_moment_kernel)
"""Whether the kernel was built for Triton's CPU interpreter (then it accepts CPU tensors)."""


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _tile_elems() -> int:
    """Elements per program: large under the interpreter (fewer, vectorized numpy programs)."""
    return 16384 if INTERPRETED else 2048


def _table(cb: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    cb = cb.detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous()
    return cb, midpoints(cb).contiguous()


def moment_update(
    base: str,
    p: torch.Tensor,
    grad: torch.Tensor,
    moments: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    bits: int,
    block_size: int,
    hyper: dict,
) -> None:
    """The fused step of ``moments.reference_update`` in one Triton launch (in place)."""
    if base not in _BASES:
        raise ValueError(f"base={base!r} is not supported; choose one of {tuple(_BASES)}")
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r}: the fused moment kernel handles 8 or 4 bits")
    if block_size < 2 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size!r} must be a power of two >= 2")
    if len(moments) != (2 if base == "adamw" else 1):
        raise ValueError(f"{base} takes {2 if base == 'adamw' else 1} moments, got {len(moments)}")
    if p.dtype not in _PARAM_DTYPES:
        raise ValueError(f"parameters of dtype {p.dtype} are not supported; use one of {_PARAM_DTYPES}")
    numel = p.numel()
    if numel > _INT32_MAX:
        raise ValueError(f"a tensor of {numel} elements is too large for the fused moment kernel")
    nblocks = -(-numel // block_size)
    nbytes = packed_numel(numel, bits)
    tables = []
    for codes, absmax, cb in moments:
        if codes.dtype != torch.uint8 or codes.numel() != nbytes or not codes.is_contiguous():
            raise ValueError(f"codes must be a contiguous uint8 tensor of {nbytes} bytes")
        if absmax.dtype != torch.float32 or absmax.numel() != nblocks or not absmax.is_contiguous():
            raise ValueError(f"absmax must be a contiguous fp32 tensor of {nblocks} blocks")
        if cb.numel() != 2**bits:
            raise ValueError(f"a {bits}-bit codebook needs {2**bits} values, got {cb.numel()}")
        tables.append((codes, absmax, *_table(cb, p.device)))
    if numel == 0:
        return
    work = p if p.is_contiguous() else p.contiguous()
    g = grad.detach()
    g = g if g.is_contiguous() else g.contiguous()
    if g.dtype not in _PARAM_DTYPES:
        g = g.float()
    c1, a1, cb1, mid1 = tables[0]
    c2, a2, cb2, mid2 = tables[1] if len(tables) > 1 else tables[0]
    if base == "adamw":
        scalars = [hyper[k] for k in ("w1", "beta2", "w2", "eps", "inv_bc2", "decay", "neg_step")]
        has_decay, nesterov = hyper["decay"] != 1.0, False
    else:
        scalars = [hyper["momentum"], hyper["weight_decay"], hyper["neg_lr"], 0.0, 0.0, 0.0, 0.0]
        has_decay, nesterov = hyper["weight_decay"] != 0.0, bool(hyper["nesterov"])
    units = max(1, min(_tile_elems() // block_size, _next_pow2(nblocks)))
    grid = (triton.cdiv(nblocks, units),)
    _moment_kernel[grid](
        work, g, c1, a1, cb1, mid1, c2, a2, cb2, mid2, numel, nbytes, nblocks, *[float(s) for s in scalars],
        BASE=_BASES[base], BITS=bits, BLOCK=block_size, UNITS=units, HAS_DECAY=has_decay, NESTEROV=nesterov,
        ROUND_BF16=INTERPRETED and p.dtype == torch.bfloat16,
    )  # fmt: skip
    if work is not p:
        p.copy_(work)
