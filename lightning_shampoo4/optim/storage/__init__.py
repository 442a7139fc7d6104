"""How one Kronecker factor is stored and updated: one module per storage mode.

Every mode implements :class:`~.base.Storage`: ``init`` gives the initial entries,
``update_stats`` / ``update_root`` *return* new entries instead of writing them (so a step can
compute everything, check it, and only then commit), and ``operand`` gives the root in the
form the preconditioning kernel takes. Entries are plain tensors named without the
``"{block}.{side}."`` prefix the optimizer adds.

============  ==========================================  ==================================
mode          chosen by                                   module
============  ==========================================  ==================================
``eigen``     ``bits`` 4 / 8, ``quantize="eigenvectors"``  :mod:`.eigen` (the paper)
``cholesky``  ``bits`` 4 / 8, ``quantize="cholesky"``      :mod:`.cholesky` (Li et al., 2025)
``cholesky8`` ``bits`` 4 / 8, ``quantize="cholesky8"``     :mod:`.cholesky` (8-bit factor; default)
``dense``     ``bits=32``                                  :mod:`.dense`
``naive``     ``bits`` 4 / 8, ``quantize="preconditioner"`` :mod:`.naive` (baseline)
============  ==========================================  ==================================
"""

from __future__ import annotations

from .base import FAILED, OK, RETRIED, FactorConfig, Storage, Update
from .cholesky import Cholesky8Storage, CholeskyStorage
from .dense import DenseStorage
from .eigen import EigenStorage
from .naive import NaiveStorage

__all__ = ["FAILED", "OK", "RETRIED", "FactorConfig", "Storage", "Update", "storage_for"]

_MODES: dict[str, type[Storage]] = {
    "eigen": EigenStorage, "cholesky": CholeskyStorage, "cholesky8": Cholesky8Storage,
    "dense": DenseStorage, "naive": NaiveStorage,
}


def storage_for(cfg: FactorConfig) -> Storage:
    """The storage object for a factor configuration."""
    return _MODES[cfg.mode](cfg)
