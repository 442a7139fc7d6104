"""The recipe dataclasses: a complete, typed description of one training run.

A recipe is plain data. OmegaConf reads these classes as structured configs (so overrides are
type-checked when merged) and jsonargparse reads the same classes for the command line, so one
set of field names serves ``get_recipe(name, overrides=["optimizer.bits=32"])``,
``lightning-shampoo4 fit --optimizer.bits 32`` and the YAML files in ``recipes/``. The optimizer
and schedule sections live in :mod:`lightning_shampoo4.optimizers` (the optimizer's is derived
from the optimizers' settings tables); the building methods import the LightningModule only when
called, and it never imports this package.

Choices are ``Literal`` types, which OmegaConf checks from version 2.4 on.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from ..optimizers import (
    VARIANTS,
    OptimizerConfig,
    RecipeError,
    ScheduleConfig,
    coerce_config,
    suggest,
    to_primitive,
)

__all__ = [
    "VARIANTS",
    "CallbackConfig",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "Recipe",
    "RecipeError",
    "ScheduleConfig",
    "TrainerConfig",
    "callback_class_path",
    "coerce_config",
    "datamodule_class_path",
    "resolve_callback",
    "resolve_datamodule",
    "to_primitive",
]

@dataclass
class ModelConfig:
    """The network (built by ``lightning_shampoo4.models.create_model``) and its loss.

    Attributes:
        arch: registered model name, see ``lightning_shampoo4.models.list_models()`` (e.g. resnet34).
        width: channel / embedding width multiplier; 1.0 is the standard size.
        arch_kwargs: extra keyword arguments of the model builder, e.g. {drop_path_rate: 0.1}.
        label_smoothing: label smoothing of the cross-entropy loss (0 = none).
    """

    arch: str = "small_cnn"
    width: float = 1.0
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise RecipeError(f"model.width must be > 0, got {self.width!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise RecipeError(f"model.label_smoothing must be in [0, 1), got {self.label_smoothing!r}")


@dataclass
class DataConfig:
    """The data module.

    Attributes:
        name: short name from ``lightning_shampoo4.data.DATAMODULES`` (digits, synthetic, cifar10,
            cifar100) or the import path of any LightningDataModule class.
        kwargs: its constructor arguments (batch_size, data_dir, ...).
    """

    name: str = "digits"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    """The Lightning Trainer arguments a recipe fixes (any other Trainer argument keeps its default).

    Attributes:
        max_epochs: training epochs.
        accelerator: auto, cpu, gpu, ...
        devices: auto, a count, or a list given as a string.
        precision: 32-true, bf16-mixed, 16-mixed, ...
        gradient_clip_val: clip gradients to this norm; null = no clipping.
        accumulate_grad_batches: batches per optimizer step.
        log_every_n_steps: logging interval in training steps.
    """

    max_epochs: int = 30
    accelerator: str = "auto"
    devices: Union[int, str] = "auto"
    precision: str = "32-true"
    gradient_clip_val: Optional[float] = None
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 50


@dataclass
class CallbackConfig:
    """A callback by name: a class of ``lightning_shampoo4.callbacks``, of ``lightning.pytorch.callbacks``,
    or an import path.

    Attributes:
        name: class name or import path.
        kwargs: its constructor arguments.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """One complete training setup: model, data, optimizer, schedule, trainer and callbacks.

    Attributes:
        name: the registry name.
        description: one line for tables and YAML headers.
        model: the network and loss.
        data: the data module.
        optimizer: the optimizer.
        schedule: the learning-rate schedule.
        trainer: Trainer settings.
        callbacks: extra callbacks, by name.
        seed: the ``seed_everything`` value; the command line applies it, in Python call
            ``lightning.seed_everything(recipe.seed)`` before building.
        reference: the paper's test accuracy (%) per optimizer variant, where reported (metadata).
    """

    name: str = "custom"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: list[CallbackConfig] = field(default_factory=list)
    seed: int = 0
    reference: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, not tuples): what YAML, hparams and OmegaConf all accept."""
        return to_primitive(self)

    # -- building the run (Lightning imports stay lazy so the dataclasses load fast) -----------
    def build_datamodule(self) -> Any:
        """Instantiate the data module."""
        return resolve_datamodule(self.data.name)(**self.data.kwargs)

    def build_module(self, datamodule: Any = None) -> Any:
        """The :class:`~lightning_shampoo4.module.ImageClassifier`, shaped for ``datamodule``'s images."""
        from ..module import ImageClassifier  # the module never imports the recipes: no circle

        datamodule = self.build_datamodule() if datamodule is None else datamodule
        channels, _, size = datamodule.image_shape
        return ImageClassifier(
            **asdict(self.model),
            num_classes=datamodule.num_classes,
            in_chans=channels,
            img_size=size,
            optimizer=self.optimizer,
            schedule=self.schedule,
        )

    def build_callbacks(self) -> list[Any]:
        """Instantiate ``callbacks`` (package callbacks are imported only here)."""
        return [resolve_callback(c.name)(**c.kwargs) for c in self.callbacks]

    def build_trainer(self, **overrides: Any) -> Any:
        """A ``lightning.Trainer`` with the recipe's settings and callbacks; ``overrides`` win
        (``callbacks=[...]`` is appended to the recipe's)."""
        import lightning.pytorch as pl

        kwargs = asdict(self.trainer)
        kwargs["callbacks"] = self.build_callbacks() + list(overrides.pop("callbacks", None) or [])
        kwargs.update(overrides)
        return pl.Trainer(**kwargs)


# -- what the names in a recipe refer to ---------------------------------------------------------
PACKAGE_CALLBACKS = "lightning_shampoo4.callbacks"
LIGHTNING_CALLBACKS = "lightning.pytorch.callbacks"


def import_object(path: str) -> Any:
    """The object at ``package.module.Name``; RecipeError if it cannot be imported."""
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise RecipeError(f"cannot import {path!r}: {err}") from err


def datamodule_class_path(name: str) -> str:
    """Import path of the data module named ``name`` (a ``DATAMODULES`` key, or already a path)."""
    if "." in name:
        return name
    from ..data import DATAMODULES

    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in DATAMODULES:
        raise RecipeError(
            f"unknown data name {name!r}.{suggest(key, DATAMODULES)} Valid names: {', '.join(sorted(DATAMODULES))}, "
            "or the import path of a LightningDataModule"
        )
    return f"lightning_shampoo4.data.{DATAMODULES[key].__name__}"


def resolve_datamodule(name: str) -> type:
    """The data module class named ``name``."""
    return import_object(datamodule_class_path(name))


def _callback_names(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # the package's callbacks are optional at this level
        return []
    return [n for n in getattr(module, "__all__", dir(module)) if not n.startswith("_")]


def callback_class_path(name: str) -> str:
    """Import path of the callback named ``name``: this package's callbacks first, then Lightning's."""
    if "." in name:
        return name
    for module_name in (PACKAGE_CALLBACKS, LIGHTNING_CALLBACKS):
        if name in _callback_names(module_name):
            return f"{module_name}.{name}"
    known = _callback_names(PACKAGE_CALLBACKS) + _callback_names(LIGHTNING_CALLBACKS)
    raise RecipeError(
        f"unknown callback {name!r}.{suggest(name, known)} Use a class of {PACKAGE_CALLBACKS}, "
        f"of {LIGHTNING_CALLBACKS}, or an import path"
    )


def resolve_callback(name: str) -> type:
    """The callback class named ``name`` (imported lazily)."""
    return import_object(callback_class_path(name))
