"""Small recipes on scikit-learn's embedded digits: real data, no download, minutes on a CPU.

``digits_cnn`` is the package's default recipe (``lightning-shampoo4 fit`` with no arguments).
Statistics and roots are refreshed every 20 / 100 steps (10 / 50 for the MLP), not the paper's
100 / 500, which suit runs of tens of thousands of steps; these runs take a few hundred.
Every model here has Kronecker factors of order >= 64, so the 4-bit state is really used
(smaller factors stay fp32).
"""

from __future__ import annotations

from ._registry import register_recipe
from .config import DataConfig, ModelConfig, OptimizerConfig, Recipe, ScheduleConfig, TrainerConfig

__all__: list[str] = []


def _shampoo(lr: float, weight_decay: float, stat_interval: int, root_interval: int) -> OptimizerConfig:
    return OptimizerConfig(
        variant="4bit",
        base="adamw",
        lr=lr,
        weight_decay=weight_decay,
        stat_interval=stat_interval,
        root_interval=root_interval,
    )


@register_recipe
def digits_cnn() -> Recipe:
    return Recipe(
        description="small CNN on 8x8 digits, 4-bit Shampoo + AdamW; the default, 1-2 min on 2 CPU cores",
        model=ModelConfig(arch="small_cnn"),
        data=DataConfig(name="digits", kwargs={"batch_size": 64, "augment": True}),
        optimizer=_shampoo(lr=2e-3, weight_decay=0.05, stat_interval=20, root_interval=100),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=1),
        trainer=TrainerConfig(max_epochs=20, log_every_n_steps=10),
    )


@register_recipe
def digits_mlp() -> Recipe:
    return Recipe(
        description="2-layer MLP on 8x8 digits, 4-bit Shampoo + AdamW; under a minute on a CPU",
        model=ModelConfig(arch="mlp"),
        data=DataConfig(name="digits", kwargs={"batch_size": 64}),
        optimizer=_shampoo(lr=1e-3, weight_decay=0.05, stat_interval=10, root_interval=50),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=1),
        trainer=TrainerConfig(max_epochs=20, log_every_n_steps=10),
    )


@register_recipe
def digits_resnet18() -> Recipe:
    return Recipe(
        description="ResNet-18 (width 0.125) on 16x16 RGB digits, 4-bit Shampoo + SGDM; a few minutes on a CPU",
        model=ModelConfig(arch="resnet18", width=0.125),
        data=DataConfig(name="digits", kwargs={"batch_size": 64, "image_size": 16, "channels": 3, "augment": True}),
        optimizer=OptimizerConfig(
            variant="4bit", base="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, stat_interval=20, root_interval=100
        ),
        schedule=ScheduleConfig(name="step", warmup_epochs=1, milestones=[0.5, 0.75]),
        trainer=TrainerConfig(max_epochs=10, log_every_n_steps=10),
    )
