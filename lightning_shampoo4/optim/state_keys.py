"""The one place that knows how a state entry is named.

A parameter's state is a flat dict of plain tensors (what torch's optimizers and checkpoints
hold). Entries of a Kronecker factor are named ``"{block}.{side}.{name}"`` (``"3.L.root_codes"``:
block 3, left factor, the root's codes); per-parameter entries (``"step"``, ``"exp_avg"``,
``"last_root_step"``) have no block. Everything that reads or writes keys goes through
:class:`StateKey`.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["SIDES", "StateKey"]

SIDES = ("L", "R")


class StateKey(NamedTuple):
    """A parsed state key: ``block`` and ``side`` are None for per-parameter entries."""

    block: int | None
    side: str | None
    name: str

    @classmethod
    def parse(cls, key: str) -> StateKey:
        head, _, rest = key.partition(".")
        if head.isdigit() and rest:
            side, _, name = rest.partition(".")
            if side in SIDES and name:
                return cls(int(head), side, name)
        return cls(None, None, key)

    @staticmethod
    def prefix(block: int, side: str) -> str:
        """The key prefix of one factor (``"3.L"``)."""
        return f"{block}.{side}"

    def __str__(self) -> str:
        return self.name if self.block is None else f"{self.block}.{self.side}.{self.name}"


def block_of(key: str) -> int | None:
    """The block a state key belongs to (``"3.L.eigvals"`` -> 3), ``None`` for per-parameter keys."""
    return StateKey.parse(key).block
