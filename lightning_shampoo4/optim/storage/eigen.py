"""``storage="eigenvectors"``: 4-bit Shampoo as in the paper (Wang et al., NeurIPS 2024; the
algorithm is described in ``docs/algorithms.md``).

Stored: eigenvalues ``eigvals`` (fp32), eigenvectors as quantized U^T at ``statistic_bits``
(``eigvecs_codes``, ``eigvecs_absmax``: every block inside one eigenvector) and the inverse root diag-real
quantized (``root_diag``, ``root_codes``, ``root_absmax``). Factors below
``min_quant_numel`` keep fp32 ``eigvecs`` / ``root`` instead.

PU: Björck-rectify the dequantized U, EMA ``beta U diag(lambda) U^T + (1 - beta) M``, one
warm-started subspace iteration (matmul + QR). PIRU: ``U diag((lambda + rho)^-1/4) U^T``
from the Björck-rectified stored U, or, on a step whose PU just ran, from the fp32
eigenvectors that PU produced (exactly orthogonal, so no dequantization or Björck is needed).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ... import linalg
from .base import FAILED, OK, RETRIED, Entries, Storage, Update, all_finite


class EigenStorage(Storage):
    def __init__(self, cfg):
        super().__init__(cfg)
        self._stat = self.statistic_codec()  # the eigenvectors, at ``statistic_bits``

    def init(self, device: torch.device) -> Entries:
        eye = self.eye(device)
        eigvals = torch.full((self.cfg.order,), self.cfg.eps, dtype=torch.float32, device=device)
        return {"eigvals": eigvals, **self._stat.store("eigvecs", eye, transpose=True), **self.store("root", eye, symmetric=True)}

    def eigvecs(self, st: Mapping[str, torch.Tensor], bjorck_steps: int = 0) -> torch.Tensor:
        """The stored eigenvectors (columns), dequantized and Björck-rectified."""
        return linalg.bjorck(self._stat.load(st, "eigvecs", transpose=True), bjorck_steps)

    stores_eigenvectors = True

    def eigenvalues(self, st: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return st["eigvals"]

    def exact_root(self, st: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        v = self.eigvecs(st, self.cfg.bjorck_root)
        return linalg.eigen_inverse_root(st["eigvals"], v, 4, self.cfg.eps)

    def statistic(self, st: Mapping[str, torch.Tensor]) -> torch.Tensor:
        v = self.eigvecs(st, self.cfg.bjorck_stats)
        return (v * st["eigvals"]) @ v.mT

    def update_stats(self, st: Mapping[str, torch.Tensor], m: torch.Tensor) -> Update:
        cfg = self.cfg
        v = self.eigvecs(st, cfg.bjorck_stats)
        a = torch.addmm(m, v * st["eigvals"], v.mT, beta=1 - cfg.beta, alpha=cfg.beta)
        status = OK
        eigvals, eigvecs = linalg.subspace_iteration(a, v)
        if not all_finite(eigvals, eigvecs):
            if not (all_finite(a)):
                return Update({}, FAILED)  # an overflowing statistic never enters the state
            eigvals, eigvecs = linalg.subspace_iteration(a.double(), v.double())
            eigvals, eigvecs, status = eigvals.float(), eigvecs.float(), RETRIED
            if not all_finite(eigvals, eigvecs):
                return Update({}, FAILED)
        entries = {"eigvals": eigvals, **self._stat.store("eigvecs", eigvecs, transpose=True)}
        return Update(entries, status, {"eigvals": eigvals, "eigvecs": eigvecs})

    def update_root(self, st: Mapping[str, torch.Tensor], fresh: Entries | None = None) -> Update:
        cfg = self.cfg
        if fresh is not None:
            eigvals, v = fresh["eigvals"], fresh["eigvecs"]
        else:
            eigvals, v = st["eigvals"], self.eigvecs(st, cfg.bjorck_root)
        for dtype in (torch.float32, torch.float64):
            root = linalg.eigen_inverse_root(eigvals.to(dtype), v.to(dtype), 4, cfg.eps)
            if all_finite(root):
                status = OK if dtype == torch.float32 else RETRIED
                return Update(self.store("root", root.float(), symmetric=True), status)
        return Update({}, FAILED)
