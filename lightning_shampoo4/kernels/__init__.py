"""Kernel dispatch: Triton for CUDA tensors when Triton is importable, torch elsewhere.

Every quantize / dequantize / precondition call of the optimizer goes through here.
``backend="auto"`` picks per call; ``"torch"`` or ``"triton"`` force one. The environment
variable ``LIGHTNING_SHAMPOO4_KERNELS`` (``auto`` / ``torch`` / ``triton``) overrides
``"auto"`` for a whole process.

``"auto"`` uses Triton for CUDA tensors only. On the CPU, ``"auto"`` rebuilds stored symmetric
roots with the C kernel of :mod:`.cpu` when it could be built (bit-identical to the torch
rebuild, about 3x faster); ``"torch"`` keeps every call in torch ops. Forcing ``"triton"`` on CPU tensors works in
Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernels are first imported; this
is how the test-suite checks the kernels on machines without a GPU) and raises a clear error
otherwise.
"""

from __future__ import annotations

import functools
import os
import warnings

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
    "materialize",
    "precondition",
    "quantize",
    "quantize_symmetric",
    "resolve_backend",
    "triton_available",
    "triton_interpreted",
]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether ``triton`` imports (it is optional off Linux); tried once per process."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install raises more than ImportError
        return False
    return True


_BROKEN: set[str] = set()  # kernels that failed to compile or launch in this process


def _run(name: str, backend: str, device: torch.device, triton_call, torch_call):
    """Run ``name`` on Triton when ``backend`` resolves to it, else the torch reference.

    Under ``"auto"`` a Triton failure (compilation, launch, a missing driver) is reported
    once with a warning and that kernel falls back to the reference for the rest of the
    process; a backend forced to ``"triton"`` raises instead.
    """
    if name in _BROKEN and backend == "auto":
        return torch_call()
    if resolve_backend(backend, device) != "triton":
        return torch_call()
    forced = backend == "triton" or os.environ.get(ENV_VAR, "").strip().lower() == "triton"
    try:
        return triton_call()
    except Exception as err:  # noqa: BLE001
        if forced:
            raise
        _BROKEN.add(name)
        warnings.warn(
            f"lightning_shampoo4: the Triton kernel '{name}' failed ({type(err).__name__}: {err}); using the "
            f"torch reference for it from now on. Set {ENV_VAR}=torch to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return torch_call()


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
    scale_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> Quantized:
    """Block-wise quantize ``x``; see :func:`lightning_shampoo4.quant.quantize`.

    The Triton kernel stores fp32 scales; other ``scale_dtype`` run the reference."""
    def on_triton():
        from . import triton_quant

        return triton_quant.quantize(x, codebook, bits, block_size, offdiag=offdiag, transpose=transpose)

    def on_torch():
        return reference.quantize(x, codebook, bits, block_size, offdiag=offdiag, transpose=transpose,
                                  scale_dtype=scale_dtype)

    if scale_dtype != torch.float32:
        return on_torch()
    return _run("quantize", backend, x.device, on_triton, on_torch)


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
    def on_triton():
        from . import triton_quant

        return triton_quant.dequantize(q, codebook, shape, bits, block_size, transpose=transpose, dtype=dtype)

    if q[1].dtype != torch.float32:  # 16-bit scales: reference only
        return reference.dequantize(q, codebook, shape, bits, block_size, transpose=transpose, dtype=dtype)

    return _run("dequantize", backend, q[0].device, on_triton,
                lambda: reference.dequantize(q, codebook, shape, bits, block_size, transpose=transpose, dtype=dtype))


def _cpu_kernels(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` lets the C kernels of :mod:`.cpu` run for tensors on ``device``."""
    if torch.device(device).type != "cpu" or resolve_backend(backend, device) != "torch":
        return False
    return backend != "torch" and os.environ.get(ENV_VAR, "").strip().lower() != "torch"


def _rows(backend: str, device: torch.device) -> reference.RowsFn | None:
    """The CPU kernel's row writer where the C kernels may run, else None (the torch rebuild)."""
    if not _cpu_kernels(backend, device):
        return None
    from . import cpu

    return cpu.symmetric_rows


def quantize_symmetric(
    x: torch.Tensor,
    codebook: torch.Tensor,
    bits: int = 4,
    block_size: int = 64,
    *,
    scale_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> Quantized:
    """Store symmetric ``x``; see :func:`lightning_shampoo4.quant.quantize_symmetric` (on the CPU
    through the C kernel where ``backend`` allows it, bit for bit)."""
    if _cpu_kernels(backend, x.device):
        from . import cpu

        q = cpu.quantize_symmetric(x, codebook, bits, block_size, scale_dtype)
        if q is not None:
            return q
    return reference.quantize_symmetric(x, codebook, bits, block_size, scale_dtype=scale_dtype)


def materialize(
    root: torch.Tensor | QuantizedMatrix,
    dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """A dense ``dtype`` matrix from a dense or quantized root; see :func:`.reference.materialize`."""
    device = root.device if isinstance(root, torch.Tensor) else root.codes.device
    return reference.materialize(root, dtype, out=out, rows=_rows(backend, device))


def _triton_layout(root: torch.Tensor | QuantizedMatrix) -> bool:
    """Whether the fused kernel reads this root: dense, or full diag-real with fp32 scales."""
    return isinstance(root, torch.Tensor) or (not root.symmetric and root.absmax.dtype == torch.float32)


def precondition(
    grad: torch.Tensor,
    left: torch.Tensor | QuantizedMatrix,
    right: torch.Tensor | QuantizedMatrix,
    *,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """``left @ grad @ right`` (fp32 result) where each root is dense or quantized."""
    def on_triton():
        from . import triton_precond

        return triton_precond.precondition(grad, left, right, dtype=dtype)

    def on_torch():
        return reference.precondition(grad, left, right, dtype=dtype, rows=_rows(backend, grad.device))

    if not (_triton_layout(left) and _triton_layout(right)):
        return on_torch()
    return _run("precondition", backend, grad.device, on_triton, on_torch)


def moment_update(
    base: str,
    p: torch.Tensor,
    grad: torch.Tensor,
    moments: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    bits: int,
    block_size: int,
    hyper: dict,
    backend: str = "auto",
) -> None:
    """One fused ``"adamw"`` / ``"sgd"`` step with quantized moments, in place on ``p`` and the
    ``(codes, absmax, codebook)`` of each moment; see :mod:`lightning_shampoo4.quant.moments`."""
    def on_triton():
        from . import triton_moments

        return triton_moments.moment_update(base, p, grad, moments, bits=bits, block_size=block_size, hyper=hyper)

    def on_torch():
        from ..quant import moments as _moments

        return _moments.reference_update(base, p, grad, moments, bits=bits, block_size=block_size, hyper=hyper)

    return _run("moment_update", backend, p.device, on_triton, on_torch)
