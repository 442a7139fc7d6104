"""``storage="naive"``: the naive 4-bit baseline, quantizing the statistic and its root themselves.

Stored: the statistic (``factor_*``, at ``statistic_bits``) and the inverse root (``root_*``, at
``bits``), both diag-real quantized. PU: dequantize, EMA, requantize. PIRU: the coupled Newton iteration as the
paper's baseline runs it (at most 10 iterations, early stop, no fallback;
``root_method="schur_newton"``, the default here) or an exact ``eigh`` root
(``root_method="eigen"``). Quantizing the small eigenvalues away is what this baseline shows.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .base import FAILED, OK, Entries, Storage, Update, all_finite


class NaiveStorage(Storage):
    newton_root = "newton_inverse_root_early_stop"  # the paper's baseline root

    def __init__(self, cfg):
        super().__init__(cfg)
        self._stat = self.statistic_codec()  # the statistic, at ``statistic_bits``

    def init(self, device: torch.device) -> Entries:
        eye = self.eye(device)
        return {**self._stat.store("factor", self.cfg.eps * eye, symmetric=True), **self.store("root", eye, symmetric=True)}

    def statistic(self, st: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self._stat.load(st, "factor", symmetric=True)

    def update_stats(self, st: Mapping[str, torch.Tensor], m: torch.Tensor) -> Update:
        a = torch.lerp(m, self.statistic(st), self.cfg.beta)
        if not all_finite(a):
            return Update({}, FAILED)
        return Update(self._stat.store("factor", a, symmetric=True), OK)

    def update_root(self, st: Mapping[str, torch.Tensor], fresh: Entries | None = None) -> Update:
        return self.root_update(self.statistic(st))
