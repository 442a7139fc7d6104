"""Helpers shared by the callbacks: find a trainer's optimizers of this package, check its strategy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException

from ..configure import is_preconditioned
from ..optim import Shampoo4bit
from ..optim.settings import OPTIMIZERS
from ..strategies import check_strategy

__all__ = [
    "ShampooCallback",
    "check_trainer_strategy",
    "param_names",
    "preconditioned_groups",
    "require_shampoo_optimizers",
    "shampoo_optimizers",
]


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer behind a ``LightningOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "_optimizer", optimizer)


def _classes(accepts: tuple[str, ...]) -> tuple[type, ...]:
    """The optimizer classes named in ``accepts`` (from the settings tables)."""
    return tuple(OPTIMIZERS[name].optimizer_class() for name in accepts if name in OPTIMIZERS)


def shampoo_optimizers(trainer: pl.Trainer, accepts: tuple[str, ...] = ("Shampoo4bit",)) -> list[Any]:
    """The trainer's optimizers that are one of ``accepts`` (class names; subclasses included), in order."""
    classes = _classes(accepts)
    return [opt for opt in map(_unwrap, trainer.optimizers) if isinstance(opt, classes)]


def require_shampoo_optimizers(trainer: pl.Trainer, who: str, accepts: tuple[str, ...] = ("Shampoo4bit",)) -> list[Any]:
    """Like :func:`shampoo_optimizers`, but raise a clear error when there is none."""
    found = shampoo_optimizers(trainer, accepts)
    if not found:
        kinds = [type(_unwrap(opt)).__name__ for opt in trainer.optimizers] or ["none"]
        wanted = " or ".join(accepts)
        raise MisconfigurationException(
            f"{who} needs a {wanted} optimizer, but the model's configure_optimizers returned: "
            f"{', '.join(kinds)}. Return lightning_shampoo4.Shampoo4bit (or use "
            "lightning_shampoo4.configure.configure_shampoo) or remove the callback."
        )
    return found


def check_trainer_strategy(trainer: pl.Trainer, who: str) -> None:
    """Raise ``UnsupportedStrategyError`` if the trainer's strategy is not one Shampoo4bit supports."""
    check_strategy(trainer.strategy, who=who)


def preconditioned_groups(optimizer: Shampoo4bit) -> Iterator[tuple[int, dict]]:
    """``(index, group)`` for the groups that get Shampoo (not those configure.py keeps first-order)."""
    for i, group in enumerate(optimizer.param_groups):
        if is_preconditioned(group):
            yield i, group


def param_names(module: Any) -> dict[int, str]:
    """``id(param) -> qualified name`` for the parameters of ``module``."""
    return {id(p): name for name, p in module.named_parameters()}


class ShampooCallback(pl.Callback):
    """Base of the package's callbacks: checks the strategy in ``setup`` and finds the
    optimizers it works with (``accepts``: class names) in ``on_fit_start`` (they do not exist
    before), raising clearly."""

    accepts: tuple[str, ...] = ("Shampoo4bit",)

    def __init__(self) -> None:
        self._optimizers: list[Shampoo4bit] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_trainer_strategy(trainer, type(self).__name__)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._optimizers = require_shampoo_optimizers(trainer, type(self).__name__, self.accepts)
