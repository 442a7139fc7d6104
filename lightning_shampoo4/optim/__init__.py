"""The optimizer: torch only, never Lightning.

* :mod:`.shampoo`: :class:`Shampoo4bit` and its step (compute, check, commit).
* :mod:`.storage`: one module per storage mode of a Kronecker factor.
* :mod:`.base_update`: the AdamW / SGD update fed with the preconditioned direction.
* :mod:`.blocking`, :mod:`.checkpoint`, :mod:`.validation`, :mod:`.memory`: parameter
  tensors to blocks, checked checkpoint loading, argument checks, exact state bytes.
* :mod:`.distributed`: which rank computes which block under DDP, local shards under FSDP2.
"""

from .checkpoint import CheckpointMismatchError
from .factor import Factor
from .memory import KINDS, SECOND_ORDER, memory_report
from .shampoo import COUNTERS, Shampoo4bit, UnsupportedStrategyError

__all__ = [
    "COUNTERS",
    "KINDS",
    "SECOND_ORDER",
    "CheckpointMismatchError",
    "Factor",
    "Shampoo4bit",
    "UnsupportedStrategyError",
    "memory_report",
]
