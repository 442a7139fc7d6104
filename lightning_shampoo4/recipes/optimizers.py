"""Building a recipe's optimizer and schedule: kept under this name for existing imports; the
code is in :mod:`lightning_shampoo4.optimizers`."""

from __future__ import annotations

from ..optimizers import (
    build_optimizer,
    configure_optimizers,
    first_order_param_groups,
    milestone_steps,
    training_steps,
)

__all__ = ["build_optimizer", "configure_optimizers", "first_order_param_groups", "milestone_steps", "training_steps"]
