"""``PreconditionerSchedule``: change how often Shampoo updates statistics and roots over training."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from ._common import ShampooCallback, _unwrap, preconditioned_groups

__all__ = ["SCHEDULED_KEYS", "PreconditionerSchedule"]

SCHEDULED_KEYS = ("stat_interval", "root_interval", "start_preconditioning_step")
UNITS = ("step", "epoch")


def _int_at_least(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    return value


def _check_table(schedule: Mapping[Any, Mapping[str, Any]]) -> dict[int, dict[str, int]]:
    """Validate ``{threshold: {setting: value}}``; thresholds may be int-like strings (from YAML)."""
    if not isinstance(schedule, Mapping):
        raise ValueError(f"schedule={schedule!r} must be a dict {{threshold: {{setting: value}}}}")
    table: dict[int, dict[str, int]] = {}
    for key, settings in schedule.items():
        try:
            threshold = int(key) if isinstance(key, str) else key
        except ValueError:
            threshold = key
        _int_at_least(f"schedule key {key!r}", threshold, 0)
        if not isinstance(settings, Mapping) or not settings:
            raise ValueError(f"schedule[{key!r}]={settings!r} must be a non-empty dict of {SCHEDULED_KEYS}")
        for name, value in settings.items():
            if name not in SCHEDULED_KEYS:
                raise ValueError(f"schedule[{key!r}] sets {name!r}; the settings it may change are {SCHEDULED_KEYS}")
            _int_at_least(f"schedule[{key!r}][{name!r}]", value, 0 if name == "start_preconditioning_step" else 1)
        table[threshold] = dict(settings)
    return dict(sorted(table.items()))


class PreconditionerSchedule(ShampooCallback):
    """Change ``stat_interval``, ``root_interval`` and ``start_preconditioning_step`` as training goes on.

    Two rules, usable together:

    * a table ``{threshold: {setting: value}}``: once the counter reaches ``threshold`` the
      named settings take the given values and keep them until a later entry changes them
      (unnamed settings keep their previous value; before the first threshold, and for
      settings no entry names, the optimizer's configured values apply). The counter is the
      optimizer's own step count ``counters["steps"]`` (``unit="step"``: an entry at ``k``
      applies from optimizer step ``k + 1`` on, i.e. once ``k`` steps have run) or
      ``trainer.current_epoch`` (``unit="epoch"``).
    * a warm-up: the first ``warmup_steps`` optimizer steps use ``warmup_root_interval`` /
      ``warmup_stat_interval`` (frequent root updates while the statistics move fast), then the
      table's or the configured intervals. During warm-up these win over the table.
      ``warmup_stat_interval`` defaults to ``gcd(stat_interval, warmup_root_interval)`` so that
      the root interval stays a multiple of it.

    Settings are applied right before every optimizer step (inside the step's closure, so the
    step they are set for already uses them), to every group of every Shampoo4bit optimizer
    except groups marked ``precondition=False`` by ``configure_shampoo``. PU / PIRU still happen
    when a parameter's own step count is a multiple of the interval then in force. Steps the
    AMP GradScaler skips do not count. The configured values are kept in the callback's state,
    so a resumed run schedules exactly as the uninterrupted one; each new ``fit`` reads them
    afresh from its optimizers, so one instance can serve several runs.

    Args:
        schedule: the table (or None).
        unit: ``"step"`` (optimizer steps) or ``"epoch"``: what the table's thresholds count.
        warmup_steps: optimizer steps of warm-up (0: none).
        warmup_root_interval: root interval during warm-up.
        warmup_stat_interval: statistics interval during warm-up (default: see above).

    Example::

        PreconditionerSchedule({0: {"root_interval": 10, "stat_interval": 10}, 200: {"root_interval": 100}})
        PreconditionerSchedule(warmup_steps=200, warmup_root_interval=10)
    """

    def __init__(
        self,
        schedule: Mapping[int, Mapping[str, int]] | None = None,
        unit: str = "step",
        warmup_steps: int = 0,
        warmup_root_interval: int | None = None,
        warmup_stat_interval: int | None = None,
    ) -> None:
        super().__init__()
        if unit not in UNITS:
            raise ValueError(f"unit={unit!r} is not supported; choose one of {UNITS}")
        self.table = _check_table(schedule) if schedule is not None else {}
        self.unit = unit
        self.warmup_steps = _int_at_least("warmup_steps", warmup_steps, 0)
        for name, value in (
            ("warmup_root_interval", warmup_root_interval),
            ("warmup_stat_interval", warmup_stat_interval),
        ):
            if value is not None:
                _int_at_least(name, value, 1)
        if self.warmup_steps and warmup_root_interval is None and warmup_stat_interval is None:
            raise ValueError("warmup_steps > 0 needs warmup_root_interval and/or warmup_stat_interval")
        if not self.warmup_steps and (warmup_root_interval is not None or warmup_stat_interval is not None):
            raise ValueError("warmup_root_interval / warmup_stat_interval need warmup_steps > 0")
        if (
            warmup_root_interval is not None
            and warmup_stat_interval is not None
            and warmup_root_interval % warmup_stat_interval
        ):
            raise ValueError(
                f"warmup_root_interval={warmup_root_interval} must be a multiple of "
                f"warmup_stat_interval={warmup_stat_interval}"
            )
        if not self.table and not self.warmup_steps:
            raise ValueError("PreconditionerSchedule needs a schedule table and/or warmup_steps")
        self.warmup_root_interval = warmup_root_interval
        self.warmup_stat_interval = warmup_stat_interval
        self._base: dict[str, dict[str, int]] = {}  # "optimizer_index.group_index" -> configured values

    # -- the rule ------------------------------------------------------------------------
    def settings_for(self, base: Mapping[str, int], steps: int, epoch: int) -> dict[str, int]:
        """The settings in force for the step after ``steps`` optimizer steps, in ``epoch``."""
        counter = steps if self.unit == "step" else epoch
        out = {k: int(base[k]) for k in SCHEDULED_KEYS}
        for threshold, settings in self.table.items():
            if threshold > counter:
                break
            out.update(settings)
        if steps < self.warmup_steps:
            root = self.warmup_root_interval if self.warmup_root_interval is not None else out["root_interval"]
            stat = self.warmup_stat_interval
            if stat is None:
                stat = math.gcd(out["stat_interval"], root)
            out["root_interval"], out["stat_interval"] = root, stat
        if out["root_interval"] % out["stat_interval"]:
            where = f"after {steps} optimizer steps" if self.unit == "step" else f"in epoch {epoch}"
            raise ValueError(
                f"PreconditionerSchedule {where} gives root_interval={out['root_interval']}, which is not a multiple "
                f"of stat_interval={out['stat_interval']}; set both in the schedule entry"
            )
        return out

    # -- hooks ---------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            # A new fit has new optimizers: their configured values are read again at the first step.
            # Lightning restores a checkpoint's callback state after setup, so a resumed run keeps its own.
            self._base = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        optimizer = _unwrap(optimizer)
        if optimizer not in self._optimizers:
            return
        opt_index = next(i for i, opt in enumerate(trainer.optimizers) if _unwrap(opt) is optimizer)
        steps = int(optimizer.counters["steps"])
        for group_index, group in preconditioned_groups(optimizer):
            key = f"{opt_index}.{group_index}"
            base = self._base.setdefault(key, {k: int(group[k]) for k in SCHEDULED_KEYS})
            for name, value in self.settings_for(base, steps, trainer.current_epoch).items():
                if group[name] != value:
                    group[name] = value

    def state_dict(self) -> dict[str, Any]:
        return {"base": {key: dict(values) for key, values in self._base.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._base = {key: dict(values) for key, values in state_dict.get("base", {}).items()}
