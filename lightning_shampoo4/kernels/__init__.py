"""Kernel dispatch: Triton for CUDA tensors when Triton is importable, torch elsewhere.

Every quantize / dequantize / precondition call of the optimizer goes through here.
``backend="auto"`` picks per call; ``"torch"`` or ``"triton"`` force one. The environment
variable ``LIGHTNING_SHAMPOO4_KERNELS`` (``auto`` / ``torch`` / ``triton``) overrides
``"auto"`` for a whole process.

``"auto"`` uses Triton for CUDA tensors only. Forcing ``"triton"`` on CPU tensors works in
Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernels are first imported; this
is how the test-suite checks the kernels on machines without a GPU) and raises a clear error
otherwise.
"""

from __future__ import annotations

import os

import torch

from ..quant import Quantized
from . import reference
from .types import QuantizedMatrix

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "LIGHTNING_SHAMPOO4_KERNELS"
INTERPRET_ENV_VAR = "TRITON_INTERPRET"

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "QuantizedMatrix",
    "dequantize",
    "precondition",
    "quantize",
    "resolve_backend",
    "triton_available",
    "triton_interpreted",
]


def triton_available() -> bool:
    """Whether ``triton`` imports (it is optional off Linux)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    """Whether the Triton kernels run in Triton's CPU interpreter (so they accept CPU tensors).

    Triton decides this when a kernel is defined, i.e. when ``triton_quant`` / ``triton_precond``
    are first imported: ``TRITON_INTERPRET=1`` must be set before that.
    """
    if not triton_available():
        return False
    from . import triton_precond, triton_quant

    return triton_quant.INTERPRETED and triton_precond.INTERPRETED


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"kernel_backend={backend!r} is not supported; choose one of {BACKENDS}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``"torch"`` or ``"triton"``) for a tensor on ``device``."""
    check_backend(backend)
    device = torch.device(device)
    if backend == "auto":
        backend = check_backend(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("kernel_backend='triton' was asked for but triton is not importable; pip install triton")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"kernel_backend='triton' needs CUDA tensors, got a tensor on {device}. To run the Triton kernels "
                f"on the CPU use Triton's interpreter: set the environment variable {INTERPRET_ENV_VAR}=1 before "
                "lightning_shampoo4's Triton kernels are first imported, or use kernel_backend='auto' / 'torch'"
            )
    return backend


def quantize(
    x: torch.Tensor,
    codebook: torch.Tensor,
    bits: int = 4,
    block_size: int = 64,
    *,
    offdiag: bool = False,
    transpose: bool = False,
    backend: str = "auto",
) -> Quantized:
    """Block-wise quantize ``x``; see :func:`lightning_shampoo4.quant.quantize`."""
    if resolve_backend(backend, x.device) == "triton":
        from . import triton_quant

        return triton_quant.quantize(x, codebook, bits, block_size, offdiag=offdiag, transpose=transpose)
    return reference.quantize(x, codebook, bits, block_size, offdiag=offdiag, transpose=transpose)


def dequantize(
    q: Quantized,
    codebook: torch.Tensor,
    shape: tuple[int, ...],
    bits: int = 4,
    block_size: int = 64,
    *,
    transpose: bool = False,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """Rebuild a tensor from its quantized parts; see :func:`lightning_shampoo4.quant.dequantize`."""
    if resolve_backend(backend, q[0].device) == "triton":
        from . import triton_quant

        return triton_quant.dequantize(q, codebook, shape, bits, block_size, transpose=transpose, dtype=dtype)
    return reference.dequantize(q, codebook, shape, bits, block_size, transpose=transpose, dtype=dtype)


def precondition(
    grad: torch.Tensor,
    left: torch.Tensor | QuantizedMatrix,
    right: torch.Tensor | QuantizedMatrix,
    *,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """``left @ grad @ right`` (fp32 result) where each root is dense or quantized."""
    if resolve_backend(backend, grad.device) == "triton":
        from . import triton_precond

        return triton_precond.precondition(grad, left, right, dtype=dtype)
    return reference.precondition(grad, left, right, dtype=dtype)
