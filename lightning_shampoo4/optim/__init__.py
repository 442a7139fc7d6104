"""The optimizer: torch only, never Lightning.

* :mod:`.settings`: every optimizer argument declared once (default, allowed values, whether
  it fixes the stored format, one doc line); validation, checkpoint format keys, the recipes'
  optimizer section, the command line and the docs tables are derived from it. A second
  optimizer declares its own table there the same way.
* :mod:`.shampoo`: :class:`Shampoo4bit` and its step (plan blocks, statistics and roots,
  precondition, check, commit).
* :mod:`.soap`: :class:`SOAP4bit`, Adam in Shampoo's eigenbasis with 4-bit eigenvector matrices.
* :mod:`.storage`: one module per storage of a Kronecker factor (``storage=``).
* :mod:`.base_update`: the AdamW / SGD update fed with the preconditioned direction.
* :mod:`.blocking`, :mod:`.checkpoint`, :mod:`.memory`: parameter tensors to blocks, checked
  checkpoint loading, exact state bytes.
* :mod:`.distributed`: which rank computes which block under DDP, local shards under FSDP2.
"""

from .checkpoint import CheckpointMismatchError
from .factor import Factor
from .memory import KINDS, SECOND_ORDER, memory_report
from .settings import OPTIMIZERS, SHAMPOO_SETTINGS, Setting, SettingsTable
from .shampoo import COUNTERS, Shampoo4bit, UnsupportedStrategyError
from .soap import SOAP_SETTINGS, SOAP4bit  # registers its settings table

__all__ = [
    "COUNTERS",
    "KINDS",
    "OPTIMIZERS",
    "SHAMPOO_SETTINGS",
    "SECOND_ORDER",
    "CheckpointMismatchError",
    "Factor",
    "SOAP4bit",
    "SOAP_SETTINGS",
    "Setting",
    "SettingsTable",
    "Shampoo4bit",
    "UnsupportedStrategyError",
    "memory_report",
]
