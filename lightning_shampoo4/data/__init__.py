"""Lightning data modules: embedded sklearn digits (default), synthetic prototypes, CIFAR-10/100 from local files.

Every module yields ``(images float32 (B,C,H,W), labels int64 (B,))`` batches and exposes
``num_classes`` and ``image_shape`` right after construction, so models can be built before ``setup``.
"""

import difflib

import lightning.pytorch as pl

from lightning_shampoo4.data.cifar import CIFAR10DataModule, CIFAR100DataModule, CIFARDataModule
from lightning_shampoo4.data.digits import DigitsDataModule
from lightning_shampoo4.data.synthetic import SyntheticDataModule

__all__ = [
    "DigitsDataModule",
    "SyntheticDataModule",
    "CIFARDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DATAMODULES",
    "create_datamodule",
]

DATAMODULES: dict[str, type[pl.LightningDataModule]] = {
    "digits": DigitsDataModule,
    "synthetic": SyntheticDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
}


def create_datamodule(name: str, **kwargs: object) -> pl.LightningDataModule:
    """Build a data module by short name (see ``DATAMODULES``); case, '-' and '_' are ignored ("CIFAR-10" works).

    Unknown names raise ValueError listing the valid names and suggesting the closest one.
    """
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key not in DATAMODULES:
        valid = ", ".join(sorted(DATAMODULES))
        close = difflib.get_close_matches(key, list(DATAMODULES), n=1, cutoff=0.4)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"Unknown datamodule name {name!r}.{hint} Valid names: {valid}.")
    return DATAMODULES[key](**kwargs)
