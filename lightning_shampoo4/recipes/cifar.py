"""The paper's CIFAR recipes (Wang et al. 2024, "4-bit Shampoo for Memory-Efficient Network
Training", section 5), for CIFAR-100 and CIFAR-10.

* ResNet-34 / VGG-19-BN: SGD with momentum 0.9, lr 0.1, weight decay 5e-4, batch 128, 200 epochs,
  5-epoch warm-up then step decay x0.1 at 30 / 60 / 90 % of training, random crop + flip.
* ViT-Small (patch 4) / Swin-Tiny (patch 2, window 4): AdamW lr 1e-3, betas (0.9, 0.999),
  weight decay 0.05, batch 128, 100 epochs, cosine, drop path 0.1.
* Shampoo everywhere: beta 0.95, eps 1e-6, T1 / T2 = 100 / 500, max order 1200. The storage
  settings are the optimizer's own defaults (the paper's block 64 and Linear-2 map belong to its
  eigenvector storage: ``optimizer.storage=eigenvectors`` selects them, see docs/algorithms.md).

Every recipe defaults to 4-bit Shampoo; ``optimizer.variant`` selects first_order, 32bit,
naive4bit or 8bit. CIFAR is read from ``data.kwargs.data_dir`` (never downloaded).
"""

from __future__ import annotations

from ._registry import register_recipe
from .config import CallbackConfig, DataConfig, ModelConfig, OptimizerConfig, Recipe, ScheduleConfig, TrainerConfig

__all__: list[str] = []

# Paper Table 2, CIFAR-100 test accuracy (%): base optimizer, + 32-bit Shampoo, + 4-bit Shampoo;
# naive 4-bit from the Swin-Tiny ablation.
PAPER_CIFAR100 = {
    "resnet34": {"first_order": 78.98, "32bit": 79.71, "4bit": 79.17},
    "vit_small": {"first_order": 74.34, "32bit": 77.50, "4bit": 77.22},
    "swin_tiny": {"first_order": 76.69, "32bit": 79.34, "4bit": 78.63, "naive4bit": 76.95},
}

_SHAMPOO = dict(
    variant="4bit",
    shampoo_beta=0.95,
    matrix_eps=1e-6,
    stat_interval=100,
    root_interval=500,
    max_order=1200,
)

_DATASETS = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10"}


def _data(dataset: str) -> DataConfig:
    return DataConfig(name=dataset, kwargs={"data_dir": "data", "batch_size": 128, "num_workers": 0, "augment": True})


def _convnet(arch: str, dataset: str, label: str) -> Recipe:
    """SGDM recipe for ResNet / VGG."""
    return Recipe(
        description=f"{label} on {_DATASETS[dataset]}, SGDM lr 0.1, 200 epochs, step decay (paper)",
        model=ModelConfig(arch=arch),
        data=_data(dataset),
        optimizer=OptimizerConfig(base="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, **_SHAMPOO),
        schedule=ScheduleConfig(name="step", warmup_epochs=5, milestones=[0.3, 0.6, 0.9], gamma=0.1),
        trainer=TrainerConfig(max_epochs=200),
        callbacks=[CallbackConfig("LearningRateMonitor", {"logging_interval": "step"})],
        reference=dict(PAPER_CIFAR100.get(arch, {})) if dataset == "cifar100" else {},
    )


def _transformer(arch: str, dataset: str, label: str) -> Recipe:
    """AdamW recipe for ViT / Swin."""
    return Recipe(
        description=f"{label} on {_DATASETS[dataset]}, AdamW lr 1e-3, 100 epochs, cosine (paper)",
        model=ModelConfig(arch=arch, arch_kwargs={"drop_path_rate": 0.1}),
        data=_data(dataset),
        optimizer=OptimizerConfig(base="adamw", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05, **_SHAMPOO),
        schedule=ScheduleConfig(name="cosine"),
        trainer=TrainerConfig(max_epochs=100),
        callbacks=[CallbackConfig("LearningRateMonitor", {"logging_interval": "step"})],
        reference=dict(PAPER_CIFAR100.get(arch, {})) if dataset == "cifar100" else {},
    )


@register_recipe
def resnet34_cifar100() -> Recipe:
    return _convnet("resnet34", "cifar100", "ResNet-34")


@register_recipe
def vgg19_cifar100() -> Recipe:
    return _convnet("vgg19_bn", "cifar100", "VGG-19-BN")


@register_recipe
def vit_small_cifar100() -> Recipe:
    return _transformer("vit_small", "cifar100", "ViT-Small/4")


@register_recipe
def swin_tiny_cifar100() -> Recipe:
    return _transformer("swin_tiny", "cifar100", "Swin-Tiny")


@register_recipe
def resnet34_cifar10() -> Recipe:
    return _convnet("resnet34", "cifar10", "ResNet-34")


@register_recipe
def vgg19_cifar10() -> Recipe:
    return _convnet("vgg19_bn", "cifar10", "VGG-19-BN")


@register_recipe
def vit_small_cifar10() -> Recipe:
    return _transformer("vit_small", "cifar10", "ViT-Small/4")


@register_recipe
def swin_tiny_cifar10() -> Recipe:
    return _transformer("swin_tiny", "cifar10", "Swin-Tiny")
