"""A read-only view of one factor's state, for callbacks, benchmarks and tests.

The optimizer state stays plain tensors under keys ``"{block}.{side}.{name}"``
(:class:`.state_keys.StateKey`); a :class:`Factor` pairs such a key prefix with the storage
that knows how to read it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from ..kernels import QuantizedMatrix
from .state_keys import StateKey
from .storage import FactorConfig, Storage


class PrefixView(Mapping):
    """The entries ``"{prefix}.{name}"`` of a parameter's state, seen as ``name``."""

    __slots__ = ("state", "prefix")

    def __init__(self, state: Mapping[str, object], prefix: str):
        self.state = state
        self.prefix = prefix

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.state[f"{self.prefix}.{name}"]

    def __iter__(self) -> Iterator[str]:
        block, side = self.prefix.split(".")
        keys = (StateKey.parse(k) for k in self.state)
        return (k.name for k in keys if k.block == int(block) and k.side == side)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Factor:
    """One Kronecker factor: its configuration, stored state and derived matrices."""

    def __init__(self, state: Mapping[str, object], prefix: str, storage: Storage):
        self.view = PrefixView(state, prefix)
        self.prefix = prefix
        self.storage = storage

    @property
    def cfg(self) -> FactorConfig:
        return self.storage.cfg

    @property
    def order(self) -> int:
        return self.storage.cfg.order

    def eigvecs(self, bjorck_steps: int = 0) -> torch.Tensor:
        """The stored eigenvectors (columns), dequantized and Björck-rectified (eigenvector storage)."""
        return self.storage.eigvecs(self.view, bjorck_steps)

    @property
    def stores_eigenvectors(self) -> bool:
        """Whether the factor keeps an eigenvector matrix (``storage="eigenvectors"``)."""
        return self.storage.stores_eigenvectors

    def eigvals(self) -> torch.Tensor:
        """The statistic's eigenvalues: stored ones, or ``eigvalsh`` of the stored statistic."""
        return self.storage.eigenvalues(self.view)

    def exact_root(self) -> torch.Tensor | None:
        """The inverse root of the stored statistic computed exactly now (None if that fails)."""
        return self.storage.exact_root(self.view)

    def factor(self) -> torch.Tensor:
        """The statistic as dense fp32 (reconstructed from U and lambda in the eigenvector storage)."""
        return self.storage.statistic(self.view)

    def root(self) -> torch.Tensor:
        """The stored inverse root as dense fp32."""
        return self.storage.root(self.view)

    def operand(self) -> torch.Tensor | QuantizedMatrix:
        return self.storage.operand(self.view)
