"""Matrix routines for the preconditioners of Shampoo4bit and SOAP4bit.

Every routine that can fail reports failure instead of returning garbage: the root helpers
return ``None`` when even a float64 retry yields non-finite values, so the caller can keep the
previous preconditioner and count the event.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "RootResult",
    "bjorck",
    "coupled_newton_inverse_root",
    "eigh_inverse_root",
    "eigen_inverse_root",
    "is_finite",
    "newton_inverse_root_early_stop",
    "orthogonality_error",
    "subspace_iteration",
]


class RootResult(NamedTuple):
    """An inverse root and whether it needed the float64 retry."""

    root: torch.Tensor
    retried: bool


def is_finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def bjorck(v: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` Björck orthonormalization steps: ``V <- 1.5 V - 0.5 V V^T V``.

    Pulls a nearly orthogonal matrix (a dequantized eigenvector matrix) back towards the
    orthogonal group; each step roughly squares the orthogonality error.
    """
    for _ in range(steps):
        v = 1.5 * v - 0.5 * (v @ (v.mT @ v))
    return v


def orthogonality_error(v: torch.Tensor) -> float:
    """``||V^T V - I||_F``."""
    eye = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
    return float(torch.linalg.matrix_norm(v.mT @ v - eye))


def subspace_iteration(a: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One warm-started subspace iteration: ``P = QR(A V)``, ``lambda = diag(P^T A P)``.

    Returns ``(eigenvalues, eigenvectors)`` with eigenvectors as columns of P. With V the
    previous eigenbasis this tracks the slowly changing eigenbasis of the EMA statistic at
    the cost of one matmul and one QR.
    """
    p, _ = torch.linalg.qr(a @ v)
    eigvals = (p * (a @ p)).sum(dim=0)
    return eigvals, p


def eigen_inverse_root(
    eigvals: torch.Tensor, eigvecs: torch.Tensor, p: int = 4, eps: float = 1e-6
) -> torch.Tensor:
    """``V diag((lambda + rho)^(-1/p)) V^T`` with relative damping ``rho = eps * max(lambda)``.

    Negative Rayleigh-quotient estimates are clamped at zero first.
    """
    lam = eigvals.clamp(min=0)
    rho = eps * lam.max().clamp(min=torch.finfo(lam.dtype).tiny)
    scale = (lam + rho).pow(-1.0 / p)
    return (eigvecs * scale) @ eigvecs.mT


def _eigh_root(a: torch.Tensor, p: int, eps: float) -> torch.Tensor | None:
    try:
        eigvals, eigvecs = torch.linalg.eigh(a)
    except torch.linalg.LinAlgError:  # other RuntimeErrors (out of memory) propagate
        return None
    root = eigen_inverse_root(eigvals, eigvecs, p, eps)
    return root if is_finite(root) else None


def eigh_inverse_root(a: torch.Tensor, p: int = 4, eps: float = 1e-6) -> RootResult | None:
    """Exact inverse p-th root of a symmetric PSD matrix via ``eigh``, relative damping.

    Tries the input dtype (fp32) first and float64 on failure; ``None`` if both fail.
    """
    if not is_finite(a):
        return None
    a = (a + a.mT) / 2
    root = _eigh_root(a.float(), p, eps)
    if root is not None:
        return RootResult(root, False)
    root = _eigh_root(a.double(), p, eps)
    return None if root is None else RootResult(root.float(), True)


def _spectral_norm_estimate(a: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Largest eigenvalue of a symmetric PSD matrix by power iteration (deterministic start)."""
    x = torch.ones(a.shape[-1], dtype=a.dtype, device=a.device) / a.shape[-1] ** 0.5
    for _ in range(iters):
        y = a @ x
        x = y / y.norm().clamp(min=torch.finfo(a.dtype).tiny)
    return x @ (a @ x)


def _coupled_newton(a: torch.Tensor, p: int, eps: float, max_iters: int, tol: float) -> torch.Tensor | None:
    n = a.shape[-1]
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    lam_max = _spectral_norm_estimate(a).clamp(min=0)
    a = a + eps * lam_max.clamp(min=torch.finfo(a.dtype).tiny) * eye
    # Scale so every eigenvalue of M0 = z A lies in (0, (p + 1) / 2]; the Frobenius norm
    # bounds the spectral norm from above.
    z = (p + 1) / (2 * torch.linalg.matrix_norm(a).clamp(min=torch.finfo(a.dtype).tiny))
    m = z * a
    x = z.pow(1.0 / p) * eye
    prev = float("inf")
    for _ in range(max_iters):
        t = ((p + 1) * eye - m) / p
        x = x @ t
        m = torch.linalg.matrix_power(t, p) @ m
        err = float((m - eye).abs().max())
        if not math.isfinite(err) or err > 1e3:
            return None  # diverging: A has eigenvalues <= 0 (e.g. an indefinite quantized factor)
        if err < tol or (err < 1e-2 and err >= prev):
            break  # converged, or stalled at round-off
        prev = err
    x = (x + x.mT) / 2
    return x if is_finite(x) else None


def coupled_newton_inverse_root(
    a: torch.Tensor, p: int = 4, eps: float = 1e-6, max_iters: int = 100, tol: float | None = None
) -> RootResult | None:
    """Inverse p-th root by the coupled Schur-Newton iteration (Guo and Higham).

    ``X_{k+1} = X_k T_k``, ``M_{k+1} = T_k^p M_k`` with ``T_k = ((p + 1) I - M_k) / p``;
    ``M -> I`` and ``X -> (A + rho I)^(-1/p)``. Only matmuls, so it runs where ``eigh`` is
    slow, at the price of accuracy on ill-conditioned inputs; it stops once ``max|M - I|``
    reaches ``tol`` (default: 100 ulp of the dtype) or stalls at round-off. It diverges when
    A has eigenvalues at or below zero, which a quantized factor can have; then, as for any
    other failure, the exact ``eigh`` root (negative eigenvalues clamped, float64 retry) is
    returned and marked as retried. ``None`` if that fails too.
    """
    if not is_finite(a):
        return None
    a = (a + a.mT) / 2
    root = _coupled_newton(a.float(), p, eps, max_iters, 100 * torch.finfo(torch.float32).eps if tol is None else tol)
    if root is not None:
        return RootResult(root, False)
    fallback = eigh_inverse_root(a, p, eps)
    return None if fallback is None else RootResult(fallback.root, True)


def newton_inverse_root_early_stop(
    a: torch.Tensor,
    p: int = 4,
    eps: float = 1e-6,
    max_iters: int = 10,
    tol: float = 1e-6,
    growth: float = 1.2,
    power_iters: int = 100,
    stats: dict | None = None,
) -> RootResult | None:
    """The naive 4-bit baseline's inverse p-th root (the paper's baseline, which quantizes the
    preconditioner itself; ``docs/algorithms.md``): coupled
    Newton with the baseline's early stop, kept apart from :func:`coupled_newton_inverse_root`.

    ``rho = eps * lambda_max`` (power iteration), ``z = (p + 1) / (2 ||A + rho I||_F)``,
    ``X0 = z^(1/p) I``, ``M0 = z (A + rho I)``; then ``T = ((p + 1) I - M) / p``,
    ``X <- X T``, ``M <- T^p M``, at most ``max_iters`` times; it stops once
    ``max|M - I| < tol``, and keeps the previous X as soon as that error grows more than
    ``growth`` times. No eigh fallback, no clamping: on an indefinite (quantized) factor it
    stops early and returns the X it has, which is part of what the baseline measures. Runs in
    ``a``'s dtype; ``None`` only for non-finite input or X. ``stats``, if given, receives
    ``iterations``, ``error`` and ``stop`` ("converged", "error_grew" or "max_iters").
    """
    if not is_finite(a):
        return None
    n = a.shape[-1]
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    # lambda_max floored at 1e-16 so that an all-zero factor still gives a finite z
    lam_max = _spectral_norm_estimate(a, power_iters).clamp(min=1e-16)
    damped = a + eps * lam_max * eye
    z = (p + 1) / (2 * torch.linalg.matrix_norm(damped))
    m = z * damped
    x = z.pow(1.0 / p) * eye
    err = float((m - eye).abs().max())
    done, stop = 0, "max_iters"
    while True:
        if err < tol:
            stop = "converged"
            break
        if done == max_iters:
            break
        t = ((p + 1) * eye - m) / p
        m_next = torch.linalg.matrix_power(t, p) @ m
        err_next = float((m_next - eye).abs().max())
        if not math.isfinite(err_next) or err_next > growth * err:
            stop = "error_grew"  # keep the previous X
            break
        x, m, err = x @ t, m_next, err_next
        done += 1
    if stats is not None:
        stats.update(iterations=done, error=err, stop=stop)
    return RootResult(x, False) if is_finite(x) else None
