"""``ImageClassifier``: the LightningModule every recipe trains.

It wraps a model from ``lightning_shampoo4.models`` with a cross-entropy loss and accuracy, and
builds its optimizer from a recipe's :class:`OptimizerConfig` and :class:`ScheduleConfig`.
Logged keys: ``train/loss``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from .models import create_model
from .optimizers import OptimizerConfig, ScheduleConfig, coerce_config, configure_optimizers, to_primitive

__all__ = ["ImageClassifier"]


class ImageClassifier(pl.LightningModule):
    """Image classification with any registered model and any recipe optimizer.

    Args:
        arch: registered model name (``lightning_shampoo4.models.list_models()``).
        width: width multiplier of the model.
        arch_kwargs: extra model-builder arguments, e.g. ``{"drop_path_rate": 0.1}``.
        label_smoothing: label smoothing of the cross-entropy loss.
        num_classes: number of classes (the CLI links it from the data module).
        in_chans: input channels (linked from the data module).
        img_size: input height = width (linked from the data module).
        optimizer: optimizer settings (an :class:`OptimizerConfig` or its dict); None = defaults.
        schedule: learning-rate schedule (a :class:`ScheduleConfig` or its dict); None = constant.
    """

    def __init__(
        self,
        arch: str = "small_cnn",
        width: float = 1.0,
        arch_kwargs: Optional[dict[str, Any]] = None,
        label_smoothing: float = 0.0,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 8,
        optimizer: Optional[OptimizerConfig] = None,
        schedule: Optional[ScheduleConfig] = None,
    ) -> None:
        super().__init__()
        self.optimizer_config: OptimizerConfig = coerce_config(OptimizerConfig, optimizer)
        self.schedule_config: ScheduleConfig = coerce_config(ScheduleConfig, schedule)
        arch_kwargs = dict(arch_kwargs or {})
        # Plain dicts and lists only, so checkpoints load with weights_only=True and hparams.yaml stays readable.
        self.save_hyperparameters(
            {
                "arch": arch,
                "width": width,
                "arch_kwargs": to_primitive(arch_kwargs),
                "label_smoothing": label_smoothing,
                "num_classes": num_classes,
                "in_chans": in_chans,
                "img_size": img_size,
                "optimizer": to_primitive(self.optimizer_config),
                "schedule": to_primitive(self.schedule_config),
            }
        )
        self.net = create_model(arch, num_classes=num_classes, in_chans=in_chans, img_size=img_size, width=width, **arch_kwargs)
        self.label_smoothing = label_smoothing
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits, y

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits, y = self._loss(batch)
        self.val_acc(logits, y)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits, y = self._loss(batch)
        self.test_acc(logits, y)
        self.log("test/loss", loss)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_optimizers(self, self.optimizer_config, self.schedule_config)
