"""Fused Shampoo preconditioning ``D(L_root) @ G @ D(R_root)`` in Triton.

A quantized root (a :class:`~lightning_shampoo4.kernels.types.QuantizedMatrix`, 4- or 8-bit,
optionally diag-real) is never expanded to a dense fp32 ``n x n`` matrix: its tiles are
dequantized on the fly inside the matmul loop, straight from the flat code buffer, the
block absmax and the codebook.

``_left_kernel``
    ``X = D(L) @ G``: program (m-tile, n-tile) walks k, dequantizing the ``BM x BK`` tile of L
    and loading the ``BK x BN`` tile of G.
``_right_kernel``
    ``Y = X @ D(R)``: the mirror image, dequantizing the ``BK x BN`` tile of R.

Diag-real roots: the tile entries on the diagonal are replaced by the fp32 diagonal inside
the kernel (``where(i == j, diag[i], tile)``), i.e. the term ``diag[i] * G[i, :]`` enters
through the same dot product. Replacing, rather than adding, keeps codebooks without an
exact zero (``linear``) correct, where the zeroed diagonal's code does not decode to 0.

Both kernels accumulate in fp32. ``dtype`` picks the input type of the tile dot products:
fp32 (IEEE, no TF32, like ``torch.matmul`` with its default settings), bf16 or fp16. With a
low-precision ``dtype`` the intermediate ``X`` is stored in that dtype (it is the input of the
second product, as in the reference ``(L @ G) @ R``); the result is fp32 and is not rounded to
``dtype`` (the reference's is). A dense root side falls back to ``torch.matmul`` on
``dtype``-rounded operands (a dense right side multiplies in fp32 so that the result keeps
fp32 precision); two dense roots are exactly the reference.

Interpreter: bf16 / fp16 tiles are rounded in fp32 (see ``triton_quant._round_bf16``) and
multiplied with an fp32 dot, which is what the tensor cores compute.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_quant import _is_interpreted, _load_codes, _lookup, _round_bf16
from .types import QuantizedMatrix

__all__ = ["INTERPRETED", "matmul_config", "precondition", "quantized_matmul"]

_COMPUTE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_INT32_MAX = 2**31 - 1


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
def _store_tile(out_ptr, acc, rm, rn, M, N, stride_om, stride_on, ROUND_OUT: tl.constexpr):
    if ROUND_OUT:
        acc = _round_bf16(acc)  # bf16 output in the interpreter, whose own cast truncates
    ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :].to(tl.int64) * stride_on
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _left_kernel(
    codes_ptr,
    absmax_ptr,
    cb_ptr,
    diag_ptr,
    g_ptr,
    out_ptr,
    M,
    N,
    nblocks,
    stride_gm,
    stride_gn,
    stride_om,
    stride_on,
    BLOCK_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    HAS_DIAG: tl.constexpr,
    COMPUTE: tl.constexpr,
    EMULATE: tl.constexpr,
    ROUND_OUT: tl.constexpr,
    ALIGNED: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out (M x N) = D(L) (M x M, quantized) @ G (M x N)."""
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    if HAS_DIAG:
        d = tl.load(diag_ptr + rm, mask=m_ok, other=0.0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, M, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < M
        a_mask = m_ok[:, None] & k_ok[None, :]
        code = _load_codes(codes_ptr, rm[:, None], rk[None, :], M, a_mask, BITS)
        if ALIGNED:  # the k-tile lies in one absmax block of each row
            amax = tl.load(absmax_ptr + rm * nblocks + k0 // BLOCK_SIZE, mask=m_ok, other=0.0)[:, None]
        else:
            amax = tl.load(absmax_ptr + rm[:, None] * nblocks + rk[None, :] // BLOCK_SIZE, mask=a_mask, other=0.0)
        a = tl.where(a_mask, _lookup(cb_ptr, code, BITS, True) * amax, 0.0)
        if HAS_DIAG:
            a = tl.where(rm[:, None] == rk[None, :], d[:, None], a)
        g_ptrs = g_ptr + rk[:, None].to(tl.int64) * stride_gm + rn[None, :].to(tl.int64) * stride_gn
        b = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        acc = _dot(a, b, acc, COMPUTE, EMULATE)
    _store_tile(out_ptr, acc, rm, rn, M, N, stride_om, stride_on, ROUND_OUT)


@triton.jit
def _right_kernel(
    codes_ptr,
    absmax_ptr,
    cb_ptr,
    diag_ptr,
    x_ptr,
    out_ptr,
    M,
    N,
    nblocks,
    stride_xm,
    stride_xn,
    stride_om,
    stride_on,
    BLOCK_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    HAS_DIAG: tl.constexpr,
    COMPUTE: tl.constexpr,
    EMULATE: tl.constexpr,
    ROUND_OUT: tl.constexpr,
    ALIGNED: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out (M x N) = X (M x N) @ D(R) (N x N, quantized)."""
    pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    if HAS_DIAG:
        d = tl.load(diag_ptr + rn, mask=n_ok, other=0.0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, N, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < N
        x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :].to(tl.int64) * stride_xn
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        b_mask = k_ok[:, None] & n_ok[None, :]
        code = _load_codes(codes_ptr, rk[:, None], rn[None, :], N, b_mask, BITS)
        if ALIGNED:  # the n-tile lies in one absmax block of each row of R
            amax = tl.load(absmax_ptr + rk * nblocks + (pid_n * BN) // BLOCK_SIZE, mask=k_ok, other=0.0)[:, None]
        else:
            amax = tl.load(absmax_ptr + rk[:, None] * nblocks + rn[None, :] // BLOCK_SIZE, mask=b_mask, other=0.0)
        b = tl.where(b_mask, _lookup(cb_ptr, code, BITS, True) * amax, 0.0)
        if HAS_DIAG:
            b = tl.where(rk[:, None] == rn[None, :], d[None, :], b)
        acc = _dot(a, b, acc, COMPUTE, EMULATE)
    _store_tile(out_ptr, acc, rm, rn, M, N, stride_om, stride_on, ROUND_OUT)


INTERPRETED: bool = _is_interpreted(_left_kernel)
"""Whether these kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""


# ----------------------------------------------------------------------------- launch helpers


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _divisor_tile(tile: int, block_size: int) -> int:
    """The largest power-of-two tile <= ``tile`` (and >= 16) that divides ``block_size``, else ``tile``."""
    t = tile
    while t > 16 and block_size % t:
        t //= 2
    return t if block_size % t == 0 else tile


def matmul_config(
    side: str, M: int, N: int, K: int, block_size: int, bits: int, dtype: torch.dtype, device: torch.device
) -> dict:
    """Tile sizes and launch options for an ``M x N`` output with inner dimension ``K``.

    No autotuning (the interpreter allows one config, and the optimizer's shapes are few and
    small). Under the interpreter: the largest tiles that fit the problem (fewest programs).
    On a GPU: 64 x 64 x 32 tiles for fp32 products, 128 x 128 x 64 for 16-bit ones, halved
    while there are fewer programs than SMs. The tile that walks along the quantized root's
    rows (BK on the left, BN on the right) is made to divide ``block_size`` where possible,
    so that each row's absmax is one scalar per tile (``ALIGNED``) instead of a gather. Gathers
    (8-bit codebook lookups, unaligned absmax) are staged in shared memory by the software
    pipeline, so those cases get a smaller BK (left side) to stay well inside 100 KB.
    """
    if INTERPRETED:
        cfg = {
            "BM": min(64, max(16, _next_pow2(M))),
            "BN": min(64, max(16, _next_pow2(N))),
            "BK": min(64, max(16, _next_pow2(K))),
            "GROUP_M": 8,
            "num_warps": 4,
            "num_stages": 1,
        }
    else:
        low = dtype != torch.float32
        bm = min(128 if low else 64, max(32, _next_pow2(M)))
        bn = min(128 if low else 64, max(32, _next_pow2(N)))
        sms = _sm_count(device)
        while triton.cdiv(M, bm) * triton.cdiv(N, bn) < sms and max(bm, bn) > 32:
            if bn >= bm:
                bn //= 2
            else:
                bm //= 2
        cfg = {
            "BM": bm,
            "BN": bn,
            "BK": 64 if low else 32,
            "GROUP_M": 8,
            "num_warps": 8 if bm * bn >= 128 * 128 else 4,
            "num_stages": 3,
        }
    key = "BK" if side == "left" else "BN"
    cfg[key] = _divisor_tile(cfg[key], block_size)
    if not INTERPRETED and side == "left" and (bits == 8 or block_size % cfg["BK"]):
        cfg["BK"] = min(cfg["BK"], 32)
    cfg["ALIGNED"] = block_size % cfg[key] == 0
    return cfg


def _check_root(root: QuantizedMatrix, order: int, side: str, device: torch.device) -> None:
    if root.bits not in (4, 8):
        raise ValueError(f"{side} root: bits={root.bits!r} is not supported; choose 4 or 8")
    if root.order != order:
        raise ValueError(f"{side} root has order {root.order}, the gradient block needs {order}")
    n = root.order
    need = (n * n + 1) // 2 if root.bits == 4 else n * n
    if root.codes.dtype != torch.uint8 or root.codes.numel() < need:
        raise ValueError(f"{side} root: codes must be uint8 with at least {need} entries, got {root.codes.numel()}")
    nblocks = -(-n // root.block_size)
    if root.absmax.numel() != n * nblocks:
        raise ValueError(f"{side} root: absmax must hold {n * nblocks} blocks, got {root.absmax.numel()}")
    if root.diag is not None and root.diag.numel() != n:
        raise ValueError(f"{side} root: diag must hold {n} values, got {root.diag.numel()}")
    if root.codes.device != device:
        raise ValueError(f"{side} root is on {root.codes.device}, the gradient on {device}")
    if n * n > _INT32_MAX // 2:
        raise ValueError(f"{side} root of order {n} is too large for the fused kernel")


def _root_args(root: QuantizedMatrix, device: torch.device):
    codes = root.codes.reshape(-1).contiguous()
    absmax = root.absmax.reshape(-1).to(torch.float32).contiguous()
    cb = root.codebook.detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous()
    if cb.numel() != 2**root.bits:
        raise ValueError(f"a {root.bits}-bit codebook needs {2**root.bits} values, got {cb.numel()}")
    diag = absmax  # any valid pointer when there is no diagonal (HAS_DIAG=False)
    if root.diag is not None:
        diag = root.diag.reshape(-1).to(device=device, dtype=torch.float32).contiguous()
    nblocks = -(-root.order // root.block_size)
    return codes, absmax, cb, diag, nblocks


def quantized_matmul(
    root: QuantizedMatrix,
    x: torch.Tensor,
    *,
    side: str,
    dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``D(root) @ x`` (``side="left"``) or ``x @ D(root)`` (``side="right"``), dequantizing on the fly."""
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r} is not supported; choose 'left' or 'right'")
    if dtype not in _COMPUTE:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {tuple(_COMPUTE)}")
    if x.dim() != 2:
        raise ValueError(f"x must be a matrix, got shape {tuple(x.shape)}")
    M, N = x.shape
    _check_root(root, M if side == "left" else N, side, x.device)
    out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if x.dtype not in _COMPUTE:
        x = x.float()
    codes, absmax, cb, diag, nblocks = _root_args(root, x.device)
    cfg = matmul_config(side, M, N, root.order, root.block_size, root.bits, dtype, x.device)
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    kernel = _left_kernel if side == "left" else _right_kernel
    kernel[grid](
        codes, absmax, cb, diag, x, out, M, N, nblocks,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        BLOCK_SIZE=root.block_size, BITS=root.bits, HAS_DIAG=root.diag is not None,
        COMPUTE=_COMPUTE[dtype], EMULATE=INTERPRETED and dtype != torch.float32,
        ROUND_OUT=INTERPRETED and out_dtype == torch.bfloat16, **cfg,
    )  # fmt: skip
    return out


def precondition(
    grad: torch.Tensor,
    left: torch.Tensor | QuantizedMatrix,
    right: torch.Tensor | QuantizedMatrix,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``left @ grad @ right`` as an fp32 tensor; quantized roots are dequantized tile by tile.

    ``dtype`` is the input type of the products (fp32, bf16 or fp16), accumulation is fp32.
    """
    if dtype not in _COMPUTE:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {tuple(_COMPUTE)}")
    if grad.dim() != 2:
        raise ValueError(f"grad must be a matrix block, got shape {tuple(grad.shape)}")
    grad = grad.detach()
    m, n = grad.shape
    for side, root, order in (("left", left, m), ("right", right, n)):
        if isinstance(root, torch.Tensor) and tuple(root.shape) != (order, order):
            raise ValueError(f"{side} root must be {order} x {order} for a {m} x {n} gradient, got {tuple(root.shape)}")
        if not isinstance(root, (torch.Tensor, QuantizedMatrix)):
            raise TypeError(f"{side} root must be a torch.Tensor or a QuantizedMatrix, got {type(root).__name__}")
    left_q = isinstance(left, QuantizedMatrix)
    right_q = isinstance(right, QuantizedMatrix)
    if not left_q and not right_q:
        return (left.to(dtype) @ grad.to(dtype) @ right.to(dtype)).float()
    if left_q:
        # The intermediate is the input of the second product: keep it in ``dtype``.
        x = quantized_matmul(left, grad, side="left", dtype=dtype, out_dtype=dtype)
    else:
        x = left.to(dtype) @ grad.to(dtype)
    if right_q:
        return quantized_matmul(right, x, side="right", dtype=dtype, out_dtype=torch.float32)
    if dtype == torch.float32:
        return x @ right.float()
    # ``dtype`` products summed and returned in fp32, like the fused kernels (a ``dtype``
    # matmul would round the result to ``dtype``).
    return x.float() @ right.to(dtype).float()
