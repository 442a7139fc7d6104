"""Which Lightning strategies Shampoo4bit runs under, and a check that says so clearly.

Supported: one device (``SingleDeviceStrategy``: ``strategy="auto"`` on one CPU or GPU), data
parallel (``DDPStrategy``: ``"ddp"``, ``"ddp_spawn"``, ``"ddp_fork"``, ``"ddp_notebook"``), where
the optimizer shards its Shampoo blocks over the ranks (``distributed="auto"``), and
``ModelParallelStrategy`` with FSDP2 (``fully_shard`` on a 1-D data-parallel mesh), where the
whole parameters' blocks have owner ranks as under DDP (``distributed="auto"``, lossless) or each
rank preconditions its local shards (``"off"``). The optimizer itself refuses parameter layouts it
cannot precondition (2-D meshes such as HSDP, tensor-parallel shards other than dim 0) with the
same error.

Not supported: ``FSDPStrategy`` (FSDP1 flat parameters would be preconditioned by their
flattened shard shapes), DeepSpeed (ZeRO partitions and wraps the optimizer state itself), XLA
(untested).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    Strategy,
    XLAStrategy,
)

from .optim.distributed import UnsupportedStrategyError

__all__ = ["SUPPORTED_STRATEGIES", "UnsupportedStrategyError", "check_strategy", "is_supported_strategy"]

SUPPORTED_STRATEGIES = (
    "auto (one device)",
    "ddp",
    "ddp_spawn",
    "ddp_fork",
    "ddp_notebook",
    "ModelParallelStrategy with fully_shard (FSDP2, 1-D data-parallel mesh)",
)

# Subclasses of the supported base classes that are not supported themselves.
_REFUSED_SUBCLASSES: tuple[type[Strategy], ...] = (DeepSpeedStrategy, XLAStrategy, SingleDeviceXLAStrategy)


def is_supported_strategy(strategy: Any) -> bool:
    """Whether ``strategy`` (a Lightning ``Strategy`` instance) is one Shampoo4bit runs under."""
    if isinstance(strategy, _REFUSED_SUBCLASSES):
        return False
    return isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy))


def check_strategy(strategy: Any, who: str = "Shampoo4bit") -> None:
    """Raise :class:`UnsupportedStrategyError` naming the supported strategies if ``strategy`` is not one."""
    if is_supported_strategy(strategy):
        return
    name = type(strategy).__name__
    raise UnsupportedStrategyError(
        f"{who} does not support the {name} strategy. Supported strategies: "
        f"{', '.join(SUPPORTED_STRATEGIES)} (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy). "
        "FSDPStrategy (FSDP1) flattens the parameters the optimizer sees and DeepSpeed wraps the optimizer "
        "itself; train with strategy='ddp', or ModelParallelStrategy and fully_shard, instead."
    )
