"""Build a recipe's optimizer and learning-rate schedule as Lightning's ``configure_optimizers`` dict.

Shampoo variants go through :func:`lightning_shampoo4.configure.configure_shampoo`; the
first-order baselines (plain ``torch.optim.SGD`` / ``AdamW``) get the same parameter groups
(:func:`~lightning_shampoo4.configure.shampoo_param_groups`: no weight decay on biases, norms,
embeddings) and the same per-step schedule, so comparisons differ only in the optimizer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..configure import PRECONDITION_KEY, build_lr_scheduler, configure_shampoo, shampoo_param_groups
from .config import OptimizerConfig, RecipeError, ScheduleConfig

__all__ = ["build_optimizer", "configure_optimizers", "first_order_param_groups", "milestone_steps", "training_steps"]


def first_order_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """``shampoo_param_groups(model)`` without the Shampoo-only keys (weight-decay split only)."""
    drop = (PRECONDITION_KEY, "start_preconditioning_step")
    return [{k: v for k, v in g.items() if k not in drop} for g in shampoo_param_groups(model)]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over ``model``'s parameters, without a schedule."""
    if cfg.is_shampoo:
        return configure_shampoo(model, **cfg.shampoo_kwargs())["optimizer"]
    groups = first_order_param_groups(model)
    if cfg.base == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


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


def configure_optimizers(module: Any, cfg: OptimizerConfig, schedule: ScheduleConfig) -> dict[str, Any]:
    """Lightning's optimizer dict for ``module`` (a LightningModule attached to a Trainer).

    The schedule is stepped every optimizer step and sized from the Trainer, so overriding
    ``trainer.max_epochs`` or ``max_steps`` stretches or shrinks it.
    """
    has_schedule = schedule.name != "none" or schedule.warmup_epochs > 0
    if not has_schedule:
        if cfg.is_shampoo:
            return configure_shampoo(module, **cfg.shampoo_kwargs())
        return {"optimizer": build_optimizer(module, cfg)}
    if getattr(module, "_trainer", None) is None:
        raise RecipeError("a learning-rate schedule needs the module to be attached to a Trainer")
    total, warmup = training_steps(module.trainer, schedule.warmup_epochs)
    if not math.isfinite(total):
        raise RecipeError(f"schedule {schedule.name!r} needs a finite run: set trainer.max_epochs or max_steps")
    steps = dict(
        schedule=schedule.name,
        warmup_steps=warmup,
        milestones=milestone_steps(schedule.milestones, int(total)),
        gamma=schedule.gamma,
        min_lr_ratio=schedule.min_lr_ratio,
    )
    if cfg.is_shampoo:
        return configure_shampoo(module, total_steps=int(total), **steps, **cfg.shampoo_kwargs())
    optimizer = build_optimizer(module, cfg)
    scheduler = build_lr_scheduler(optimizer, total_steps=int(total), **steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
