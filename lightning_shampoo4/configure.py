"""``configure_shampoo``: Shampoo4bit with sensible parameter groups and an optional per-step
learning-rate schedule, in one line of ``configure_optimizers``.

Which parameter gets what (:func:`shampoo_param_groups`):

* **No weight decay** for biases, norm-layer parameters, embeddings and every tensor that is
  a vector once size-1 dims are squeezed (a ViT ``cls_token`` of shape 1 x 1 x D), plus the
  names a model lists in ``no_weight_decay()`` (exact names, timm convention) or
  ``no_weight_decay_keywords()`` (substrings), plus the names or glob patterns you pass.
* **Shampoo** for tensors of rank >= 2 (after squeezing), except embeddings
  (``nn.Embedding`` / ``nn.EmbeddingBag``: their gradients touch a few rows per batch and their
  vocabulary-sized factors cost most and help least), tensors whose matrix view has a side
  longer than ``max_precondition_dim`` (vocabulary / class tables, e.g. an untied 50k x 768
  LM head) and the names you pass as ``no_precondition``. Those get exactly the base
  optimizer's update and no Shampoo state: their group carries ``precondition=False``.
  Rank <= 1 tensors always get the base update (the optimizer's rule).

Names are matched against the qualified parameter name: a pattern matches when it equals the
name, equals a dotted suffix of it (``"pos_embed"`` matches ``"model.pos_embed"``), or matches
it as a glob (``"*.bias"``).
"""

from __future__ import annotations

import fnmatch
import math
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .optim import Shampoo4bit
from .optim.blocking import matrix_shape
from .optim.settings import OPTIMIZERS, SettingsTable

__all__ = [
    "DEFAULT_MAX_PRECONDITION_DIM",
    "PRECONDITION_KEY",
    "SCHEDULES",
    "GroupedShampoo4bit",
    "LRSchedule",
    "ScheduleLR",
    "build_lr_scheduler",
    "configure_optimizer",
    "configure_shampoo",
    "configure_soap",
    "is_preconditioned",
    "shampoo_param_groups",
]

PRECONDITION_KEY = "precondition"
"""Group key: ``False`` marks a group that gets the base-optimizer update only."""

DEFAULT_MAX_PRECONDITION_DIM = 16384
"""Matrix views with a side longer than this get no Shampoo (vocabulary / class tables)."""

SCHEDULES = ("none", "cosine", "step")

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def is_preconditioned(group: Mapping[str, Any]) -> bool:
    """Whether a parameter group gets Shampoo (``False`` only for groups marked by this module)."""
    return group.get(PRECONDITION_KEY, True) is not False


# -- parameter groups ----------------------------------------------------------------------
def _matches(name: str, patterns: Iterable[str]) -> bool:
    return bool(name) and any(
        name == pat or name.endswith("." + pat) or fnmatch.fnmatchcase(name, pat) for pat in patterns
    )


def _model_no_weight_decay(module: nn.Module) -> tuple[set[str], set[str]]:
    """Names (qualified) and keywords declared by ``no_weight_decay()`` /
    ``no_weight_decay_keywords()`` on ``module`` or any submodule (timm convention)."""
    names: set[str] = set()
    keywords: set[str] = set()
    for prefix, sub in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        fn = getattr(sub, "no_weight_decay", None)
        if callable(fn):
            names.update(dot + str(n) for n in fn())
        fn = getattr(sub, "no_weight_decay_keywords", None)
        if callable(fn):
            keywords.update(str(k) for k in fn())
    return names, keywords


def _owner_kinds(module: nn.Module) -> dict[int, set[str]]:
    """``id(param) -> {"embedding", "norm"}`` for parameters owned by such layers."""
    kinds: dict[int, set[str]] = {}
    for sub in module.modules():
        kind = "embedding" if isinstance(sub, _EMBEDDINGS) else "norm" if isinstance(sub, _NORMS) else None
        if kind:
            for p in sub.parameters(recurse=False):
                kinds.setdefault(id(p), set()).add(kind)
    return kinds


def _check_patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name}={value!r} must be a list of parameter names or glob patterns")
    return tuple(value)


def _refuse_patterns_without_names(what: str, no_weight_decay: Sequence[str], no_precondition: Sequence[str]) -> None:
    """Name patterns cannot match parameters that come without names: say so instead of ignoring them."""
    given = [n for n, v in (("no_weight_decay", no_weight_decay), ("no_precondition", no_precondition)) if v]
    if given:
        raise ValueError(
            f"{' and '.join(given)} match parameter names, but params are {what} without names, so the "
            "patterns would be ignored; pass the module itself (self) or self.named_parameters() instead "
            "of self.parameters()"
        )


def shampoo_param_groups(
    params: nn.Module | Iterable[Any],
    *,
    no_weight_decay: Sequence[str] = (),
    no_precondition: Sequence[str] = (),
    precondition_embeddings: bool = False,
    max_precondition_dim: int | None = DEFAULT_MAX_PRECONDITION_DIM,
) -> list[dict[str, Any]]:
    """Split parameters into up to four groups by the rule in this module's docstring.

    Args:
        params: a module (the full rule: layer types and the model's ``no_weight_decay()``),
            ``named_parameters()`` pairs (names and shapes), plain parameters (shapes only), or
            parameter-group dicts (returned unchanged).
        no_weight_decay: extra parameter names / glob patterns without weight decay.
        no_precondition: extra parameter names / glob patterns that get no Shampoo.
        precondition_embeddings: give embedding tables Shampoo too.
        max_precondition_dim: matrix views with a longer side get no Shampoo (None: no limit).

    Raises:
        ValueError: a bad value, or name patterns given with plain parameters or group dicts
            (which carry no names to match).

    Returns:
        Group dicts for any torch optimizer: the weight-decay group sets nothing (so the
        optimizer's ``weight_decay`` applies), the others set ``weight_decay=0.0`` and/or
        ``precondition=False``. Empty groups are left out.
    """
    no_weight_decay = _check_patterns("no_weight_decay", no_weight_decay)
    no_precondition = _check_patterns("no_precondition", no_precondition)
    if max_precondition_dim is not None and (
        isinstance(max_precondition_dim, bool) or not isinstance(max_precondition_dim, int) or max_precondition_dim < 1
    ):
        raise ValueError(f"max_precondition_dim={max_precondition_dim!r} must be an integer >= 1 or None")
    if isinstance(params, nn.Module):
        rule = _Rule.of_module(params, no_weight_decay, no_precondition, precondition_embeddings, max_precondition_dim)
        return _groups(params.named_parameters(), rule)
    items = list(params)
    if not items:
        raise ValueError("params is empty: there is nothing to optimize")
    if all(isinstance(item, Mapping) for item in items):
        _refuse_patterns_without_names("parameter-group dicts", no_weight_decay, no_precondition)
        return [dict(item) for item in items]
    if all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in items):
        named = items
    elif all(isinstance(item, torch.Tensor) for item in items):
        _refuse_patterns_without_names("plain parameters", no_weight_decay, no_precondition)
        named = [("", p) for p in items]
    else:
        raise TypeError(
            "params must be a module, named_parameters() pairs, tensors or parameter-group dicts, "
            f"not a mix; got {sorted({type(i).__name__ for i in items})}"
        )
    return _groups(named, _Rule({}, set(), set(), no_weight_decay, no_precondition, precondition_embeddings,
                                max_precondition_dim))


class _Rule(NamedTuple):
    """What decides a parameter's group: its owner layer's kind, the model's and the caller's names."""

    kinds: dict[int, set[str]]
    model_names: set[str]
    model_keywords: set[str]
    no_weight_decay: tuple[str, ...]
    no_precondition: tuple[str, ...]
    precondition_embeddings: bool
    max_precondition_dim: int | None

    @classmethod
    def of_module(cls, module: nn.Module, *args: Any) -> _Rule:
        return cls(_owner_kinds(module), *_model_no_weight_decay(module), *args)

    def decay(self, name: str, p: torch.Tensor) -> bool:
        return not (
            matrix_shape(tuple(p.shape)) is None
            or self.kinds.get(id(p))
            or name in self.model_names
            or any(k in name for k in self.model_keywords)
            or _matches(name, self.no_weight_decay)
        )

    def precondition(self, name: str, p: torch.Tensor) -> bool:
        mshape = matrix_shape(tuple(p.shape))
        limit = self.max_precondition_dim
        return not (
            ("embedding" in self.kinds.get(id(p), set()) and not self.precondition_embeddings)
            or (mshape is not None and limit is not None and max(mshape) > limit)
            or _matches(name, self.no_precondition)
        )


def _groups(named: Iterable[tuple[str, torch.Tensor]], rule: _Rule) -> list[dict[str, Any]]:
    """The parameters that require grad, sorted into up to four groups by ``rule``."""
    buckets: dict[tuple[bool, bool], list[torch.Tensor]] = {
        key: [] for key in ((True, True), (False, True), (True, False), (False, False))
    }
    for name, p in named:
        if p.requires_grad:
            buckets[(rule.decay(name, p), rule.precondition(name, p))].append(p)
    groups = []
    for (decay, precondition), group_params in buckets.items():
        if not group_params:
            continue
        group: dict[str, Any] = {"params": group_params}
        if not decay:
            group["weight_decay"] = 0.0
        if not precondition:
            group[PRECONDITION_KEY] = False
        groups.append(group)
    if not groups:
        raise ValueError("params has no parameter that requires grad")
    return groups


class GroupedShampoo4bit(Shampoo4bit):
    """Shampoo4bit that sorts its parameters into groups itself; made for dependency injection.

    Use it as the default of a LightningCLI ``OptimizerCallable`` argument, where it is called
    with the module's parameters; every argument of :class:`Shampoo4bit` stays settable, e.g.
    ``--model.optimizer.lr 0.01``. Called with the module itself (``self.optimizer(self)``) it
    applies the full rule of :func:`shampoo_param_groups`; with ``named_parameters()`` it also
    matches names; with plain ``parameters()`` it decides by shape only (vectors: no weight decay)
    and refuses ``no_weight_decay`` / ``no_precondition``, which need names.

    Args:
        params: a module, ``named_parameters()``, parameters, or parameter-group dicts.
        no_weight_decay: extra parameter names / glob patterns without weight decay.
        no_precondition: extra parameter names / glob patterns that get no Shampoo.
        precondition_embeddings: give embedding tables Shampoo too.
        max_precondition_dim: matrix views with a longer side get no Shampoo (None: no limit).
        kwargs: any :class:`Shampoo4bit` argument.
    """

    def __init__(
        self,
        params: Any,
        no_weight_decay: Sequence[str] = (),
        no_precondition: Sequence[str] = (),
        precondition_embeddings: bool = False,
        max_precondition_dim: int | None = DEFAULT_MAX_PRECONDITION_DIM,
        **kwargs: Any,
    ):
        groups = shampoo_param_groups(
            params,
            no_weight_decay=no_weight_decay,
            no_precondition=no_precondition,
            precondition_embeddings=precondition_embeddings,
            max_precondition_dim=max_precondition_dim,
        )
        super().__init__(groups, **kwargs)


# -- learning-rate schedule ----------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _steps(name: str, value: Any, total_steps: int | None) -> int:
    """An int step count, or a fraction in [0, 1) of ``total_steps``."""
    if _is_int(value) and value >= 0:
        return value
    if _is_number(value) and 0.0 <= value < 1.0:
        if total_steps is None:
            raise ValueError(f"{name}={value!r} is a fraction of the total steps, so total_steps is needed")
        return round(value * total_steps)
    raise ValueError(f"{name}={value!r} must be an integer >= 0 (steps) or a float in [0, 1) (fraction of total)")


class LRSchedule:
    """Learning-rate multiplier of optimizer step ``step`` (0-based), for ``LambdaLR``.

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then:
    ``"none"``: 1; ``"cosine"``: from 1 down to ``min_lr_ratio`` at ``total_steps``
    (held there after); ``"step"``: ``gamma ** k`` where ``k`` milestones have been reached.
    ``warmup_steps`` and each milestone are step counts (int) or fractions of ``total_steps``
    (float in [0, 1)). The attributes are plain numbers, so ``LambdaLR.state_dict()`` stays
    loadable with ``torch.load(weights_only=True)``.
    """

    def __init__(
        self,
        schedule: str = "none",
        total_steps: int | None = None,
        warmup_steps: int | float = 0,
        milestones: Sequence[int | float] = (0.3, 0.6, 0.9),
        gamma: float = 0.1,
        min_lr_ratio: float = 0.0,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not supported; choose one of {SCHEDULES}")
        if total_steps is not None and not (_is_int(total_steps) and total_steps >= 1):
            raise ValueError(f"total_steps={total_steps!r} must be an integer >= 1")
        if schedule != "none" and total_steps is None:
            raise ValueError(f"schedule={schedule!r} needs total_steps (or a Trainer with a finite length)")
        if not (_is_number(gamma) and 0.0 < gamma <= 1.0):
            raise ValueError(f"gamma={gamma!r} must be a number in (0, 1]")
        if not (_is_number(min_lr_ratio) and 0.0 <= min_lr_ratio <= 1.0):
            raise ValueError(f"min_lr_ratio={min_lr_ratio!r} must be a number in [0, 1]")
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
            raise ValueError(f"milestones={milestones!r} must be a list of steps (int) or fractions (float in (0, 1))")
        steps = [_steps("milestones", m, total_steps) for m in milestones] if schedule == "step" else []
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"milestones={list(milestones)!r} must be strictly increasing")
        self.schedule = schedule
        self.total_steps = total_steps
        self.warmup_steps = _steps("warmup_steps", warmup_steps, total_steps)
        self.milestones = tuple(steps)
        self.gamma = float(gamma)
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.schedule == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        return 1.0

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _warn(message: str) -> None:
    """Warn from rank 0 only when Lightning is loaded (one message per run, not per process)."""
    if "lightning.fabric" in sys.modules:
        from lightning.fabric.utilities.rank_zero import rank_zero_warn

        rank_zero_warn(message, category=UserWarning)
    else:
        warnings.warn(message, UserWarning, stacklevel=3)


class ScheduleLR(LambdaLR):
    """``LambdaLR`` over :class:`LRSchedule` whose schedule comes from the code, not the checkpoint.

    ``LambdaLR.load_state_dict`` would put the saved schedule's attributes (its
    ``total_steps``, warm-up and milestones) back in place. A run resumed with a longer
    ``max_epochs`` / ``max_steps`` or on another number of devices would then keep the old
    length, and a cosine schedule would run its extra steps at ``min_lr_ratio``. Here the
    schedule built for the current run is kept, the step count is restored, and the learning
    rates are set to the new schedule's value at that step (with a warning saying what changed).
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        current = [dict(vars(fn)) if isinstance(fn, LRSchedule) else None for fn in self.lr_lambdas]
        super().load_state_dict(state_dict)
        changed = []
        for fn, mine in zip(self.lr_lambdas, current):
            if mine is None:
                continue
            saved = dict(vars(fn))
            fn.__dict__.clear()
            fn.__dict__.update(mine)
            if saved != mine:
                changed.append((saved, mine))
        if not changed:
            return
        for group, base_lr, fn in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas):
            group["lr"] = base_lr * fn(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        saved, mine = changed[0]
        diff = ", ".join(f"{k} {saved.get(k)!r} -> {v!r}" for k, v in mine.items() if saved.get(k) != v)
        _warn(
            f"Resumed learning-rate schedule changed ({diff}): it now follows this run's length and "
            f"continues from optimizer step {self.last_epoch} (lr {self._last_lr[0]:.4g})"
        )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, **schedule_args: Any) -> ScheduleLR:
    """A :class:`ScheduleLR` over :class:`LRSchedule` (same arguments); step it once per optimizer step."""
    return ScheduleLR(optimizer, LRSchedule(**schedule_args))


# -- the helper ----------------------------------------------------------------------------
_UNSET: Any = object()  # an argument the caller did not give


def _table_of(optimizer: str | type) -> SettingsTable:
    """The settings table of ``optimizer``: a class, or a class name in any case ("soap4bit")."""
    name = optimizer if isinstance(optimizer, str) else optimizer.__name__
    for key, table in OPTIMIZERS.items():
        if key.lower() == name.lower():
            return table
    raise ValueError(f"optimizer={optimizer!r} is not one of this package's optimizers: {list(OPTIMIZERS)}")


def _check_call(module: Any, table: SettingsTable, kwargs: Mapping[str, Any], who: str) -> None:
    """A module to optimize, arguments the optimizer has, a Trainer strategy it supports."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{who} expects the module to optimize (pass self), got {type(module).__name__}")
    unknown = sorted(set(kwargs) - set(table.names))
    if unknown:
        raise TypeError(f"{who} got unknown argument(s) {unknown}; {table.optimizer} accepts {list(table.names)}")
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        from .strategies import check_strategy  # Lightning is loaded once there is a Trainer

        check_strategy(trainer.strategy, who=who)


def _total_steps(module: nn.Module, total_steps: int | None) -> int | None:
    if total_steps is not None:
        return total_steps
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return None
    estimate = trainer.estimated_stepping_batches
    if not math.isfinite(estimate):
        raise ValueError(
            "the Trainer runs without a length (max_steps=-1, max_epochs=-1), so the schedule cannot know "
            "its total: pass total_steps= or set max_steps / max_epochs"
        )
    return int(estimate)


def _with_schedule(optimizer: torch.optim.Optimizer, module: nn.Module, schedule: str, warmup_steps: int | float,
                   total_steps: int | None, **shape: Any) -> dict[str, Any]:
    """``{"optimizer": ...}``, plus the per-step ``lr_scheduler`` entry when there is a schedule."""
    if schedule == "none" and warmup_steps == 0:
        return {"optimizer": optimizer}
    needs_total = schedule != "none" or not _is_int(warmup_steps)
    total = _total_steps(module, total_steps) if needs_total else total_steps
    scheduler = ScheduleLR(optimizer, LRSchedule(schedule=schedule, total_steps=total, warmup_steps=warmup_steps,
                                                 **shape))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def configure_optimizer(
    module: nn.Module,
    optimizer: str | type = "Shampoo4bit",
    *,
    schedule: str = "none",
    warmup_steps: int | float = 0,
    total_steps: int | None = None,
    milestones: Sequence[int | float] = (0.3, 0.6, 0.9),
    gamma: float = 0.1,
    min_lr_ratio: float = 0.0,
    no_weight_decay: Sequence[str] = (),
    no_precondition: Sequence[str] = (),
    precondition_embeddings: bool = False,
    max_precondition_dim: Any = _UNSET,
    **optimizer_kwargs: Any,
) -> dict[str, Any]:
    """:func:`configure_shampoo` for any of the package's optimizers (``optimizer``: its class or
    class name, e.g. ``"SOAP4bit"``); ``optimizer_kwargs`` are that optimizer's arguments.

    ``max_precondition_dim`` is the grouping rule's (:func:`shampoo_param_groups`), except for an
    optimizer that declares an argument of that name (SOAP4bit: its largest factor order), which
    gets it instead."""
    table = _table_of(optimizer)
    if "max_precondition_dim" in table.names:
        if max_precondition_dim is not _UNSET:
            optimizer_kwargs["max_precondition_dim"] = max_precondition_dim
        max_precondition_dim = None
    elif max_precondition_dim is _UNSET:
        max_precondition_dim = DEFAULT_MAX_PRECONDITION_DIM
    who = {"Shampoo4bit": "configure_shampoo", "SOAP4bit": "configure_soap"}.get(
        table.optimizer, f"configure_optimizer({table.optimizer!r})")
    _check_call(module, table, optimizer_kwargs, who)
    groups = shampoo_param_groups(
        module,
        no_weight_decay=no_weight_decay,
        no_precondition=no_precondition,
        precondition_embeddings=precondition_embeddings,
        max_precondition_dim=max_precondition_dim,
    )
    if PRECONDITION_KEY not in table.names:  # an optimizer without first-order-only groups
        if no_precondition:
            raise ValueError(f"no_precondition needs an optimizer with first-order-only groups; {table.optimizer} "
                             "preconditions every matrix")
        groups = _merge_by_weight_decay(groups)
    if schedule not in SCHEDULES:  # checked before the Trainer is asked for its length
        raise ValueError(f"schedule={schedule!r} is not supported; choose one of {SCHEDULES}")
    built = table.optimizer_class()(groups, **optimizer_kwargs)
    return _with_schedule(built, module, schedule, warmup_steps, total_steps, milestones=milestones, gamma=gamma,
                          min_lr_ratio=min_lr_ratio)


def configure_shampoo(
    module: nn.Module,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    schedule: str = "none",
    warmup_steps: int | float = 0,
    total_steps: int | None = None,
    milestones: Sequence[int | float] = (0.3, 0.6, 0.9),
    gamma: float = 0.1,
    min_lr_ratio: float = 0.0,
    no_weight_decay: Sequence[str] = (),
    no_precondition: Sequence[str] = (),
    precondition_embeddings: bool = False,
    max_precondition_dim: int | None = DEFAULT_MAX_PRECONDITION_DIM,
    **shampoo_kwargs: Any,
) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: Shampoo4bit on ``module`` plus an optional schedule.

    ``return configure_shampoo(self, lr=1e-3, weight_decay=0.05, schedule="cosine", warmup_steps=0.05)``

    Args:
        module: the LightningModule (or any ``nn.Module``) to optimize; parameter groups follow
            :func:`shampoo_param_groups`.
        lr: peak learning rate.
        weight_decay: weight decay of the decaying group (0 for biases, norms, embeddings).
        schedule: ``"none"``, ``"cosine"`` or ``"step"`` (see :class:`LRSchedule`), stepped
            every optimizer step.
        warmup_steps: linear warm-up length, in steps (int) or as a fraction of the total (float).
        total_steps: optimizer steps of the run; default ``trainer.estimated_stepping_batches``
            when the module is attached to a Trainer.
        milestones: ``"step"`` schedule: where the rate drops, as steps or fractions of the total.
        gamma: ``"step"`` schedule: factor applied at each milestone.
        min_lr_ratio: ``"cosine"`` schedule: final rate as a fraction of ``lr``.
        no_weight_decay: extra parameter names / glob patterns without weight decay.
        no_precondition: extra parameter names / glob patterns that get no Shampoo.
        precondition_embeddings: give embedding tables Shampoo too.
        max_precondition_dim: matrix views with a longer side get no Shampoo (None: no limit).
        shampoo_kwargs: any other :class:`Shampoo4bit` argument (``bits``, ``stat_interval``, ...).

    Returns:
        ``{"optimizer": Shampoo4bit}``, plus ``"lr_scheduler": {"scheduler": ScheduleLR,
        "interval": "step", "frequency": 1}`` when there is a schedule or a warm-up. The
        schedule is sized for the run being started: a run resumed from a checkpoint with
        another length follows the new length from the restored step (see :class:`ScheduleLR`).

    Raises:
        TypeError: an argument Shampoo4bit does not have.
        ValueError: a bad value (named), or a schedule without a known total length.
        UnsupportedStrategyError: the attached Trainer uses a strategy Shampoo4bit does not support.
    """
    return configure_optimizer(
        module, "Shampoo4bit", lr=lr, weight_decay=weight_decay, schedule=schedule, warmup_steps=warmup_steps,
        total_steps=total_steps, milestones=milestones, gamma=gamma, min_lr_ratio=min_lr_ratio,
        no_weight_decay=no_weight_decay, no_precondition=no_precondition,
        precondition_embeddings=precondition_embeddings, max_precondition_dim=max_precondition_dim, **shampoo_kwargs,
    )


def _merge_by_weight_decay(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups without the ``precondition`` key, those with the same weight decay merged."""
    merged: dict[Any, dict[str, Any]] = {}
    for group in groups:
        key = group.get("weight_decay")
        target = merged.setdefault(key, {k: v for k, v in group.items() if k not in ("params", PRECONDITION_KEY)}
                                   | {"params": []})
        target["params"] += list(group["params"])
    return list(merged.values())


def configure_soap(
    module: nn.Module,
    *,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    schedule: str = "none",
    warmup_steps: int | float = 0,
    total_steps: int | None = None,
    milestones: Sequence[int | float] = (0.3, 0.6, 0.9),
    gamma: float = 0.1,
    min_lr_ratio: float = 0.0,
    no_weight_decay: Sequence[str] = (),
    **soap_kwargs: Any,
) -> dict[str, Any]:
    """:func:`configure_shampoo` for :class:`~lightning_shampoo4.optim.soap.SOAP4bit`: the same
    weight-decay groups (no decay on biases, norms, embeddings and ``no_weight_decay`` names) and
    schedule; ``soap_kwargs`` are any other SOAP4bit argument (``bits``, ``precondition_frequency``, ...).

    ``return configure_soap(self, lr=3e-3, weight_decay=0.01, schedule="cosine", warmup_steps=0.05)``
    """
    return configure_optimizer(
        module, "SOAP4bit", lr=lr, weight_decay=weight_decay, schedule=schedule, warmup_steps=warmup_steps,
        total_steps=total_steps, milestones=milestones, gamma=gamma, min_lr_ratio=min_lr_ratio,
        no_weight_decay=no_weight_decay, **soap_kwargs,
    )
