"""Which Lightning strategies Shampoo4bit runs under, and a check that says so clearly.

Supported: one device (``SingleDeviceStrategy``: ``strategy="auto"`` on one CPU or GPU) and
data parallel (``DDPStrategy``: ``"ddp"``, ``"ddp_spawn"``, ``"ddp_fork"``,
``"ddp_notebook"``). Under DDP every rank holds the full parameters and the all-reduced
gradient, so every rank computes the same Shampoo update and holds the same state.

Not supported yet: strategies that shard parameters or own the optimizer. FSDP and
``ModelParallelStrategy`` hand the optimizer flattened or DTensor shards, so Kronecker factors
would be built from shard shapes instead of layer shapes; DeepSpeed (ZeRO) partitions and
wraps the optimizer state itself; XLA (TPU) is untested.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    Strategy,
    XLAStrategy,
)

__all__ = ["SUPPORTED_STRATEGIES", "UnsupportedStrategyError", "check_strategy", "is_supported_strategy"]

SUPPORTED_STRATEGIES = ("auto (one device)", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")

# Subclasses of the supported base classes that are not supported themselves.
_REFUSED_SUBCLASSES: tuple[type[Strategy], ...] = (DeepSpeedStrategy, XLAStrategy, SingleDeviceXLAStrategy)


class UnsupportedStrategyError(ValueError):
    """Raised when Shampoo4bit is asked to train under a strategy it does not support."""


def is_supported_strategy(strategy: Any) -> bool:
    """Whether ``strategy`` (a Lightning ``Strategy`` instance) is one Shampoo4bit runs under."""
    if isinstance(strategy, _REFUSED_SUBCLASSES):
        return False
    return isinstance(strategy, (SingleDeviceStrategy, DDPStrategy))


def check_strategy(strategy: Any, who: str = "Shampoo4bit") -> None:
    """Raise :class:`UnsupportedStrategyError` naming the supported strategies if ``strategy`` is not one."""
    if is_supported_strategy(strategy):
        return
    name = type(strategy).__name__
    raise UnsupportedStrategyError(
        f"{who} does not support the {name} strategy yet. Supported strategies: "
        f"{', '.join(SUPPORTED_STRATEGIES)} (SingleDeviceStrategy, DDPStrategy). "
        "FSDP / model-parallel shard the parameters the optimizer sees and DeepSpeed wraps the "
        "optimizer itself; train with strategy='ddp' instead."
    )
