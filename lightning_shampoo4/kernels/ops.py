"""The quantized-matrix operations as ``torch.library`` custom ops (namespace ``lightning_shampoo4``).

Each op has the torch reference (:mod:`lightning_shampoo4.quant`) as its default
implementation, a fake (meta) implementation that only gives shapes, the C kernel of
:mod:`.cpu` as its CPU implementation and the Triton kernels as its CUDA one. ``torch.compile``
sees each as one opaque call (no graph break, no tracing into ctypes or Triton launchers), and
``torch.library.opcheck`` checks them.

Every op takes ``impl``, the implementation the dispatcher (``kernels/__init__.py``) chose:

* ``"torch"``: the reference, on any device;
* ``"native"``: the device's kernel: the C kernel on the CPU (the reference where it cannot be
  built or does not read the layout), Triton on CUDA;
* ``"triton"``: Triton, also for CPU tensors when Triton runs interpreted (``TRITON_INTERPRET=1``).

Ops (``k`` roots of one format are batched: codes ``(k, bytes)``, scales ``(k, scales)``,
diagonals ``(k, n)``):

``rebuild_symmetric``        rows ``r0 .. r1-1`` of stored symmetric matrices, fp32 ``(k, r1 - r0, n)``
``matmul_symmetric``         ``S_b @ x[b]`` or ``x[b] @ S_b``, the root decoded inside the matmul
``quantize_symmetric``       store a symmetric matrix: (codes, scales, fp32 diagonal)
``symmetric_ema``            ``S * beta + o * alpha`` of a stored symmetric ``S``, stored again
``quantize`` / ``dequantize``  the row-block layout (eigenvector matrices ``transpose=True``)
``moment_update``            the fused step with 8- / 4-bit moments, in place
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils import _python_dispatch

from ..quant import blockwise
from ..quant import moments as _moments
from ..quant.blockwise import Quantized, packed_numel
from . import cpu
from .types import QuantizedMatrix

NS = "lightning_shampoo4"
IMPLS = ("torch", "native", "triton")
_HYPER = {"adamw": ("w1", "beta2", "w2", "eps", "inv_bc2", "decay", "neg_step"),
          "sgd": ("momentum", "weight_decay", "neg_lr")}


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")


def _triton_symmetric():
    from . import triton_symmetric

    return triton_symmetric


def _triton_quant():
    from . import triton_quant

    return triton_quant


# ----------------------------------------------------------------------------- eager calls

_KERNELS: dict[tuple[int, str], Callable[..., Any]] = {}  # (id of the op, device type): its kernel


def _kernel(op: Any, device: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as ``op``'s kernel for ``device`` (and keep it for :func:`call`)."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        op.register_kernel(device)(fn)
        _KERNELS[(id(op), device)] = fn
        return fn

    return register


def _plain(args: Sequence[Any]) -> str | None:
    """The device type of ``args``' tensors when all are plain tensors (no subclass: fake,
    functional, DTensor), else None."""
    device = None
    for a in args:
        if type(a) is Tensor:  # the common case first: this runs on every eager op call
            device = device or a.device.type
        elif isinstance(a, Tensor):
            if not isinstance(a, torch.nn.Parameter):
                return None
            device = device or a.device.type
        elif isinstance(a, (list, tuple)) and a and any(isinstance(t, Tensor) for t in a):
            inner = _plain(a)
            if inner is None:
                return None
            device = device or inner
    return device


def call(op: Any, *args: Any) -> Any:
    """``op(*args)``. In eager mode on plain tensors (nothing tracing, no dispatch mode) this calls
    the op's kernel for the tensors' device directly: the dispatcher's Python layers cost about
    0.1 ms a call, as much as the kernel itself on the small matrices of an optimizer step.
    Anything else (``torch.compile``, fake tensors, ``opcheck``) goes through the dispatcher."""
    if not torch.compiler.is_compiling() and _python_dispatch._get_current_dispatch_mode() is None:
        device = _plain(args)
        fn = None if device is None else _KERNELS.get((id(op), device))
        if fn is not None:
            return fn(*args)
    return op(*args)


# ----------------------------------------------------------------------------- rebuild


def _rebuild_torch(codes, absmax, diag, codebook, n, bits, block_size, r0, r1) -> Tensor:
    out = torch.empty(codes.shape[0], r1 - r0, n, dtype=torch.float32, device=codes.device)
    for b in range(codes.shape[0]):
        q = Quantized(codes[b], absmax[b], diag[b])
        if r0 == 0 and r1 == n:
            blockwise.dequantize_symmetric(q, codebook, n, bits, block_size, out=out[b])
        else:
            out[b].copy_(blockwise.dequantize_symmetric(q, codebook, n, bits, block_size)[r0:r1])
    return out


@torch.library.custom_op(f"{NS}::rebuild_symmetric", mutates_args=())
def rebuild_symmetric(codes: Tensor, absmax: Tensor, diag: Tensor, codebook: Tensor, n: int, bits: int,
                      block_size: int, r0: int, r1: int, impl: str) -> Tensor:
    """Rows ``r0 .. r1-1`` of ``k`` stored symmetric matrices as fp32 ``(k, r1 - r0, n)``."""
    _check_impl(impl)
    return _rebuild_torch(codes, absmax, diag, codebook, n, bits, block_size, r0, r1)


@rebuild_symmetric.register_fake
def _(codes, absmax, diag, codebook, n, bits, block_size, r0, r1, impl):
    return codes.new_empty(codes.shape[0], r1 - r0, n, dtype=torch.float32)


@_kernel(rebuild_symmetric, "cpu")
def _(codes, absmax, diag, codebook, n, bits, block_size, r0, r1, impl):
    _check_impl(impl)
    if impl == "triton":
        return _triton_symmetric().rebuild(codes, absmax, diag, codebook, n, bits, block_size, r0, r1)
    if impl == "native":
        out = torch.empty(codes.shape[0], r1 - r0, n, dtype=torch.float32, device=codes.device)
        done = True
        for b in range(codes.shape[0]):
            root = QuantizedMatrix(codes[b], absmax[b], diag[b], n, codebook, bits, block_size, symmetric=True)
            if not cpu.symmetric_rows(root, r0, r1, out[b]):
                done = False
                break
        if done:
            return out
    return _rebuild_torch(codes, absmax, diag, codebook, n, bits, block_size, r0, r1)


@_kernel(rebuild_symmetric, "cuda")
def _(codes, absmax, diag, codebook, n, bits, block_size, r0, r1, impl):
    _check_impl(impl)
    if impl == "torch":
        return _rebuild_torch(codes, absmax, diag, codebook, n, bits, block_size, r0, r1)
    return _triton_symmetric().rebuild(codes, absmax, diag, codebook, n, bits, block_size, r0, r1)


# ----------------------------------------------------------------------------- fused matmul


def _matmul_torch(codes, absmax, diag, codebook, x, n, bits, block_size, left, dtype, out_dtype, impl) -> Tensor:
    """The workspace path: rebuild (with ``impl``), then a batched matmul in ``dtype``."""
    dense = rebuild_symmetric(codes, absmax, diag, codebook, n, bits, block_size, 0, n,
                              "native" if impl == "triton" else impl).to(dtype)
    out = torch.bmm(dense, x.to(dtype)) if left else torch.bmm(x.to(dtype), dense)
    return out.to(out_dtype)


@torch.library.custom_op(f"{NS}::matmul_symmetric", mutates_args=())
def matmul_symmetric(codes: Tensor, absmax: Tensor, diag: Tensor, codebook: Tensor, x: Tensor, n: int, bits: int,
                     block_size: int, left: bool, dtype: torch.dtype, out_dtype: torch.dtype, impl: str) -> Tensor:
    """``S_b @ x[b]`` (``left``) or ``x[b] @ S_b``; ``dtype``: the products' input type."""
    _check_impl(impl)
    return _matmul_torch(codes, absmax, diag, codebook, x, n, bits, block_size, left, dtype, out_dtype, "torch")


@matmul_symmetric.register_fake
def _(codes, absmax, diag, codebook, x, n, bits, block_size, left, dtype, out_dtype, impl):
    return x.new_empty(x.shape, dtype=out_dtype)


def _matmul_device(codes, absmax, diag, codebook, x, n, bits, block_size, left, dtype, out_dtype, impl):
    _check_impl(impl)
    if impl == "torch" or (impl == "native" and x.device.type == "cpu"):
        return _matmul_torch(codes, absmax, diag, codebook, x, n, bits, block_size, left, dtype, out_dtype, impl)
    return _triton_symmetric().matmul(codes, absmax, diag, codebook, x, n, bits, block_size, left=left, dtype=dtype,
                                      out_dtype=out_dtype)


_kernel(matmul_symmetric, "cpu")(_matmul_device)
_kernel(matmul_symmetric, "cuda")(_matmul_device)


# ----------------------------------------------------------------------------- symmetric store


@torch.library.custom_op(f"{NS}::quantize_symmetric", mutates_args=())
def quantize_symmetric(x: Tensor, codebook: Tensor, bits: int, block_size: int, scale_dtype: torch.dtype,
                       impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric ``x`` stored as (codes, scales, fp32 diagonal); see ``quant.quantize_symmetric``."""
    _check_impl(impl)
    q = blockwise.quantize_symmetric(x, codebook, bits, block_size, scale_dtype=scale_dtype)
    return q.codes, q.absmax, q.diag


def triangle_sizes(n, block_size: int):
    """(elements, scales) of the strict upper triangle of an order-``n`` matrix in blocks per row,
    in closed form (``n`` may be symbolic): rows of lengths 1 .. N = n - 1 hold
    ``sum ceil(L / b) = b Q (Q + 1) / 2 + R (Q + 1)`` blocks, N = Q b + R."""
    big = n - 1
    q, r = big // block_size, big % block_size
    if isinstance(n, int) and n <= 0:
        return 0, 0
    return n * (n - 1) // 2, block_size * q * (q + 1) // 2 + r * (q + 1)


@quantize_symmetric.register_fake
def _(x, codebook, bits, block_size, scale_dtype, impl):
    n = x.shape[0]
    numel, scales = triangle_sizes(n, block_size)
    codes = (numel + 1) // 2 if bits == 4 else numel
    return (x.new_empty(codes, dtype=torch.uint8), x.new_empty(scales, dtype=scale_dtype),
            x.new_empty(n, dtype=torch.float32))


def _triton_stores(scale_dtype: torch.dtype, bits: int) -> bool:
    return scale_dtype in (torch.float32, torch.bfloat16) and bits in (4, 8)


@_kernel(quantize_symmetric, "cpu")
def _(x, codebook, bits, block_size, scale_dtype, impl):
    _check_impl(impl)
    if impl == "triton" and _triton_stores(scale_dtype, bits):
        return _triton_symmetric().quantize_symmetric(x, codebook, bits, block_size, scale_dtype)
    if impl == "native":
        q = cpu.quantize_symmetric(x, codebook, bits, block_size, scale_dtype)
        if q is not None:
            return q.codes, q.absmax, q.diag
    q = blockwise.quantize_symmetric(x, codebook, bits, block_size, scale_dtype=scale_dtype)
    return q.codes, q.absmax, q.diag


@_kernel(quantize_symmetric, "cuda")
def _(x, codebook, bits, block_size, scale_dtype, impl):
    _check_impl(impl)
    if impl != "torch" and _triton_stores(scale_dtype, bits):
        return _triton_symmetric().quantize_symmetric(x, codebook, bits, block_size, scale_dtype)
    q = blockwise.quantize_symmetric(x, codebook, bits, block_size, scale_dtype=scale_dtype)
    return q.codes, q.absmax, q.diag


# ----------------------------------------------------------------------------- symmetric EMA


def _ema_dense(codes, absmax, diag, codebook, o, beta, alpha, n, bits, block_size, rebuild) -> Tensor:
    """``(S * beta) + (o * alpha)`` as a dense fp32 matrix, ``S`` rebuilt by ``rebuild``."""
    return rebuild(codes[None], absmax[None], diag[None], codebook, n, bits, block_size, 0, n)[0] * beta + o * alpha


@torch.library.custom_op(f"{NS}::symmetric_ema", mutates_args=())
def symmetric_ema(codes: Tensor, absmax: Tensor, diag: Tensor, codebook: Tensor, o: Tensor, beta: float,
                  alpha: float, n: int, bits: int, block_size: int, scale_dtype: torch.dtype,
                  impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """One EMA step of a stored symmetric matrix, stored again: ``S_new = (S * beta) + (o * alpha)``
    (each product rounded, then the sum) as (codes, scales, fp32 diagonal)."""
    _check_impl(impl)
    dense = _ema_dense(codes, absmax, diag, codebook, o, beta, alpha, n, bits, block_size, _rebuild_torch)
    q = blockwise.quantize_symmetric(dense, codebook, bits, block_size, scale_dtype=scale_dtype)
    return q.codes, q.absmax, q.diag


@symmetric_ema.register_fake
def _(codes, absmax, diag, codebook, o, beta, alpha, n, bits, block_size, scale_dtype, impl):
    numel, scales = triangle_sizes(n, block_size)
    return (codes.new_empty((numel + 1) // 2 if bits == 4 else numel, dtype=torch.uint8),
            codes.new_empty(scales, dtype=scale_dtype), codes.new_empty(n, dtype=torch.float32))


def _ema_composed(codes, absmax, diag, codebook, o, beta, alpha, n, bits, block_size, scale_dtype, impl):
    """The EMA through the device's rebuild and store ops (Triton on CUDA)."""
    device = codes.device.type
    dense = _ema_dense(codes, absmax, diag, codebook, o, beta, alpha, n, bits, block_size,
                       lambda *a: _KERNELS[(id(rebuild_symmetric), device)](*a, impl))
    return _KERNELS[(id(quantize_symmetric), device)](dense, codebook, bits, block_size, scale_dtype, impl)


@_kernel(symmetric_ema, "cpu")
def _(codes, absmax, diag, codebook, o, beta, alpha, n, bits, block_size, scale_dtype, impl):
    _check_impl(impl)
    if impl == "native":
        root = QuantizedMatrix(codes, absmax, diag, n, codebook, bits, block_size, symmetric=True)
        q = cpu.symmetric_ema(root, o, beta, alpha, scale_dtype)
        if q is not None:
            return q.codes, q.absmax, q.diag
    return _ema_composed(codes, absmax, diag, codebook, o, beta, alpha, n, bits, block_size, scale_dtype, impl)


_kernel(symmetric_ema, "cuda")(_ema_composed)


# ----------------------------------------------------------------------------- row-block layout


def _quantize_torch(x, codebook, bits, block_size, offdiag, transpose, scale_dtype):
    q = blockwise.quantize(x, codebook, bits, block_size, offdiag=offdiag, transpose=transpose,
                           scale_dtype=scale_dtype)
    diag = q.diag if q.diag is not None else x.new_empty(0, dtype=torch.float32)
    return q.codes, q.absmax, diag


@torch.library.custom_op(f"{NS}::quantize", mutates_args=())
def quantize(x: Tensor, codebook: Tensor, bits: int, block_size: int, offdiag: bool, transpose: bool,
             scale_dtype: torch.dtype, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """Block-wise quantize ``x`` (see ``quant.quantize``): (codes, scales, diagonal; empty unless ``offdiag``)."""
    _check_impl(impl)
    return _quantize_torch(x, codebook, bits, block_size, offdiag, transpose, scale_dtype)


@quantize.register_fake
def _(x, codebook, bits, block_size, offdiag, transpose, scale_dtype, impl):
    shape = tuple(x.shape)
    stored = (shape[1], shape[0]) if transpose else shape
    rows, cols = (math.prod(stored[:-1]), stored[-1]) if stored else (1, 1)
    return (x.new_empty(packed_numel(rows * cols, bits), dtype=torch.uint8),
            x.new_empty(rows, -(-cols // block_size), dtype=scale_dtype),
            x.new_empty(shape[0] if offdiag else 0, dtype=torch.float32))


def _quantize_device(x, codebook, bits, block_size, offdiag, transpose, scale_dtype, impl):
    _check_impl(impl)
    triton_here = impl == "triton" or (impl == "native" and x.device.type == "cuda")
    if triton_here and scale_dtype in (torch.float32, torch.bfloat16):
        q = _triton_quant().quantize(x, codebook, bits, block_size, offdiag=offdiag, transpose=transpose,
                                     scale_dtype=scale_dtype)
        diag = q.diag if q.diag is not None else x.new_empty(0, dtype=torch.float32)
        return q.codes, q.absmax, diag
    if impl == "native" and not transpose and not offdiag and x.device.type == "cpu":
        q = cpu.quantize_rows(x, codebook, bits, block_size, scale_dtype)
        if q is not None:
            return q.codes, q.absmax, x.new_empty(0, dtype=torch.float32)
    return _quantize_torch(x, codebook, bits, block_size, offdiag, transpose, scale_dtype)


_kernel(quantize, "cpu")(_quantize_device)
_kernel(quantize, "cuda")(_quantize_device)


@torch.library.custom_op(f"{NS}::dequantize", mutates_args=())
def dequantize(codes: Tensor, absmax: Tensor, diag: Tensor | None, codebook: Tensor, shape: Sequence[int], bits: int,
               block_size: int, transpose: bool, dtype: torch.dtype, impl: str) -> Tensor:
    """The tensor of ``shape`` stored by :func:`quantize` (``shape`` before any transpose)."""
    _check_impl(impl)
    return blockwise.dequantize(Quantized(codes, absmax, diag), codebook, tuple(shape), bits, block_size,
                                transpose=transpose, dtype=dtype)


@dequantize.register_fake
def _(codes, absmax, diag, codebook, shape, bits, block_size, transpose, dtype, impl):
    return codes.new_empty(tuple(shape), dtype=dtype)


def _dequantize_device(codes, absmax, diag, codebook, shape, bits, block_size, transpose, dtype, impl):
    _check_impl(impl)
    if impl == "triton" or (impl == "native" and codes.device.type == "cuda"):
        return _triton_quant().dequantize(Quantized(codes, absmax, diag), codebook, tuple(shape), bits, block_size,
                                          transpose=transpose, dtype=dtype)
    if impl == "native" and not transpose and diag is None and dtype == torch.float32:
        rows = math.prod(shape[:-1]) if len(shape) else 1
        out = cpu.dequantize_rows(codes, absmax, codebook, rows, shape[-1] if len(shape) else 1, bits, block_size)
        if out is not None:
            return out if len(shape) == 2 else out.view(tuple(shape))
    return blockwise.dequantize(Quantized(codes, absmax, diag), codebook, tuple(shape), bits, block_size,
                                transpose=transpose, dtype=dtype)


_kernel(dequantize, "cpu")(_dequantize_device)
_kernel(dequantize, "cuda")(_dequantize_device)


# ----------------------------------------------------------------------------- moments


def _hyper(base: str, hyper: Sequence[float], nesterov: bool) -> dict:
    out = dict(zip(_HYPER[base], (float(h) for h in hyper)))
    if base == "sgd":
        out["nesterov"] = bool(nesterov)
    return out


def hyper_list(base: str, hyper: dict) -> list[float]:
    """The op's ``hyper`` argument from the dict of ``quant.moments``."""
    return [float(hyper[k]) for k in _HYPER[base]]


@torch.library.custom_op(f"{NS}::moment_update", mutates_args=("p", "codes", "absmax"))
def moment_update(base: str, p: Tensor, grad: Tensor, codes: list[Tensor], absmax: list[Tensor],
                  codebooks: list[Tensor], bits: int, block_size: int, hyper: list[float], nesterov: bool,
                  impl: str) -> None:
    """One fused ``"adamw"`` / ``"sgd"`` step with quantized moments, in place on ``p``, ``codes``, ``absmax``."""
    _check_impl(impl)
    _moments.reference_update(base, p, grad, list(zip(codes, absmax, codebooks)), bits=bits, block_size=block_size,
                              hyper=_hyper(base, hyper, nesterov))


@moment_update.register_fake
def _(base, p, grad, codes, absmax, codebooks, bits, block_size, hyper, nesterov, impl):
    return None


def _moment_device(base, p, grad, codes, absmax, codebooks, bits, block_size, hyper, nesterov, impl):
    _check_impl(impl)
    moments = list(zip(codes, absmax, codebooks))
    h = _hyper(base, hyper, nesterov)
    if impl == "triton" or (impl == "native" and p.device.type == "cuda"):
        from . import triton_moments

        return triton_moments.moment_update(base, p, grad, moments, bits=bits, block_size=block_size, hyper=h)
    return _moments.reference_update(base, p, grad, moments, bits=bits, block_size=block_size, hyper=h)


_kernel(moment_update, "cpu")(_moment_device)
_kernel(moment_update, "cuda")(_moment_device)
