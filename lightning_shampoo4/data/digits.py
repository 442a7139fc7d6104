"""scikit-learn's embedded handwritten digits (1797 real 8x8 grey images, 10 classes) as a data module.

This is the package's default dataset: it ships inside scikit-learn, so it needs no download and
trains in seconds on a CPU, yet it is real data rather than noise.
"""

import torch
import torch.nn.functional as F

from lightning_shampoo4.data.transforms import InMemoryImageDataModule, derive_seed

__all__ = ["DigitsDataModule", "stratified_split"]

_NUM_IMAGES = 1797


def _load_sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images float32 (1797,1,8,8) with values 0..16, labels int64 (1797,))."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "DigitsDataModule needs scikit-learn, which ships the digits dataset: pip install scikit-learn"
        ) from err
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    return images, labels


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (train, val) so every class keeps its share; same seed -> same split.

    The validation set has ``round(N * val_fraction)`` items in total, distributed over the classes
    by largest remainder, and every class keeps at least one training item. Returned index tensors are
    sorted (shuffling is the loader's job).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in the open interval (0, 1), got {val_fraction!r}")
    labels = torch.as_tensor(labels, dtype=torch.long)
    classes = torch.unique(labels)  # sorted
    counts = torch.stack([(labels == c).sum() for c in classes]).to(torch.float64)
    exact = counts * val_fraction
    n_val = torch.floor(exact).to(torch.long)
    missing = round(labels.numel() * val_fraction) - int(n_val.sum())
    if missing > 0:
        # Stable descending sort of the fractional parts: ties go to the lower class id.
        order = torch.argsort(exact - torch.floor(exact), descending=True, stable=True)
        n_val[order[:missing]] += 1
    n_val = torch.minimum(n_val, counts.to(torch.long) - 1).clamp_min(0)

    generator = torch.Generator().manual_seed(derive_seed(seed, 1))
    train_parts, val_parts = [], []
    for c, k in zip(classes.tolist(), n_val.tolist()):
        idx = torch.nonzero(labels == c, as_tuple=True)[0]
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        val_parts.append(idx[:k])
        train_parts.append(idx[k:])
    train_idx = torch.sort(torch.cat(train_parts)).values
    val_idx = torch.sort(torch.cat(val_parts)).values
    return train_idx, val_idx


class DigitsDataModule(InMemoryImageDataModule):
    """The sklearn 8x8 digits, optionally resized to ``image_size`` and repeated to 3 channels.

    With the defaults (``val_fraction=0.2``) the seeded stratified split gives 1438 training and
    359 validation images; the test loader reuses the validation set (there is no separate test set).
    Images are normalized with the training set's mean/std. ``image_size=32, channels=3`` lets
    CIFAR-style vision models run on it. ``augment=True`` adds a random zero-filled translation of up
    to ±1 pixel at 8x8 (±``round(image_size/8)`` in general) to training batches only.
    Batches are ``(float32 (B, channels, image_size, image_size), int64 (B,))``.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.2,
        image_size: int = 8,
        channels: int = 1,
        augment: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be a float in the open interval (0, 1), got {val_fraction!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 2:
            raise ValueError(f"image_size must be an integer >= 2 (8 = native, e.g. 32 to upsample), got {image_size!r}")
        if isinstance(channels, bool) or channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        if not isinstance(augment, bool):
            raise ValueError(f"augment must be True or False, got {augment!r}")
        self.val_fraction = float(val_fraction)
        self.image_size = image_size
        self.channels = channels
        self.augment = augment
        self.num_classes = 10
        self.image_shape = (channels, image_size, image_size)
        self.classes = tuple(str(d) for d in range(10))
        self.max_shift = max(1, round(image_size / 8)) if augment else 0
        self.save_hyperparameters()

    @property
    def expected_sizes(self) -> tuple[int, int]:
        """(train, val) sizes the split will have."""
        n_val = round(_NUM_IMAGES * self.val_fraction)
        return _NUM_IMAGES - n_val, n_val

    def prepare_data(self) -> None:
        """Nothing to download; fail early with a clear message if scikit-learn is missing."""
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "DigitsDataModule needs scikit-learn, which ships the digits dataset: pip install scikit-learn"
            ) from err

    def setup(self, stage: str | None = None) -> None:
        """Load, split, resize and compute normalization statistics (once; later calls are no-ops)."""
        if self.is_setup:
            return
        images, labels = _load_sklearn_digits()
        train_idx, val_idx = stratified_split(labels, self.val_fraction, self.seed)
        if self.image_size != images.shape[-1]:
            images = F.interpolate(
                images,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=self.image_size < images.shape[-1],
            )
        if self.channels == 3:
            images = images.repeat(1, 3, 1, 1)
        train_x, val_x = images[train_idx].contiguous(), images[val_idx].contiguous()
        mean = train_x.mean(dim=(0, 2, 3))
        std = train_x.std(dim=(0, 2, 3)).clamp_min(1e-6)
        self.train_indices, self.val_indices = train_idx, val_idx
        self._set_data(
            train=(train_x, labels[train_idx]),
            val=(val_x, labels[val_idx]),
            mean=mean.tolist(),
            std=std.tolist(),
            crop_padding=self.max_shift,
        )
