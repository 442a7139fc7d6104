"""Recipes: named, typed training setups pairing a model and data with the optimizer.

>>> from lightning_shampoo4.recipes import get_recipe, list_recipes
>>> recipe = get_recipe("resnet34_cifar100", overrides=["optimizer.variant=32bit"])
>>> dm = recipe.build_datamodule(); module = recipe.build_module(dm); trainer = recipe.build_trainer()

Importing this package registers the CIFAR recipes of the paper and the small digits recipes.
"""

from . import cifar, digits  # noqa: F401  (registration)
from ._registry import DEFAULT_RECIPE, apply_overrides, get_recipe, list_recipes, register_recipe, valid_keys
from .config import (
    VARIANTS,
    CallbackConfig,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    Recipe,
    RecipeError,
    ScheduleConfig,
    TrainerConfig,
)

__all__ = [
    "DEFAULT_RECIPE",
    "VARIANTS",
    "CallbackConfig",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "Recipe",
    "RecipeError",
    "ScheduleConfig",
    "TrainerConfig",
    "apply_overrides",
    "get_recipe",
    "list_recipes",
    "register_recipe",
    "valid_keys",
]
