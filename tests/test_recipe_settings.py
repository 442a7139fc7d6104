"""Recipes build the optimizer they declare: every recipe's storage settings are the optimizer's
own defaults, and every constructor argument reaches the optimizer's param groups through a
recipe override and through the ``lightning-shampoo4`` command line."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch import nn

from lightning_shampoo4.cli import ShampooCLI
from lightning_shampoo4.optim import Shampoo4bit
from lightning_shampoo4.optim.settings import OPTIMIZERS
from lightning_shampoo4.optimizers import VARIANT_TABLES, build_optimizer, implied
from lightning_shampoo4.recipes import get_recipe, list_recipes

# a non-default value of every Shampoo4bit argument: (override text, value in the group / attribute)
SHAMPOO_VALUES = {
    "lr": ("0.02", 0.02),
    "betas": ("[0.8,0.95]", (0.8, 0.95)),
    "eps": ("1e-07", 1e-7),
    "weight_decay": ("0.01", 0.01),
    "momentum": ("0.8", 0.8),
    "nesterov": ("true", True),
    "base": ("sgd", "sgd"),
    "bits": ("8", 8),
    "moment_bits": ("8", 8),
    "storage": ("eigenvectors", "eigenvectors"),
    "statistic_bits": ("8", 8),
    "error_feedback": ("false", False),
    "codebook": ("dynamic", "dynamic"),
    "block_size": ("32", 32),
    "root_block_size": ("128", 128),
    "scale_dtype": ("float16", "float16"),
    "min_quant_numel": ("16", 16),
    "max_order": ("64", 64),
    "shampoo_beta": ("0.9", 0.9),
    "matrix_eps": ("1e-05", 1e-5),
    "stat_interval": ("2", 2),
    "root_interval": ("4", 4),
    "bjorck_steps": ("[2,3]", (2, 3)),
    "root_method": ("schur_newton", "schur_newton"),
    "kernel_backend": ("torch", "torch"),
    "precondition_dtype": ("bfloat16", "bfloat16"),
    "start_preconditioning_step": ("1", 1),
    "precondition": ("false", False),
    "distributed": ("off", "off"),
    "distributed_dtype": ("bfloat16", "bfloat16"),
}
SOAP_VALUES = {
    "lr": ("0.02", 0.02),
    "betas": ("[0.8,0.9]", (0.8, 0.9)),
    "eps": ("1e-07", 1e-7),
    "weight_decay": ("0.01", 0.01),
    "shampoo_beta": ("0.9", 0.9),
    "precondition_frequency": ("5", 5),
    "max_precondition_dim": ("64", 64),
    "large_dims": ("unrotated", "unrotated"),
    "bits": ("8", 8),
    "moment_bits": ("4", 4),
    "statistics": ("cholesky8", "cholesky8"),
    "second_moment": ("full", "full"),
    "first_moment_basis": ("rotated", "rotated"),
    "bjorck_steps": ("2", 2),
    "codebook": ("dynamic", "dynamic"),
    "block_size": ("32", 32),
    "scale_dtype": ("float16", "float16"),
    "min_quant_numel": ("16", 16),
    "kernel_backend": ("torch", "torch"),
    "distributed": ("off", "off"),
    "distributed_dtype": ("bfloat16", "bfloat16"),
}
VALUES = {"Shampoo4bit": SHAMPOO_VALUES, "SOAP4bit": SOAP_VALUES}
VARIANT_OF = {"Shampoo4bit": "4bit", "SOAP4bit": "soap4bit"}


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(70, 80), nn.Tanh(), nn.Linear(80, 10))


def _found(opt: torch.optim.Optimizer, name: str):
    table = type(opt).SETTINGS
    if not table[name].per_group:
        return getattr(opt, name)
    groups = opt.param_groups
    if name == "weight_decay":  # biases and norms keep none: the decaying group has the recipe's
        groups = [g for g in groups if g["weight_decay"] != 0.0]
    values = {repr(g[name]) for g in groups}
    assert len(values) == 1, (name, values)
    return groups[0][name]


def _preconditioned(opt):
    return next(g for g in opt.param_groups if g.get("precondition", True))


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_builds_the_optimizers_own_storage_settings(name):
    recipe = get_recipe(name)
    opt = build_optimizer(_model(), recipe.optimizer)
    table = type(opt).SETTINGS
    reference = type(opt)([nn.Parameter(torch.zeros(80, 70))])
    built, own = _preconditioned(opt), reference.param_groups[0]
    for key in table.format_keys:
        if key not in ("base", "precondition"):  # the base optimizer is the recipe's choice
            assert built[key] == own[key], (name, key)


def test_every_variant_builds_what_it_says():
    for variant, table in VARIANT_TABLES.items():
        opt = build_optimizer(_model(), get_recipe("digits_mlp", overrides=[f"optimizer.variant={variant}"]).optimizer)
        assert type(opt).SETTINGS is table
        group = _preconditioned(opt)
        for key, value in implied(table)[variant].items():
            assert group[key] == value, (variant, key)


def _all_values(optimizer: str) -> dict:
    table = OPTIMIZERS[optimizer]
    values = VALUES[optimizer]
    declared = {s.name for s in table.settings if s.deprecated is None}
    assert set(values) == declared, "a constructor argument is missing from this test"
    return values


@pytest.mark.parametrize("optimizer", list(VALUES))
def test_every_argument_through_a_recipe_override(optimizer):
    values = _all_values(optimizer)
    overrides = [f"optimizer.variant={VARIANT_OF[optimizer]}"] + [f"optimizer.{k}={v}" for k, (v, _) in values.items()]
    opt = build_optimizer(_model(), get_recipe("digits_mlp", overrides=overrides).optimizer)
    for key, (_, value) in values.items():
        assert _found(opt, key) == value, key


@pytest.mark.parametrize("optimizer", list(VALUES))
def test_every_argument_through_the_command_line(optimizer, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-shampoo4"])
    values = _all_values(optimizer)
    args = ["--recipe", "digits_mlp", "--optimizer.variant", VARIANT_OF[optimizer], "--schedule.name", "none",
            "--schedule.warmup_epochs", "0", "--trainer.logger", "false"]
    for key, (text, _) in values.items():
        args += [f"--optimizer.{key}", text]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = ShampooCLI(args=args, run=False)
    opt = cli.model.configure_optimizers()["optimizer"]
    for key, (_, value) in values.items():
        assert _found(opt, key) == value, key


def test_the_default_command_runs_the_optimizers_defaults(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-shampoo4"])
    cli = ShampooCLI(args=["--schedule.name", "none", "--schedule.warmup_epochs", "0", "--trainer.logger", "false"],
                     run=False)
    opt = cli.model.configure_optimizers()["optimizer"]
    own = Shampoo4bit([nn.Parameter(torch.zeros(80, 70))]).param_groups[0]
    group = _preconditioned(opt)
    for key in Shampoo4bit.SETTINGS.format_keys:
        if key not in ("base", "precondition"):
            assert group[key] == own[key], key
