"""Batch-level image augmentation and the in-memory loader plumbing shared by the data modules.

All datasets in this package are small enough to live in memory as one tensor, so instead of
per-image transform pipelines (PIL/torchvision) every batch is augmented and normalized at once
with vectorized torch ops inside the ``collate_fn``.

Determinism: the training sampler draws, from a ``torch.Generator`` seeded with the data module's
seed, both the shuffled order and one random 62-bit integer per sample. The collate function derives
that sample's crop offset and flip from the integer alone, so the augmented batches depend only on
the seed and the epoch count, not on ``num_workers`` or which worker builds which batch.
"""

from collections.abc import Iterator, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "random_crop",
    "random_hflip",
    "normalize",
    "BatchTransform",
    "InMemoryImageDataset",
    "SeededShuffleSampler",
    "InMemoryImageDataModule",
    "derive_seed",
    "validate_common_args",
]

_RND_HIGH = 2**62  # per-sample random integers are drawn from [0, 2**62)


def derive_seed(seed: int, stream: int) -> int:
    """Mix ``seed`` and a stream id into an independent 63-bit seed (splitmix64 finalizer).

    Used so that e.g. prototypes, training and validation samples come from unrelated random
    streams that do not shift when one of the sizes changes.
    """
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + (stream + 1) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return z >> 1


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"expected a batch of images shaped (B, C, H, W), got shape {tuple(images.shape)}")


def random_crop(
    images: torch.Tensor,
    padding: int,
    generator: torch.Generator | None = None,
    offsets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Zero-pad each image by ``padding`` pixels and crop back to the original size at a random offset.

    This is the standard CIFAR "random crop with padding" and, equivalently, a random translation by
    up to ±``padding`` pixels with zero fill. ``offsets`` = (rows, cols) integer tensors in
    ``[0, 2*padding]`` of shape (B,) fix the crop positions; otherwise they are drawn from ``generator``.
    """
    _check_images(images)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return images
    b, _, h, w = images.shape
    device = images.device
    if offsets is None:
        rows = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        cols = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    else:
        rows, cols = offsets
    rows = rows.to(device=device, dtype=torch.long)
    cols = cols.to(device=device, dtype=torch.long)
    padded = F.pad(images, (padding, padding, padding, padding))
    # View of every HxW window: (B, C, 2p+1, 2p+1, H, W); pick one window per image (one gather-copy).
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)
    return windows[torch.arange(b, device=device), :, rows, cols]


def random_hflip(
    images: torch.Tensor,
    p: float = 0.5,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mirror each image left-right with probability ``p`` (or where the boolean ``mask`` of shape (B,) is True)."""
    _check_images(images)
    if mask is None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        mask = torch.rand(images.shape[0], generator=generator) < p
    mask = mask.to(device=images.device, dtype=torch.bool)
    return torch.where(mask[:, None, None, None], images.flip(-1), images)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std``; ``mean``/``std`` have one entry per channel."""
    _check_images(images)
    c = images.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std need {c} entries (one per channel), got {len(mean)} and {len(std)}")
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, c, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, c, 1, 1)
    return (images - m) / s


class BatchTransform:
    """Collate function: stack samples, convert to float, augment (optional) and normalize.

    Each sample is ``(image, label, rnd)`` as returned by :class:`InMemoryImageDataset`; ``rnd`` is the
    per-sample random integer from :class:`SeededShuffleSampler` and fully determines that sample's
    crop offset and flip. Returns ``(images float32 (B,C,H,W), labels int64 (B,))``.
    It is a plain class (not a closure) so it pickles into DataLoader worker processes.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        scale: float = 1.0,
        crop_padding: int = 0,
        hflip: bool = False,
    ) -> None:
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.scale = float(scale)
        self.crop_padding = int(crop_padding)
        self.hflip = bool(hflip)

    @property
    def augments(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    def __call__(self, samples: Sequence[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([s[0] for s in samples])
        labels = torch.tensor([int(s[1]) for s in samples], dtype=torch.long)
        if self.augments:  # on the raw (e.g. uint8) pixels, so padding is a true black border
            rnd = torch.tensor([int(s[2]) for s in samples], dtype=torch.long)
            if self.crop_padding > 0:
                span = 2 * self.crop_padding + 1
                rows, rnd = rnd % span, rnd // span
                cols, rnd = rnd % span, rnd // span
                images = random_crop(images, self.crop_padding, offsets=(rows, cols))
            if self.hflip:
                images = random_hflip(images, mask=(rnd % 2) == 1)
        images = images.to(torch.float32)
        if self.scale != 1.0:
            images = images * self.scale
        return normalize(images, self.mean, self.std), labels

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mean={self.mean}, std={self.std}, scale={self.scale}, "
            f"crop_padding={self.crop_padding}, hflip={self.hflip})"
        )


class InMemoryImageDataset(Dataset):
    """Images (uint8 or float, (N,C,H,W)) and integer labels held in memory.

    Indexing with ``i`` or with ``(i, rnd)`` (what :class:`SeededShuffleSampler` yields) returns
    ``(image, label, rnd)``; raw images are returned and transformed per batch by :class:`BatchTransform`.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be (N,) with N={images.shape[0]}, got shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.long)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        if isinstance(index, (tuple, list)):
            i, rnd = int(index[0]), int(index[1])
        else:
            i, rnd = int(index), 0
        return self.images[i], int(self.labels[i]), rnd


class SeededShuffleSampler(Sampler):
    """Yields ``(index, rnd)`` pairs: a seeded permutation (or identity order) plus one random integer per sample.

    Epoch ``e`` draws from a generator seeded by ``(seed, e)``, so a run resumed at an epoch
    boundary sees exactly the order an uninterrupted run would: Lightning calls
    :meth:`set_epoch` with the restored epoch. Without ``set_epoch`` (a plain loop) each
    ``iter`` moves on to the next epoch, so every pass still gets a new order and new draws.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples = int(num_samples)
        self.shuffle = bool(shuffle)
        self.seed = derive_seed(seed, 101)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = self.num_samples
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        self.epoch += 1
        if self.shuffle:
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        rnd = torch.randint(0, _RND_HIGH, (n,), generator=generator, dtype=torch.long)
        yield from zip(order.tolist(), rnd.tolist())


def validate_common_args(batch_size: int, num_workers: int, seed: int) -> None:
    """Check the constructor arguments every data module shares; raise ValueError naming the bad one."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")


class InMemoryImageDataModule(pl.LightningDataModule):
    """Base class: subclasses load tensors in ``setup`` via :meth:`_set_data`; this class builds the loaders.

    Batches are ``(images float32 (B,C,H,W), labels int64 (B,))``. Training batches are shuffled
    (and augmented if the subclass asked for it) deterministically from ``seed``; validation/test
    batches are in dataset order and never augmented.
    """

    num_classes: int
    image_shape: tuple[int, int, int]

    def __init__(self, batch_size: int = 128, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        validate_common_args(batch_size, num_workers, seed)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_dataset: InMemoryImageDataset | None = None
        self.val_dataset: InMemoryImageDataset | None = None
        self.test_dataset: InMemoryImageDataset | None = None
        self._train_transform: BatchTransform | None = None
        self._eval_transform: BatchTransform | None = None

    # --- subclass interface -------------------------------------------------------------
    def _set_data(
        self,
        train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor],
        mean: Sequence[float],
        std: Sequence[float],
        scale: float = 1.0,
        crop_padding: int = 0,
        hflip: bool = False,
        test: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Install the datasets and the train/eval batch transforms (called from a subclass's ``setup``)."""
        self.train_dataset = InMemoryImageDataset(*train)
        self.val_dataset = InMemoryImageDataset(*val)
        self.test_dataset = InMemoryImageDataset(*test) if test is not None else self.val_dataset
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self._train_transform = BatchTransform(mean, std, scale, crop_padding, hflip)
        self._eval_transform = BatchTransform(mean, std, scale)

    @property
    def is_setup(self) -> bool:
        return self.train_dataset is not None

    def _ensure_setup(self) -> None:
        # Lightning calls setup() itself; this makes plain `dm.train_dataloader()` work too.
        if not self.is_setup:
            self.setup("fit")

    # --- loaders --------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, transform: BatchTransform, shuffle: bool) -> DataLoader:
        sampler = SeededShuffleSampler(len(dataset), seed=self.seed, shuffle=shuffle)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=transform,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # Only seeds worker processes' own RNGs; batch content never depends on them.
            generator=torch.Generator().manual_seed(derive_seed(self.seed, 102)),
        )

    def train_dataloader(self) -> DataLoader:
        self._ensure_setup()
        assert self.train_dataset is not None and self._train_transform is not None
        return self._loader(self.train_dataset, self._train_transform, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self._ensure_setup()
        assert self.val_dataset is not None and self._eval_transform is not None
        return self._loader(self.val_dataset, self._eval_transform, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self._ensure_setup()
        assert self.test_dataset is not None and self._eval_transform is not None
        return self._loader(self.test_dataset, self._eval_transform, shuffle=False)
