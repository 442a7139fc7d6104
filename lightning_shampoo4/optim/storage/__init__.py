"""How one Kronecker factor is stored and updated: one module per storage.

Every storage implements :class:`~.base.Storage`: ``init`` gives the initial entries,
``update_stats`` / ``update_root`` *return* new entries instead of writing them (so a step can
compute everything, check it, and only then commit), and ``operand`` gives the root in the
form the preconditioning kernel takes. Entries are plain tensors named without the
``"{block}.{side}."`` prefix the optimizer adds (:class:`~..factor.StateKey`).

================  =============================================  =====================================
``storage``       chosen by                                      module
================  =============================================  =====================================
``cholesky``      ``bits`` 4 / 8, ``storage="cholesky"``         :mod:`.cholesky` (default; Li et al.)
``eigenvectors``  ``bits`` 4 / 8, ``storage="eigenvectors"``     :mod:`.eigen` (Wang et al., the paper)
``naive``         ``bits`` 4 / 8, ``storage="naive"``            :mod:`.naive` (baseline)
``dense``         ``bits=32``                                    :mod:`.dense`
================  =============================================  =====================================

``docs/algorithms.md`` describes each of them.
"""

from __future__ import annotations

from .base import FAILED, OK, RETRIED, FactorConfig, Storage, Update
from .cholesky import CholeskyStorage
from .dense import DenseStorage
from .eigen import EigenStorage
from .naive import NaiveStorage

__all__ = ["FAILED", "OK", "RETRIED", "FactorConfig", "Storage", "Update", "storage_for"]

_STORAGES: dict[str, type[Storage]] = {
    "cholesky": CholeskyStorage, "eigenvectors": EigenStorage, "naive": NaiveStorage, "dense": DenseStorage,
}


def storage_for(cfg: FactorConfig) -> Storage:
    """The storage object for a factor configuration."""
    return _STORAGES[cfg.storage](cfg)
