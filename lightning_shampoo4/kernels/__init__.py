"""Kernel dispatch: which implementation runs each quantized-matrix operation.

Every quantize / dequantize / rebuild / precondition / moment call of the optimizer goes through
here, and from here through the custom ops of :mod:`.ops` (``torch.ops.lightning_shampoo4.*``),
so ``torch.compile`` sees one opaque call per operation. ``backend="auto"`` picks per call;
``"torch"`` or ``"triton"`` force one. The environment variable ``LIGHTNING_SHAMPOO4_KERNELS``
(``auto`` / ``torch`` / ``triton``) overrides ``"auto"`` for a whole process.

``"auto"`` uses Triton for CUDA tensors (when Triton imports: it is an optional extra, and CUDA
builds of torch bring it). On the CPU, ``"auto"`` stores and rebuilds symmetric matrices with the
C kernel of :mod:`.cpu` when it could be built (bit-identical to the torch ops, about 3x faster);
``"torch"`` keeps every call in torch ops. Forcing ``"triton"`` on CPU tensors works in Triton's
interpreter (``TRITON_INTERPRET=1`` set before the kernels are first imported; this is how the
test-suite checks the kernels on machines without a GPU) and raises a clear error otherwise.

Preconditioning on the Triton backend has two paths (``PRECONDITION_PATHS``): ``"workspace"``
rebuilds the stored roots into dense fp32 matrices with one Triton launch per batch of same-shape
roots and multiplies with cuBLAS (``torch.bmm`` / ``torch.mm``); ``"fused"`` decodes root tiles
inside a Triton matmul (no dense root in memory). ``"workspace"`` is the default until
``benchmarks/gpu_check.py`` has timed both on a GPU; ``LIGHTNING_SHAMPOO4_PRECONDITION`` picks one.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from ..quant import Quantized
from ..quant import moments as _moments
from . import ops, reference
from .types import QuantizedMatrix

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "LIGHTNING_SHAMPOO4_KERNELS"
INTERPRET_ENV_VAR = "TRITON_INTERPRET"
PRECONDITION_PATHS = ("workspace", "fused")
PATH_ENV_VAR = "LIGHTNING_SHAMPOO4_PRECONDITION"

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "PRECONDITION_PATHS",
    "QuantizedMatrix",
    "dequantize",
    "materialize",
    "moment_update",
    "precondition",
    "precondition_batch",
    "precondition_path",
    "quantize",
    "quantize_symmetric",
    "resolve_backend",
    "symmetric_ema",
    "triton_available",
    "triton_interpreted",
]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether ``triton`` imports (an optional extra); tried once per process."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install raises more than ImportError
        return False
    return True


_BROKEN: set[str] = set()  # kernels that failed to compile or launch in this process


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower() or default


def _run(name: str, backend: str, device: torch.device, call):
    """``call(impl)`` with the implementation ``backend`` resolves to for ``device``.

    Under ``"auto"`` a Triton failure (compilation, launch, a missing driver) is reported once
    with a warning and that kernel falls back to the reference for the rest of the process; a
    backend forced to ``"triton"`` raises instead.
    """
    impl = _impl(backend, device)
    if impl != "triton":
        return call(impl)
    if name in _BROKEN and backend == "auto":
        return call("torch")
    forced = backend == "triton" or _env(ENV_VAR, "auto") == "triton"
    if forced:
        return call("triton")
    try:
        return call("triton")
    except Exception as err:  # noqa: BLE001
        _BROKEN.add(name)
        warnings.warn(
            f"lightning_shampoo4: the Triton kernel '{name}' failed ({type(err).__name__}: {err}); using the "
            f"torch reference for it from now on. Set {ENV_VAR}=torch to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return call("torch")


def triton_interpreted() -> bool:
    """Whether the Triton kernels run in Triton's CPU interpreter (so they accept CPU tensors).

    Triton decides this when a kernel is defined, i.e. when ``triton_quant`` / ``triton_symmetric``
    are first imported: ``TRITON_INTERPRET=1`` must be set before that.
    """
    if not triton_available():
        return False
    from . import triton_quant, triton_symmetric

    return triton_quant.INTERPRETED and triton_symmetric.INTERPRETED


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"kernel_backend={backend!r} is not supported; choose one of {BACKENDS}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``"torch"`` or ``"triton"``) for a tensor on ``device``."""
    check_backend(backend)
    device = torch.device(device)
    if backend == "auto":
        backend = check_backend(_env(ENV_VAR, "auto"))
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("kernel_backend='triton' was asked for but triton is not importable; "
                               "pip install 'lightning-shampoo4[triton]'")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"kernel_backend='triton' needs CUDA tensors, got a tensor on {device}. To run the Triton kernels "
                f"on the CPU use Triton's interpreter: set the environment variable {INTERPRET_ENV_VAR}=1 before "
                "lightning_shampoo4's Triton kernels are first imported, or use kernel_backend='auto' / 'torch'"
            )
    return backend


def _impl(backend: str, device: torch.device) -> str:
    """The ``impl`` argument of the ops (:mod:`.ops`) for ``backend`` on ``device``."""
    device = torch.device(device)
    if device.type == "cpu" and backend in ("auto", "torch"):  # no Triton asked for: one environment read
        env = _env(ENV_VAR, "auto")
        if env in ("auto", "torch"):
            return "torch" if "torch" in (backend, env) else "native"  # native: the C kernel where it applies
    return "triton" if resolve_backend(backend, device) == "triton" else "torch"


def precondition_path() -> str:
    """``"workspace"`` or ``"fused"``: how the Triton backend preconditions (``PATH_ENV_VAR``)."""
    path = _env(PATH_ENV_VAR, "workspace")
    if path not in PRECONDITION_PATHS:
        raise ValueError(f"{PATH_ENV_VAR}={path!r} is not supported; choose one of {PRECONDITION_PATHS}")
    return path


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
    """Block-wise quantize ``x``; see :func:`lightning_shampoo4.quant.quantize` (Triton for fp32 and
    bf16 scales, bit for bit; fp16 scales always take the reference, which checks their range)."""
    def call(impl):
        return ops.call(ops.quantize, x.detach(), codebook, bits, block_size, offdiag, transpose, scale_dtype, impl)

    codes, absmax, diag = _run("quantize", backend, x.device, call)
    return Quantized(codes, absmax, diag if offdiag else None)


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
    codes, absmax, diag = Quantized(*q)
    shape = [int(s) for s in shape]

    def call(impl):
        return ops.call(ops.dequantize, codes, absmax, diag, codebook, shape, bits, block_size, transpose, dtype, impl)

    return _run("dequantize", backend, codes.device, call)


def _parts(roots: list[QuantizedMatrix]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and diagonals of same-format symmetric roots stacked ``(k, ...)`` (views for one)."""
    if len(roots) == 1:
        r = roots[0]
        return r.codes.reshape(1, -1), r.absmax.reshape(1, -1), r.diag.reshape(1, -1)
    return (torch.stack([r.codes.reshape(-1) for r in roots]), torch.stack([r.absmax.reshape(-1) for r in roots]),
            torch.stack([r.diag.reshape(-1) for r in roots]))


def _rebuild_rows(roots: list[QuantizedMatrix], r0: int, r1: int, impl: str) -> torch.Tensor:
    """fp32 rows ``r0 .. r1-1`` of same-format stored symmetric roots, ``(k, r1 - r0, n)``: one op call."""
    first = roots[0]
    codes, absmax, diag = _parts(roots)
    return ops.call(ops.rebuild_symmetric, codes, absmax, diag, first.codebook, first.order, first.bits,
                    first.block_size, r0, r1, impl)


def _rebuilder(impl: str) -> reference.RebuildFn:
    return lambda root, r0, r1: _rebuild_rows([root], r0, r1, impl)[0]


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
    through the C kernel, on CUDA through Triton where ``backend`` allows it, bit for bit)."""
    if x.dim() != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"quantize_symmetric needs a square matrix, got shape {tuple(x.shape)}")

    def call(impl):
        return ops.call(ops.quantize_symmetric, x.detach(), codebook, bits, block_size, scale_dtype, impl)

    return Quantized(*_run("quantize_symmetric", backend, x.device, call))


def symmetric_ema(
    root: QuantizedMatrix,
    o: torch.Tensor,
    beta: float,
    alpha: float,
    *,
    scale_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> Quantized:
    """``S * beta + o * alpha`` of the stored symmetric ``root`` (each product rounded, then the
    sum), stored again in ``root``'s format: an exponential moving average of a quantized
    statistic without its dense matrix (on the CPU one pass of the C kernel; elsewhere the
    device's rebuild and store)."""
    if not (isinstance(root, QuantizedMatrix) and root.symmetric and root.diag is not None):
        raise ValueError("symmetric_ema needs a stored symmetric matrix (QuantizedMatrix with symmetric=True)")
    n = root.order
    if tuple(o.shape) != (n, n):
        raise ValueError(f"symmetric_ema needs an ({n}, {n}) update, got shape {tuple(o.shape)}")

    def call(impl):
        return ops.call(ops.symmetric_ema, root.codes, root.absmax, root.diag, root.codebook, o.detach().float(),
                        float(beta), float(alpha), n, root.bits, root.block_size, scale_dtype, impl)

    return Quantized(*_run("symmetric_ema", backend, root.codes.device, call))


def _device(root: torch.Tensor | QuantizedMatrix) -> torch.device:
    return root.device if isinstance(root, torch.Tensor) else root.codes.device


def materialize(
    root: torch.Tensor | QuantizedMatrix,
    dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """A dense ``dtype`` matrix from a dense or quantized root; see :func:`.reference.materialize`."""
    if isinstance(root, torch.Tensor):
        return root.to(dtype)
    if root.symmetric:
        dense = _run("rebuild_symmetric", backend, _device(root), lambda impl: _rebuild_rows([root], 0, root.order, impl))[0]
        return dense.to(dtype) if out is None else out.copy_(dense)
    q = Quantized(root.codes, root.absmax, root.diag)
    dense = dequantize(q, root.codebook, (root.order, root.order), root.bits, root.block_size, dtype=dtype,
                       backend=backend)
    return dense if out is None else out.copy_(dense)


def _symmetric(root) -> bool:
    return isinstance(root, QuantizedMatrix) and root.symmetric and root.diag is not None


def _fused(grads: torch.Tensor, lefts: list, rights: list, dtype: torch.dtype, impl: str) -> torch.Tensor:
    """``L_b @ G_b @ R_b`` (fp32) with stored symmetric roots decoded inside Triton matmuls."""
    if _symmetric(lefts[0]):
        first = lefts[0]
        codes, absmax, diag = _parts(lefts)
        x = ops.call(ops.matmul_symmetric, codes, absmax, diag, first.codebook, grads, first.order, first.bits,
                     first.block_size, True, dtype, dtype, impl)
    else:
        x = torch.bmm(_stack(lefts, dtype, impl), grads.to(dtype))
    if _symmetric(rights[0]):
        first = rights[0]
        codes, absmax, diag = _parts(rights)
        return ops.call(ops.matmul_symmetric, codes, absmax, diag, first.codebook, x, first.order, first.bits,
                        first.block_size, False, dtype, torch.float32, impl)
    # a dense right root: ``dtype`` operands, fp32 sums and result, like the fused kernel's
    return torch.bmm(x.float(), _stack(rights, dtype, impl).float())


def _stack(roots: list, dtype: torch.dtype, impl: str) -> torch.Tensor:
    """``k x n x n`` dense roots in ``dtype``, quantized ones rebuilt in one op call."""
    first = roots[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(roots).to(dtype)
    n = first.order
    if _symmetric(first):
        return _rebuild_rows(roots, 0, n, impl).to(dtype)
    if first.bits == 4 and (n * n) % 2:  # packed codes that do not concatenate
        return torch.stack([ops.call(ops.dequantize, r.codes, r.absmax, r.diag, r.codebook, [n, n], r.bits,
                                     r.block_size, False, torch.float32, impl) for r in roots]).to(dtype)
    codes = torch.cat([r.codes.reshape(-1) for r in roots])
    absmax = torch.cat([r.absmax.reshape(n, -1) for r in roots])
    dense = ops.call(ops.dequantize, codes, absmax, None, first.codebook, [len(roots) * n, n], first.bits,
                     first.block_size, False, torch.float32, impl).view(len(roots), n, n)
    if first.diag is not None:
        dense.diagonal(dim1=1, dim2=2).copy_(torch.stack([r.diag for r in roots]))
    return dense.to(dtype)


def precondition(
    grad: torch.Tensor,
    left: torch.Tensor | QuantizedMatrix,
    right: torch.Tensor | QuantizedMatrix,
    *,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """``left @ grad @ right`` (fp32 result) where each root is dense or quantized.

    The workspace path (and every backend but Triton's fused path) is :func:`.reference.precondition`
    with the roots rebuilt by the ``rebuild_symmetric`` op: lone ``mm`` in ``dtype``, a larger stored
    right root first, very large stored roots in panels of rows."""
    if grad.dim() != 2:
        raise ValueError(f"grad must be a matrix block, got shape {tuple(grad.shape)}")
    m, n = grad.shape
    for side, root, order in (("left", left, m), ("right", right, n)):
        if not isinstance(root, (torch.Tensor, QuantizedMatrix)):
            raise TypeError(f"{side} root must be a torch.Tensor or a QuantizedMatrix, got {type(root).__name__}")
        shape = tuple(root.shape) if isinstance(root, torch.Tensor) else (root.order, root.order)
        if shape != (order, order):
            raise ValueError(f"{side} root must be {order} x {order} for a {m} x {n} gradient, got {shape}")
    grad = grad.detach()

    def call(impl):
        if impl == "triton" and precondition_path() == "fused" and (_symmetric(left) or _symmetric(right)):
            return _fused(grad[None], [left], [right], dtype, impl)[0]
        if impl == "torch" and not (_symmetric(left) or _symmetric(right)):
            return reference.precondition(grad, left, right, dtype)
        return reference.precondition(grad, left, right, dtype, rebuild=_rebuilder(impl))

    return _run("precondition", backend, grad.device, call)


def precondition_batch(
    grads: list[torch.Tensor],
    lefts: list[torch.Tensor | QuantizedMatrix],
    rights: list[torch.Tensor | QuantizedMatrix],
    *,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """``L_b @ G_b @ R_b`` for same-shape blocks whose roots share one format, as fp32 ``(k, m, n)``:
    the roots of each side rebuilt in one op call and two ``bmm`` (workspace), or two fused Triton
    launches (``"fused"``)."""
    stacked = torch.stack([g.detach() for g in grads])

    def call(impl):
        if impl == "triton" and precondition_path() == "fused" and (_symmetric(lefts[0]) or _symmetric(rights[0])):
            return _fused(stacked, lefts, rights, dtype, impl)
        # three (k, m, n)-sized temporaries at a time instead of five: the left roots are freed
        # before the right ones are rebuilt, and the product lands in the stacked gradients
        x = torch.bmm(_stack(lefts, dtype, impl), stacked.to(dtype))
        right = _stack(rights, dtype, impl)
        if dtype == torch.float32:
            return torch.bmm(x, right, out=stacked)
        return torch.bmm(x, right).float()

    return _run("precondition", backend, stacked.device, call)


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
    codes = [m[0] for m in moments]
    absmax = [m[1] for m in moments]
    codebooks = [m[2] for m in moments]
    values = ops.hyper_list(base, hyper) if base in ops._HYPER else []

    def call(impl):
        ops.call(ops.moment_update, base, p, grad, codes, absmax, codebooks, bits, block_size, values,
                 bool(hyper.get("nesterov", False)), impl)

    if base not in ops._HYPER:
        raise ValueError(f"base={base!r} is not supported; choose one of {tuple(ops._HYPER)}")
    return _run("moment_update", backend, p.device, call)


_moments.set_fused_update(moment_update)  # quant.moments never imports the kernels: they register here
