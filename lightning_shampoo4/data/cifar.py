"""CIFAR-10 / CIFAR-100 data modules reading the official "python version" pickle files from disk.

Nothing is ever downloaded: the user puts the extracted folder (``cifar-10-batches-py`` or
``cifar-100-python``) inside ``data_dir`` (or points ``data_dir`` at that folder directly). The
uint8 images stay in memory and each batch is augmented (random crop 32 with 4-pixel zero padding +
horizontal flip) and normalized in torch, which is much faster than per-image PIL transforms.
"""

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from lightning_shampoo4.data.transforms import InMemoryImageDataModule

__all__ = ["CIFARDataModule", "CIFAR10DataModule", "CIFAR100DataModule", "CIFAR_URL"]

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


def _unpickle(path: Path) -> dict[Any, Any]:
    # The CIFAR files are Python pickles, and unpickling can run arbitrary code. They are trusted
    # user-supplied files (the official tarball extracted by the user); this module never fetches them.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _get(d: dict[Any, Any], key: bytes, path: Path) -> Any:
    """Look up ``key`` as bytes (as in the official files) or as str; clear error if absent."""
    if key in d:
        return d[key]
    skey = key.decode()
    if skey in d:
        return d[skey]
    raise ValueError(f"{path} is not a valid CIFAR file: missing key {key!r} (found keys {sorted(map(str, d))})")


class CIFARDataModule(InMemoryImageDataModule):
    """Shared CIFAR logic; use :class:`CIFAR10DataModule` or :class:`CIFAR100DataModule`.

    Training set = the 50000 training images (or the first ``train_subset``); validation and test
    loaders both use the 10000 test images (CIFAR has no separate validation split). With
    ``augment=True`` training batches get random crop (4-pixel zero padding) + horizontal flip;
    evaluation batches are never augmented. Batches are ``(float32 (B,3,32,32), int64 (B,))``
    normalized with the dataset's standard per-channel mean/std.
    """

    # Filled in by subclasses.
    dataset_name: ClassVar[str] = ""
    folder_name: ClassVar[str] = ""
    tarball_name: ClassVar[str] = ""
    train_files: ClassVar[tuple[str, ...]] = ()
    test_files: ClassVar[tuple[str, ...]] = ()
    meta_file: ClassVar[str] = ""
    label_key: ClassVar[bytes] = b""
    label_names_key: ClassVar[bytes] = b""
    NUM_CLASSES: ClassVar[int] = 0
    MEAN: ClassVar[tuple[float, float, float]] = (0.0, 0.0, 0.0)
    STD: ClassVar[tuple[float, float, float]] = (1.0, 1.0, 1.0)
    CROP_PADDING: ClassVar[int] = 4

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        train_subset: int | None = None,
    ) -> None:
        if not self.folder_name:
            raise TypeError("CIFARDataModule is a base class; use CIFAR10DataModule or CIFAR100DataModule")
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if not isinstance(data_dir, (str, Path)) or str(data_dir) == "":
            raise ValueError(f"data_dir must be a non-empty path string, got {data_dir!r}")
        if not isinstance(augment, bool):
            raise ValueError(f"augment must be True or False, got {augment!r}")
        if train_subset is not None and (
            isinstance(train_subset, bool) or not isinstance(train_subset, int) or train_subset < 1
        ):
            raise ValueError(f"train_subset must be None (all images) or an integer >= 1, got {train_subset!r}")
        self.data_dir = str(data_dir)
        self.augment = augment
        self.train_subset = train_subset
        self.num_classes = self.NUM_CLASSES
        self.image_shape = (3, 32, 32)
        self.mean = self.MEAN
        self.std = self.STD
        self.classes: tuple[str, ...] = ()
        self.save_hyperparameters()

    # --- locating files -------------------------------------------------------------------
    @classmethod
    def required_files(cls) -> tuple[str, ...]:
        return (*cls.train_files, *cls.test_files, cls.meta_file)

    def candidate_dirs(self) -> list[Path]:
        """Folders that may hold the files: ``data_dir/<folder_name>`` and ``data_dir`` itself."""
        root = Path(self.data_dir).expanduser()
        return [root / self.folder_name, root]

    def find_dataset_dir(self) -> Path:
        """Return the folder holding all required files, or raise FileNotFoundError listing what is missing."""
        root = Path(self.data_dir).expanduser()
        required = self.required_files()
        report: list[tuple[Path, list[str]]] = []
        for cand in self.candidate_dirs():
            missing = [name for name in required if not (cand / name).is_file()]
            if not missing:
                return cand
            report.append((cand, missing))
        # Report against the folder that looks most like the intended one: the one with the fewest
        # missing files if any has some, else the extracted-folder name (or data_dir if it is named so).
        partial = [r for r in report if len(r[1]) < len(required)]
        if partial:
            where, missing = min(partial, key=lambda r: len(r[1]))
        elif root.name == self.folder_name:
            where, missing = report[1]
        else:
            where, missing = report[0]
        looked = " and ".join(f"'{c}'" for c, _ in report)
        state = "" if where.is_dir() else " (the folder does not exist)"
        raise FileNotFoundError(
            f"{self.dataset_name} data not found: missing {', '.join(missing)} in '{where}'{state}. "
            f"Looked in {looked} (data_dir may be the parent folder or the extracted "
            f"'{self.folder_name}' folder itself). This module never downloads. Get the "
            f'"{self.dataset_name} python version" tarball ({self.tarball_name}) from {CIFAR_URL} and extract '
            f"it (tar xzf {self.tarball_name} -C '{root}') so that the folder '{self.folder_name}' is inside "
            f"data_dir='{root}'."
        )

    # --- loading ----------------------------------------------------------------------------
    def _load_split(self, folder: Path, files: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate batch files into (uint8 (N,3,32,32), int64 (N,))."""
        images, labels = [], []
        for name in files:
            path = folder / name
            d = _unpickle(path)
            data = np.asarray(_get(d, b"data", path), dtype=np.uint8)
            lab = np.asarray(_get(d, self.label_key, path), dtype=np.int64).reshape(-1)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{path}: expected data of shape (N, 3072), got {data.shape}")
            if lab.shape[0] != data.shape[0]:
                raise ValueError(f"{path}: {data.shape[0]} images but {lab.shape[0]} labels")
            if lab.size and (lab.min() < 0 or lab.max() >= self.num_classes):
                raise ValueError(f"{path}: labels must be in [0, {self.num_classes - 1}], got {lab.min()}..{lab.max()}")
            # Rows are stored channel-major: 1024 red, 1024 green, 1024 blue values, each row-major 32x32.
            images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
            labels.append(torch.from_numpy(lab.copy()))
        return torch.cat(images), torch.cat(labels)

    def _load_class_names(self, folder: Path) -> tuple[str, ...]:
        path = folder / self.meta_file
        names = _get(_unpickle(path), self.label_names_key, path)
        return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)

    def prepare_data(self) -> None:
        """Only checks that the files are present (never downloads)."""
        self.find_dataset_dir()

    def setup(self, stage: str | None = None) -> None:
        """Load the pickles into memory (once; later calls are no-ops)."""
        if self.is_setup:
            return
        folder = self.find_dataset_dir()
        self.dataset_dir = folder
        train_x, train_y = self._load_split(folder, self.train_files)
        if self.train_subset is not None:
            if self.train_subset > train_x.shape[0]:
                raise ValueError(
                    f"train_subset={self.train_subset} exceeds the {train_x.shape[0]} training images in '{folder}'"
                )
            train_x, train_y = train_x[: self.train_subset].contiguous(), train_y[: self.train_subset].contiguous()
        test_x, test_y = self._load_split(folder, self.test_files)
        self.classes = self._load_class_names(folder)
        self._set_data(
            train=(train_x, train_y),
            val=(test_x, test_y),
            mean=self.MEAN,
            std=self.STD,
            scale=1.0 / 255.0,
            crop_padding=self.CROP_PADDING if self.augment else 0,
            hflip=self.augment,
        )


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10 (10 classes, 50000 train / 10000 test) from ``<data_dir>/cifar-10-batches-py``."""

    dataset_name = "CIFAR-10"
    folder_name = "cifar-10-batches-py"
    tarball_name = "cifar-10-python.tar.gz"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"
    label_key = b"labels"
    label_names_key = b"label_names"
    NUM_CLASSES = 10
    # Per-channel mean/std of the 50000 training images (pixel values scaled to [0, 1]).
    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100 (100 fine classes, 50000 train / 10000 test) from ``<data_dir>/cifar-100-python``."""

    dataset_name = "CIFAR-100"
    folder_name = "cifar-100-python"
    tarball_name = "cifar-100-python.tar.gz"
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"
    label_key = b"fine_labels"
    label_names_key = b"fine_label_names"
    NUM_CLASSES = 100
    MEAN = (0.5071, 0.4865, 0.4409)
    STD = (0.2673, 0.2564, 0.2762)
