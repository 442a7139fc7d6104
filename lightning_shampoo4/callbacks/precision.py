"""``ShampooPrecision``: set Shampoo4bit up for the Trainer's precision."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from ..optim.settings import SHAMPOO_SETTINGS
from ._common import ShampooCallback

__all__ = ["PRECONDITION_DTYPES", "ShampooPrecision", "default_precondition_dtype"]

# the optimizer's declaration of the setting (one Literal type, one tuple of choices)
PreconditionDtype = SHAMPOO_SETTINGS["precondition_dtype"].annotation
PRECONDITION_DTYPES = SHAMPOO_SETTINGS["precondition_dtype"].choices


def default_precondition_dtype(precision: str) -> str:
    """bf16 matmuls under bf16 precisions, fp32 otherwise (fp16 can overflow on ``L^-1/4 G R^-1/4``)."""
    return "bfloat16" if str(precision).startswith("bf16") else "float32"


class ShampooPrecision(ShampooCallback):
    """Configure Shampoo4bit for ``trainer.precision``.

    What each precision gets:

    * statistics (PU) and inverse roots (PIRU) are always computed in fp32 from the fp32
      gradient (the optimizer upcasts; nothing to set);
    * the per-step preconditioning matmuls run in ``precondition_dtype``: by default
      ``"bfloat16"`` under ``"bf16-mixed"`` / ``"bf16-true"`` and ``"float32"`` otherwise
      (``"16-mixed"``, ``"16-true"``, ``"32-true"``, ``"64-true"``); an explicit argument wins;
    * no statistics from inf / NaN gradients: the optimizer skips such a parameter's step and
      counts it in ``counters["skipped_nonfinite"]``;
    * under ``"16-mixed"`` the GradScaler unscales the gradients before the step and skips
      ``optimizer.step()`` when it finds inf / NaN, so a skipped step advances neither
      ``counters["steps"]`` nor any parameter's ``state["step"]``: the PU / PIRU schedule
      counts only steps that ran.

    Under ``"16-true"`` / ``"bf16-true"`` the parameters, gradients and first-order moments are
    half precision (the optimizer keeps moments in the parameter dtype); only Shampoo's own
    statistics and roots stay fp32.

    The dtype is written into every parameter group when training starts (after a checkpoint
    has been restored, so a run resumed under another precision follows the new one).

    Args:
        precondition_dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, or None for the
            default above.
    """

    def __init__(self, precondition_dtype: Optional[PreconditionDtype] = None) -> None:
        super().__init__()
        if precondition_dtype is not None and precondition_dtype not in PRECONDITION_DTYPES:
            raise ValueError(
                f"precondition_dtype={precondition_dtype!r} is not supported; "
                f"choose one of {PRECONDITION_DTYPES} or None"
            )
        self.precondition_dtype = precondition_dtype
        self.resolved_dtype: str | None = None
        self.precision: str | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.precision = str(trainer.precision)
        self.resolved_dtype = self.precondition_dtype or default_precondition_dtype(self.precision)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in self._optimizers:
            for group in optimizer.param_groups:
                group["precondition_dtype"] = self.resolved_dtype

    def state_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "precondition_dtype": self.resolved_dtype}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callback state after ``setup``, so the current precision is known.
        saved = state_dict.get("precision")
        if saved is not None and self.precision is not None and saved != self.precision:
            rank_zero_warn(
                f"ShampooPrecision: resuming a run trained with precision={saved!r} under {self.precision!r}; "
                f"preconditioning now runs in {self.resolved_dtype}"
            )
