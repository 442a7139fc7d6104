"""The recipe dataclasses: a complete, typed description of one training run.

A recipe is plain data. OmegaConf reads these classes as structured configs (so overrides are
type-checked when merged) and jsonargparse reads the same classes for the command line, so one
set of field names serves ``get_recipe(name, overrides=["optimizer.bits=32"])``,
``lightning-shampoo4 fit --optimizer.bits 32`` and the YAML files in ``recipes/``.

Choices are ``Literal`` types, which OmegaConf checks from version 2.4 on.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal, Optional, Union

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

VARIANTS = ("4bit", "32bit", "naive4bit", "8bit", "first_order")

# What each Shampoo variant means in Shampoo4bit's terms: (bits, quantize).
VARIANT_SETTINGS: dict[str, tuple[int, str]] = {
    "4bit": (4, "cholesky8"),
    "8bit": (8, "cholesky8"),
    "32bit": (32, "eigenvectors"),
    "naive4bit": (4, "preconditioner"),
}


class RecipeError(ValueError):
    """A recipe name, key or value is invalid; the message names it and suggests the closest valid ones."""


def suggest(word: str, choices: Any, n: int = 3) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` (empty string when none is close)."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=n, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


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
class OptimizerConfig:
    """The optimizer: a Shampoo variant grafted onto SGD or AdamW, or that base optimizer alone.

    Attributes:
        variant: 4bit (4-bit Shampoo, the optimizer's default storage), 8bit, 32bit (fp32 Shampoo), naive4bit
            (quantizes the preconditioners themselves), or first_order (plain torch SGD / AdamW).
        base: the first-order optimizer: sgd (with momentum) or adamw.
        lr: learning rate (peak, before the schedule).
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD.
        weight_decay: coupled L2 (sgd) or decoupled (adamw); biases, norms and embeddings get none.
        betas: AdamW moment coefficients.
        eps: AdamW denominator epsilon.
        bits: override the variant's bits (4, 8 or 32); null = from the variant.
        quantize: override what is quantized (eigenvectors, cholesky, cholesky8 or preconditioner); null = from the variant.
        moment_bits: storage of the base optimizer's moments (AdamW's two, SGD's momentum): 32
            (fp32), 8 or 4 (block-quantized codes; 4-bit Shampoo + 4-bit moments keeps less
            state than fp32 AdamW). Shampoo variants only.
        codebook: quantization codebook: linear2 (paper default), dynamic or linear.
        block_size: elements per quantization block (one fp32 scale each).
        min_quant_numel: factors with fewer elements stay fp32 (4096: order >= 64 is quantized).
        max_order: largest Kronecker factor order; bigger dimensions are split into blocks.
        shampoo_beta: EMA coefficient of the Kronecker statistics.
        matrix_eps: relative damping of the inverse roots (1e-4 is safer late in training).
        stat_interval: optimizer steps between statistics updates (T1).
        root_interval: optimizer steps between inverse-root updates (T2, a multiple of T1).
        bjorck_steps: Björck orthogonalization steps before statistics and root updates.
        root_method: eigen or schur_newton; null = the paper's choice for the variant.
        kernel_backend: auto (Triton on CUDA, torch elsewhere), triton or torch.
        precondition_dtype: dtype of the per-step preconditioning matmuls.
        start_preconditioning_step: run as the base optimizer until this step.
    """

    variant: Literal["4bit", "32bit", "naive4bit", "8bit", "first_order"] = "4bit"
    base: Literal["sgd", "adamw"] = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    bits: Optional[Literal[4, 8, 32]] = None
    quantize: Optional[Literal["eigenvectors", "preconditioner", "cholesky", "cholesky8"]] = None
    moment_bits: Literal[4, 8, 32] = 32
    codebook: Literal["linear2", "dynamic", "linear"] = "linear2"
    block_size: int = 64
    min_quant_numel: int = 4096
    max_order: int = 1200
    shampoo_beta: float = 0.95
    matrix_eps: float = 1e-6
    stat_interval: int = 100
    root_interval: int = 500
    bjorck_steps: tuple[int, int] = (1, 4)
    root_method: Optional[Literal["eigen", "schur_newton"]] = None
    kernel_backend: Literal["auto", "triton", "torch"] = "auto"
    precondition_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    start_preconditioning_step: int = 0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML and hparams give lists
        self.bjorck_steps = tuple(self.bjorck_steps)
        if self.variant not in VARIANTS:
            raise RecipeError(f"optimizer.variant must be one of {VARIANTS}, got {self.variant!r}.{suggest(self.variant, VARIANTS)}")
        if not self.lr > 0:
            raise RecipeError(f"optimizer.lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise RecipeError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.variant == "first_order":
            for key in ("bits", "quantize"):
                if getattr(self, key) is not None:
                    raise RecipeError(
                        f"optimizer.{key}={getattr(self, key)!r} has no effect with variant='first_order'; "
                        "pick a Shampoo variant (4bit, 8bit, 32bit, naive4bit) or leave it null"
                    )
            if self.moment_bits != 32:
                raise RecipeError(
                    f"optimizer.moment_bits={self.moment_bits!r} needs a Shampoo variant (4bit, 8bit, 32bit, naive4bit): "
                    "variant='first_order' is plain torch SGD / AdamW with fp32 moments"
                )
        elif self.stat_interval < 1 or self.root_interval < 1 or self.root_interval % self.stat_interval:
            raise RecipeError(
                "optimizer.root_interval must be a positive multiple of optimizer.stat_interval, got "
                f"stat_interval={self.stat_interval}, root_interval={self.root_interval}"
            )

    @property
    def is_shampoo(self) -> bool:
        return self.variant != "first_order"

    def shampoo_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Shampoo4bit`` for this config (the variant resolved into bits/quantize)."""
        if not self.is_shampoo:
            raise RecipeError("optimizer.variant='first_order' has no Shampoo settings")
        bits, quantize = VARIANT_SETTINGS[self.variant]
        kwargs = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("variant", "bits", "quantize")}
        kwargs["bits"] = self.bits if self.bits is not None else bits
        kwargs["quantize"] = self.quantize if self.quantize is not None else quantize
        return kwargs

    def describe(self) -> str:
        """Short human name, e.g. ``4-bit Shampoo + SGDM`` (the default storage), ``4-bit eigenvector
        Shampoo + 4-bit AdamW`` (the paper's method) or ``AdamW``."""
        base = "AdamW" if self.base == "adamw" else ("SGDM" if self.momentum else "SGD")
        if not self.is_shampoo:
            return base
        kw = self.shampoo_kwargs()
        kind = f"{kw['bits']}-bit"
        if kw["bits"] < 32 and kw["quantize"] == "preconditioner":
            kind = f"naive {kind}"
        elif kw["bits"] < 32 and kw["quantize"] == "cholesky":
            kind = f"{kind} Cholesky"
        elif kw["bits"] < 32 and kw["quantize"] == "eigenvectors":
            kind = f"{kind} eigenvector"
        if kw["moment_bits"] != 32:
            base = f"{kw['moment_bits']}-bit {base}"
        return f"{kind} Shampoo + {base}"


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
        from ..module import ImageClassifier

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
