"""The optimizer and the learning-rate schedule of a training run, as plain data, and Lightning's
``configure_optimizers`` dict built from them.

:class:`OptimizerConfig` is derived from the optimizers' settings tables
(:mod:`lightning_shampoo4.optim.settings`): one field per constructor argument, with the same
name, type and default, plus ``variant`` (which optimizer, and the settings a variant implies).
So every argument is a recipe key (``optimizer.block_size=null``) and a command-line flag
(``--optimizer.block_size null``), and the ``4bit`` variant builds exactly the optimizer's own
defaults. A field is ``None`` ("the optimizer's default") where a variant sets it or where two
optimizers declare different defaults.

Recipes (:mod:`lightning_shampoo4.recipes`), the LightningModule (:mod:`lightning_shampoo4.module`)
and the command line all read these classes; this module imports none of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal, Optional

import torch
from torch import nn

from .configure import PRECONDITION_KEY, build_lr_scheduler, configure_optimizer, shampoo_param_groups
from .optim.settings import BASE_SETTINGS, OPTIMIZERS, SettingsTable, quantize_to_storage

__all__ = [
    "FIRST_ORDER",
    "VARIANTS",
    "OptimizerConfig",
    "RecipeError",
    "ScheduleConfig",
    "build_optimizer",
    "coerce_config",
    "configure_optimizers",
    "first_order_param_groups",
    "milestone_steps",
    "to_primitive",
    "training_steps",
]

FIRST_ORDER = "first_order"
"""The variant that runs the base optimizer alone (plain torch SGD / AdamW)."""


class RecipeError(ValueError):
    """A recipe name, key or value is invalid; the message names it and suggests the closest valid ones."""


def suggest(word: str, choices: Any, n: int = 3) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` (empty string when none is close)."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def to_primitive(obj: Any) -> Any:
    """Dataclasses to dicts and tuples to lists, recursively."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_primitive(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_primitive(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_primitive(v) for v in obj]
    return obj


def coerce_config(cls: type, value: Any) -> Any:
    """``value`` as an instance of the dataclass ``cls``: None gives the defaults, a mapping its
    fields (what checkpoints store), an instance is returned as is."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        names = {f.name for f in fields(cls)}
        unknown = [k for k in value if k not in names]
        if unknown:
            raise RecipeError(f"unknown {cls.__name__} field {unknown[0]!r}.{suggest(unknown[0], names)}")
        return cls(**value)
    if is_dataclass(value):  # e.g. jsonargparse's copy of the class under another module name
        return cls(**{f.name: getattr(value, f.name) for f in fields(value)})
    raise TypeError(f"expected {cls.__name__}, a mapping or None, got {type(value).__name__}")


# -- the optimizer section, derived from the settings tables ---------------------------------------
def implied(table: SettingsTable) -> dict[str, dict[str, Any]]:
    """A table's recipe variants and what each implies; a table that declares none gets one named
    after the optimizer (``"soap4bit"``) that builds its defaults."""
    return {k: dict(v) for k, v in table.variants.items()} or {table.optimizer.lower(): {}}


def _variants() -> dict[str, SettingsTable]:
    """Every recipe variant and the optimizer it builds."""
    return {name: table for table in OPTIMIZERS.values() for name in implied(table)}


VARIANT_TABLES = _variants()
VARIANTS = (*VARIANT_TABLES, FIRST_ORDER)
"""The values of ``optimizer.variant``."""

# the base optimizer's settings: the ones ``first_order`` uses
_FIRST_ORDER_KEYS = ("base", "lr", "momentum", "nesterov", "weight_decay", "betas", "eps")


def _required(tp: Any) -> Any:
    """``Optional[X]`` -> ``X``; anything else unchanged."""
    args = getattr(tp, "__args__", ())
    rest = tuple(a for a in args if a is not type(None))
    if type(None) in args and len(rest) == 1:
        return rest[0]
    return tp


def _optional(tp: Any) -> Any:
    args = getattr(tp, "__args__", ())
    return tp if type(None) in args else Optional[tp]


def _optimizer_fields() -> list[tuple[str, Any, Any]]:
    """``(name, type, field)`` of every setting of every optimizer, first declaration first."""
    rows: dict[str, list] = {}
    for table in OPTIMIZERS.values():
        for s in table.settings:
            rows.setdefault(s.name, []).append(s)
    by_variant = _variant_keys()
    out = []
    for name, declared in rows.items():
        s = declared[0]
        default, tp = s.default, s.annotation
        if any(_required(r.annotation) != _required(tp) for r in declared[1:]):  # two types: checked by each
            default, tp = None, Any
        elif name in by_variant or s.deprecated is not None or any(r.default != default for r in declared[1:]):
            default, tp = None, _optional(tp)
        out.append((name, tp, field(default=default)))
    return out


def _variant_keys() -> set[str]:
    return {k for table in OPTIMIZERS.values() for settings in implied(table).values() for k in settings}


def _base_default(name: str) -> Any:
    """A base-optimizer setting's default (for ``first_order`` where the section leaves it null)."""
    return next(s.default for s in BASE_SETTINGS if s.name == name)


def _optimizer_doc() -> str:
    lines = [
        "The optimizer: a variant of one of the package's optimizers, or the base optimizer alone.",
        "",
        "One field per constructor argument of the optimizers (the same name, type and default);",
        "null means the variant's value, else the optimizer's own default.",
        "",
        "Attributes:",
        f"    variant: which optimizer: {', '.join(VARIANTS)}. "
        + "; ".join(f"{name} = {table.describe(implied(table)[name])}" for name, table in VARIANT_TABLES.items())
        + f"; {FIRST_ORDER} = plain torch SGD / AdamW.",
    ]
    seen = set()
    for table in OPTIMIZERS.values():
        for s in table.settings:
            if s.name not in seen:
                seen.add(s.name)
                lines.append(f"    {s.name}: {s.doc}.")
    return "\n".join(lines)


def _post_init(self: Any) -> None:
    """Checks of the section as a whole; the optimizer checks each value when it is built."""
    for f in fields(self):
        value = getattr(self, f.name)
        if isinstance(value, list) and f.name != "variant":  # YAML and hparams give lists for tuples
            setattr(self, f.name, tuple(value))
    if self.variant not in VARIANTS:
        raise RecipeError(f"optimizer.variant must be one of {VARIANTS}, got {self.variant!r}.{suggest(self.variant, VARIANTS)}")
    if self.lr is not None and not self.lr > 0:
        raise RecipeError(f"optimizer.lr must be > 0, got {self.lr!r}")
    if self.weight_decay is not None and self.weight_decay < 0:
        raise RecipeError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay!r}")
    if getattr(self, "quantize", None) is not None:
        _translate_quantize(self)
    if self.variant == FIRST_ORDER:
        _check_first_order(self)
    elif self.table.optimizer == "Shampoo4bit" and (
        self.stat_interval < 1 or self.root_interval < 1 or self.root_interval % self.stat_interval
    ):
        raise RecipeError(
            "optimizer.root_interval must be a positive multiple of optimizer.stat_interval, got "
            f"stat_interval={self.stat_interval}, root_interval={self.root_interval}"
        )


def _translate_quantize(cfg: Any) -> None:
    bits = cfg.bits if cfg.bits is not None else VARIANT_TABLES.get(cfg.variant, OPTIMIZERS["Shampoo4bit"]).variants.get(
        cfg.variant, {}).get("bits", 4)
    new = quantize_to_storage(cfg.quantize, bits)
    spelled = ", ".join(f"optimizer.{k}={v}" for k, v in new.items())
    warnings.warn(f"optimizer.quantize={cfg.quantize} is deprecated and will be removed in the next release; "
                  f"write {spelled} instead", DeprecationWarning, stacklevel=4)
    for k, v in new.items():
        setattr(cfg, k, v)
    cfg.quantize = None


def _check_first_order(cfg: Any) -> None:
    """``first_order`` is plain torch SGD / AdamW: a setting only another variant reads is refused
    when it is set to anything but its default (it would have no effect)."""
    for key in sorted(_variant_keys()):
        if getattr(cfg, key) is not None:
            raise RecipeError(
                f"optimizer.{key}={getattr(cfg, key)!r} has no effect with variant='first_order'; "
                f"pick another variant ({', '.join(VARIANT_TABLES)}) or leave it null"
            )
    if cfg.moment_bits not in (None, 32):
        raise RecipeError(
            f"optimizer.moment_bits={cfg.moment_bits!r} needs another variant ({', '.join(VARIANT_TABLES)}): "
            "variant='first_order' is plain torch SGD / AdamW with fp32 moments"
        )


def _table(self: Any) -> SettingsTable | None:
    """The settings table of the variant's optimizer (None for ``first_order``)."""
    return VARIANT_TABLES.get(self.variant)


def _is_shampoo(self: Any) -> bool:
    """Whether the variant is one of the package's optimizers (not ``first_order``)."""
    return self.variant != FIRST_ORDER


def _optimizer_kwargs(self: Any) -> dict[str, Any]:
    """Keyword arguments of the variant's optimizer: every setting it declares that is not null
    here, then what the variant implies for those that are (the rest keep the optimizer's own
    defaults)."""
    table = self.table
    if table is None:
        raise RecipeError("optimizer.variant='first_order' has no Shampoo settings")
    kwargs = {s.name: getattr(self, s.name) for s in table.settings if getattr(self, s.name) is not None}
    for key, value in implied(table)[self.variant].items():
        kwargs.setdefault(key, value)
    return kwargs


def _describe(self: Any) -> str:
    """Short human name, e.g. ``4-bit Shampoo (cholesky, 8-bit statistic) + AdamW`` (the default),
    ``4-bit Shampoo (eigenvectors) + 4-bit AdamW`` (the paper's method) or ``AdamW``."""
    base = "AdamW" if self.base == "adamw" else ("SGDM" if self.momentum else "SGD")
    if self.table is None:
        return base
    kwargs = self.optimizer_kwargs()
    if "base" not in self.table.names:  # an optimizer with its own update (SOAP4bit: Adam in an eigenbasis)
        return self.table.describe(kwargs)
    if kwargs.get("moment_bits", 32) != 32:
        base = f"{kwargs['moment_bits']}-bit {base}"
    return f"{self.table.describe(kwargs)} + {base}"


OptimizerConfig = dataclasses.make_dataclass(
    "OptimizerConfig",
    [("variant", Literal[VARIANTS], field(default="4bit")), *_optimizer_fields()],  # type: ignore[valid-type]
    namespace={
        "__post_init__": _post_init,
        "table": property(_table),
        "is_shampoo": property(_is_shampoo),
        "optimizer_kwargs": _optimizer_kwargs,
        "shampoo_kwargs": _optimizer_kwargs,  # the name before SOAP4bit joined
        "describe": _describe,
        "__module__": __name__,
    },
)
OptimizerConfig.__doc__ = _optimizer_doc()


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped every optimizer step.

    Attributes:
        name: none (constant), cosine (to min_lr_ratio * lr) or step (x gamma at each milestone).
        warmup_epochs: linear warm-up length in epochs (may be fractional).
        milestones: step decay points as fractions of the total optimizer steps.
        gamma: step decay factor.
        min_lr_ratio: final learning rate of the cosine schedule, relative to lr.
    """

    name: Literal["none", "cosine", "step"] = "none"
    warmup_epochs: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.9])
    gamma: float = 0.1
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        self.milestones = [float(m) for m in self.milestones]
        if self.warmup_epochs < 0:
            raise RecipeError(f"schedule.warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        if any(not 0.0 < m < 1.0 for m in self.milestones) or self.milestones != sorted(self.milestones):
            raise RecipeError(f"schedule.milestones must be increasing fractions in (0, 1), got {self.milestones!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise RecipeError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")


# -- building them --------------------------------------------------------------------------------
def first_order_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """``shampoo_param_groups(model)`` without the Shampoo-only keys (weight-decay split only)."""
    drop = (PRECONDITION_KEY, "start_preconditioning_step")
    return [{k: v for k, v in g.items() if k not in drop} for g in shampoo_param_groups(model)]


def _first_order(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    groups = first_order_param_groups(model)
    kw = {k: getattr(cfg, k) if getattr(cfg, k) is not None else _base_default(k) for k in _FIRST_ORDER_KEYS}
    if kw["base"] == "sgd":
        return torch.optim.SGD(groups, lr=kw["lr"], momentum=kw["momentum"], nesterov=kw["nesterov"],
                               weight_decay=kw["weight_decay"])
    return torch.optim.AdamW(groups, lr=kw["lr"], betas=kw["betas"], eps=kw["eps"], weight_decay=kw["weight_decay"])


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over ``model``'s parameters, without a schedule."""
    if cfg.is_shampoo:
        return configure_optimizer(model, cfg.table.optimizer, **cfg.optimizer_kwargs())["optimizer"]
    return _first_order(model, cfg)


def training_steps(trainer: Any, warmup_epochs: float) -> tuple[float, int]:
    """(total optimizer steps, warm-up steps) of the run ``trainer`` is about to do."""
    total = trainer.estimated_stepping_batches  # also sizes the training dataloader
    batches = trainer.num_training_batches
    per_epoch = math.ceil(batches / max(1, trainer.accumulate_grad_batches)) if math.isfinite(batches) else total
    warmup = round(warmup_epochs * per_epoch) if warmup_epochs else 0
    if math.isfinite(total):
        warmup = min(warmup, int(total))
    return total, warmup


def milestone_steps(fractions: list[float], total: int) -> tuple[int, ...]:
    """Milestone fractions as strictly increasing step counts, even for runs of a few steps
    (where rounding would merge them)."""
    steps: list[int] = []
    for fraction in fractions:
        step = max(1, round(fraction * total))
        steps.append(max(step, steps[-1] + 1) if steps else step)
    return tuple(steps)


def configure_optimizers(module: Any, cfg: Any, schedule: ScheduleConfig) -> dict[str, Any]:
    """Lightning's optimizer dict for ``module`` (a LightningModule attached to a Trainer).

    The schedule is stepped every optimizer step and sized from the Trainer, so overriding
    ``trainer.max_epochs`` or ``max_steps`` stretches or shrinks it.
    """
    has_schedule = schedule.name != "none" or schedule.warmup_epochs > 0
    steps: dict[str, Any] = {}
    if has_schedule:
        if getattr(module, "_trainer", None) is None:
            raise RecipeError("a learning-rate schedule needs the module to be attached to a Trainer")
        total, warmup = training_steps(module.trainer, schedule.warmup_epochs)
        if not math.isfinite(total):
            raise RecipeError(f"schedule {schedule.name!r} needs a finite run: set trainer.max_epochs or max_steps")
        steps = dict(schedule=schedule.name, total_steps=int(total), warmup_steps=warmup,
                     milestones=milestone_steps(schedule.milestones, int(total)), gamma=schedule.gamma,
                     min_lr_ratio=schedule.min_lr_ratio)
    if cfg.is_shampoo:
        return configure_optimizer(module, cfg.table.optimizer, **steps, **cfg.optimizer_kwargs())
    optimizer = _first_order(module, cfg)
    if not steps:
        return {"optimizer": optimizer}
    scheduler = build_lr_scheduler(optimizer, **steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

