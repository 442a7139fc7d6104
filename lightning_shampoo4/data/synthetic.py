"""Random but learnable image classification data for tests and benchmarks (no files, any size)."""

import torch
import torch.nn.functional as F

from lightning_shampoo4.data.transforms import InMemoryImageDataModule, derive_seed

__all__ = ["SyntheticDataModule", "make_prototypes"]

# Independent random streams derived from the seed, so changing e.g. train_size leaves the
# prototypes and the validation samples unchanged.
_STREAM_PROTOTYPES, _STREAM_TRAIN, _STREAM_VAL = 11, 12, 13


def make_prototypes(num_classes: int, channels: int, image_size: int, seed: int) -> torch.Tensor:
    """One fixed random image per class, (num_classes, C, S, S), each with zero mean and unit std.

    Prototypes are smooth (4x4 Gaussian noise bilinearly upsampled) so that convolutional models and
    MLPs alike can separate them; pixel-level white noise would be needlessly hard for a CNN.
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, _STREAM_PROTOTYPES))
    low = min(4, image_size)
    coarse = torch.randn(num_classes, channels, low, low, generator=generator)
    protos = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    flat = protos.flatten(1)
    flat = (flat - flat.mean(dim=1, keepdim=True)) / flat.std(dim=1, keepdim=True).clamp_min(1e-6)
    return flat.view_as(protos).contiguous()


def _sample(prototypes: torch.Tensor, n: int, noise: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples with (shuffled) balanced labels: prototype[label] + noise * N(0, 1)."""
    k = prototypes.shape[0]
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=generator)]
    images = prototypes[labels] + noise * torch.randn((n, *prototypes.shape[1:]), generator=generator)
    return images, labels


class SyntheticDataModule(InMemoryImageDataModule):
    """Class prototype + Gaussian noise images; deterministic given ``seed``.

    Each of ``num_classes`` classes has a fixed smooth random prototype (zero mean, unit std);
    a sample is ``prototype + noise * N(0, 1)`` with balanced labels. Larger ``noise`` makes the task
    harder. Data is generated in ``setup``; test loader = validation set.
    Batches are ``(float32 (B, channels, image_size, image_size), int64 (B,))``, not renormalized.
    """

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        num_classes: int = 10,
        image_size: int = 32,
        channels: int = 3,
        train_size: int = 512,
        val_size: int = 128,
        noise: float = 1.0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        for name, value, low in (
            ("num_classes", num_classes, 2),
            ("image_size", image_size, 2),
            ("channels", channels, 1),
            ("train_size", train_size, 1),
            ("val_size", val_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0.0:
            raise ValueError(f"noise must be a float >= 0, got {noise!r}")
        self.num_classes = num_classes
        self.image_size = image_size
        self.channels = channels
        self.train_size = train_size
        self.val_size = val_size
        self.noise = float(noise)
        self.image_shape = (channels, image_size, image_size)
        self.classes = tuple(str(c) for c in range(num_classes))
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        """Generate prototypes and samples from the seed (once; later calls are no-ops)."""
        if self.is_setup:
            return
        self.prototypes = make_prototypes(self.num_classes, self.channels, self.image_size, self.seed)
        train = _sample(
            self.prototypes, self.train_size, self.noise, torch.Generator().manual_seed(derive_seed(self.seed, _STREAM_TRAIN))
        )
        val = _sample(
            self.prototypes, self.val_size, self.noise, torch.Generator().manual_seed(derive_seed(self.seed, _STREAM_VAL))
        )
        c = self.channels
        self._set_data(train=train, val=val, mean=[0.0] * c, std=[1.0] * c)
