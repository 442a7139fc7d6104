"""``dense``: 32-bit Shampoo. The statistic and its inverse root are fp32 matrices.

PU: in-place-free EMA ``beta A + (1 - beta) M``. PIRU: exact ``eigh`` root (float64 retry),
or the coupled Schur-Newton iteration iterated to convergence (``root_method="schur_newton"``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import FAILED, OK, Entries, Storage, Update, all_finite


class DenseStorage(Storage):
    def init(self, device: torch.device) -> Entries:
        eye = self.eye(device)
        return {"factor": self.cfg.eps * eye, "root": eye}

    def statistic(self, st: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return st["factor"]

    def update_stats(self, st: Mapping[str, torch.Tensor], m: torch.Tensor) -> Update:
        a = torch.lerp(m, st["factor"], self.cfg.beta)  # beta * A + (1 - beta) * M
        if not all_finite(a):
            return Update({}, FAILED)
        return Update({"factor": a}, OK)

    def update_root(self, st: Mapping[str, torch.Tensor], fresh: Entries | None = None) -> Update:
        return self.root_update(st["factor"])
