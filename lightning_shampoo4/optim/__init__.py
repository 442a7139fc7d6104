"""The optimizer: torch only, never Lightning."""

from .factor import Factor
from .memory import KINDS, SECOND_ORDER, memory_report
from .shampoo import COUNTERS, Shampoo4bit

__all__ = ["COUNTERS", "KINDS", "SECOND_ORDER", "Factor", "Shampoo4bit", "memory_report"]
