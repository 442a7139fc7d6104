"""``storage="cholesky"``: Shampoo through the quantized Cholesky factor of the statistic.

With ``statistic_bits=8`` and no error feedback (the optimizer's default) the factor is kept
with 8-bit codes and no error state (at ``bits=4``: one 8-bit triangle instead of two 4-bit
ones), the root at ``bits``. With ``statistic_bits=4`` and ``error_feedback=True`` it is Li,
Ding, Toh and Zhou, "Memory-Efficient 4-bit Preconditioned Stochastic Optimization" (ICCV 2025,
arXiv:2412.10663): the factor at 4 bits with error feedback, about the same bytes. An 8-bit
rounding error is 16x smaller than the 4-bit one that error feedback can only spread over the
following updates, so ``benchmarks/drift.py`` measures the default 4-7x closer to a float64
Shampoo. Its storage settings (``settings.STORAGE_TUNED``) were chosen on that benchmark: one
scale per factor column (8 bits leave room for a column's range) pays for root blocks of 40,
and the Linear-1.5 map suits a root's entries, which are spread more evenly than an
eigenvector's; the preconditioned direction then keeps a cosine of 0.97 to the exact one, at
fewer bytes than the eigenvector storage. ``docs/algorithms.md`` has the measurements.

Stored: the lower Cholesky factor C of the statistic A = C C^T as ``chol_diag`` (fp32
diagonal) plus its quantized strict lower triangle (``chol_codes``, ``chol_absmax``: the
symmetric codec applied to C^T, one block run per column of C, blocks of ``block_size``), the
error-feedback state E in the same layout without a diagonal (``ef_codes``, ``ef_absmax``: the
diagonal is kept exactly, so E's is zero), and the inverse root diag-real quantized (``root_*``)
as in the other storages. C and E together take the codes of one n x n matrix: about the bytes
of the eigenvector storage's eigenvectors and eigenvalues. Factors below ``min_quant_numel`` keep fp32 ``chol`` (C itself) and
``root`` and no error state.

PU: A = beta C C^T + (1 - beta) M from the dequantized C, C' = cholesky(A) (fp32, then float64,
then float64 with a diagonal jitter of ``eps * max_i A_ii``, each fallback a retried update; if
all fail, or A is not finite, a failed one that keeps the previous state); C' + E is quantized,
and what that quantization lost becomes the new E. PIRU: A^-1/4 of A = C C^T by ``eigh`` (or the coupled
Newton iteration, ``root_method="schur_newton"``), from the PU's fp32 C' on a step whose PU just
ran, from the dequantized C otherwise.

Why: any C with a positive diagonal gives a positive definite C C^T, so quantizing C never
yields the indefinite statistic that quantizing A itself does; and with error feedback the
rounding error of each re-quantization is carried into the next one instead of piling up over
the statistics updates, so the stored C tracks the exact factor on average.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import FAILED, OK, RETRIED, Entries, FactorConfig, Storage, Update, all_finite


class CholeskyStorage(Storage):
    """The Cholesky factor at ``statistic_bits``, with an error-feedback state if ``error_feedback``."""

    # Scale of the carried error: 1 is plain error feedback, 0 switches it off (the state keeps
    # its format). Not an optimizer setting: benchmarks compare the two.
    _feedback: float = 1.0

    def __init__(self, cfg: FactorConfig):
        super().__init__(cfg)
        # the triangles of C and E use the eigenvectors' block size; the root keeps its own
        self._codec = self.statistic_codec(root_block_size=cfg.block_size)
        self.error_feedback = cfg.error_feedback

    # -- the stored triangles ------------------------------------------------------------
    def _put(self, name: str, lower: torch.Tensor) -> Entries:
        """Entries holding lower-triangular ``lower`` (quantized: as the upper triangle of its
        transpose, which is all the symmetric codec reads)."""
        if not self.cfg.quantized:
            return {name: lower.float().contiguous()}
        return self._codec.store(name, lower.mT, symmetric=True)

    def _put_error(self, lower: torch.Tensor) -> Entries:
        entries = self._codec.store("ef", lower.mT, symmetric=True)
        del entries["ef_diag"]  # always zero: the diagonal of C is stored exactly
        return entries

    def chol(self, st: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The stored Cholesky factor C (lower triangular) as dense fp32."""
        if not self.cfg.quantized:
            return st["chol"]
        return self._codec.load(st, "chol", symmetric=True).tril_()

    def error(self, st: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The error-feedback state E (strictly lower triangular) as dense fp32."""
        codes = st["ef_codes"]
        zero = torch.zeros(self.cfg.order, dtype=torch.float32, device=codes.device)
        parts = {"ef_codes": codes, "ef_absmax": st["ef_absmax"], "ef_diag": zero}
        return self._codec.load(parts, "ef", symmetric=True).tril_()

    # -- the interface -------------------------------------------------------------------
    def init(self, device: torch.device) -> Entries:
        eye = self.eye(device)
        entries = self._put("chol", self.cfg.eps**0.5 * eye)
        if self.cfg.quantized and self.error_feedback:
            entries.update(self._put_error(torch.zeros_like(eye)))
        return {**entries, **self.store("root", eye, symmetric=True)}

    def statistic(self, st: Mapping[str, torch.Tensor]) -> torch.Tensor:
        c = self.chol(st)
        return c @ c.mT

    def update_stats(self, st: Mapping[str, torch.Tensor], m: torch.Tensor) -> Update:
        cfg = self.cfg
        c, status = self._cholesky(self.chol(st), m)
        if c is None:
            return Update({}, FAILED)
        if not cfg.quantized:
            return Update({"chol": c}, status, {"chol": c})
        if not self.error_feedback:
            return Update(self._put("chol", c), status, {"chol": c})
        target = c + self.error(st)  # strictly lower E: the diagonal stays C's
        entries = self._put("chol", target)
        err = target - self._codec.load(entries, "chol", symmetric=True).tril_()
        if self._feedback != 1.0:
            err = err * self._feedback
        entries.update(self._put_error(err))
        return Update(entries, status, {"chol": c})

    def update_root(self, st: Mapping[str, torch.Tensor], fresh: Entries | None = None) -> Update:
        c = fresh["chol"] if fresh is not None else self.chol(st)
        return self.root_update(c @ c.mT)

    # -- the factorization ---------------------------------------------------------------
    def _cholesky(self, c: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor | None, str]:
        """The Cholesky factor of ``beta C C^T + (1 - beta) M`` and its status; None on failure.

        fp32 first; float64 when that is not positive definite in fp32; then float64 with
        ``eps * max_i A_ii`` added to the diagonal. A non-finite statistic fails at once."""
        beta = self.cfg.beta
        a = torch.addmm(m, c, c.mT, beta=1 - beta, alpha=beta)
        factor = _factorize(a)
        if factor is not None:
            return factor, OK
        if not all_finite(a):  # checked only now: a non-finite A never factorizes
            return None, FAILED  # an overflowing statistic never enters the state
        c64 = c.double()
        a = torch.addmm(m.double(), c64, c64.mT, beta=1 - beta, alpha=beta)
        factor = _factorize(a)
        if factor is None:
            # at most the damping the root adds anyway (eps * lambda_max >= eps * max_i A_ii)
            jitter = self.cfg.eps * a.diagonal().amax().clamp(min=torch.finfo(torch.float32).tiny)
            factor = _factorize(a + jitter * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device))
        return (None, FAILED) if factor is None else (factor, RETRIED)


def _factorize(a: torch.Tensor) -> torch.Tensor | None:
    """The lower Cholesky factor of ``a`` in fp32 with a positive diagonal, or None; None too
    when ``a`` is not finite (the factorization reads only its lower triangle).

    Finiteness is read from sums, one pass each without a boolean copy and one host sync in all:
    a NaN or inf makes the sum non-finite. A finite ``a`` whose sum overflows fp32 (entries near
    1e38 / n^2) counts as non-finite, as its products would overflow too."""
    factor, info = torch.linalg.cholesky_ex(a)
    factor = factor.float()
    ok = (info == 0) & torch.isfinite(a.sum()) & torch.isfinite(factor.sum()) & (factor.diagonal() > 0).all()
    return factor if bool(ok) else None
