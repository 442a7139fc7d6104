"""Tests for lightning_shampoo4.data: digits, synthetic, CIFAR (with tiny fake pickle files), registry."""

import inspect
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_shampoo4.data import (
    DATAMODULES,
    CIFAR10DataModule,
    CIFAR100DataModule,
    CIFARDataModule,
    DigitsDataModule,
    SyntheticDataModule,
    create_datamodule,
)
from lightning_shampoo4.data.transforms import normalize, random_crop, random_hflip

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
N_FAKE = 20  # images per fake CIFAR batch file


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _fake_images(rng: np.random.Generator, n: int, first_id: int) -> np.ndarray:
    """Random uint8 rows (N, 3072); the first byte of each row (red pixel (0,0)) holds a running id."""
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[:, 0] = (np.arange(n) + first_id) % 256
    return data


def write_fake_cifar10(root: Path, n: int = N_FAKE, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write tiny CIFAR-10 pickles under root/cifar-10-batches-py; return {file: (data, labels)}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        data = _fake_images(rng, n, k * n)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        _dump(
            folder / name,
            {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n},
        )
        written[name] = (data, labels)
    label_names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(folder / "batches.meta", {b"label_names": label_names, b"num_cases_per_batch": n, b"num_vis": 3072})
    return written


def write_fake_cifar100(root: Path, n: int = N_FAKE, seed: int = 1) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write tiny CIFAR-100 pickles under root/cifar-100-python; coarse labels deliberately differ from fine."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for k, (name, size) in enumerate((("train", 2 * n), ("test", n))):
        data = _fake_images(rng, size, k * 2 * n)
        fine = [int(v) for v in rng.integers(0, 100, size=size)]
        coarse = [f % 20 for f in fine]
        _dump(
            folder / name,
            {b"filenames": [b"x.png"] * size, b"batch_label": name.encode(), b"fine_labels": fine,
             b"coarse_labels": coarse, b"data": data},
        )
        written[name] = (data, fine)
    _dump(
        folder / "meta",
        {b"fine_label_names": [f"class{i}".encode() for i in range(100)],
         b"coarse_label_names": [f"super{i}".encode() for i in range(20)]},
    )
    return written


def _raw_float(dm: CIFARDataModule, images_u8: torch.Tensor) -> torch.Tensor:
    return normalize(images_u8.float() / 255.0, dm.MEAN, dm.STD)


def _all_batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*list(loader))
    return torch.cat(xs), torch.cat(ys)


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(seed=0)
    dm.setup("fit")
    return dm


def test_digits_attributes_before_setup():
    dm = DigitsDataModule(image_size=32, channels=3)
    assert dm.num_classes == 10
    assert dm.image_shape == (3, 32, 32)
    assert not dm.is_setup


def test_digits_sizes_and_shapes(digits):
    assert len(digits.train_dataset) == 1438
    assert len(digits.val_dataset) == 359
    assert digits.expected_sizes == (1438, 359)
    assert digits.test_dataset is digits.val_dataset
    assert set(digits.train_indices.tolist()).isdisjoint(digits.val_indices.tolist())
    assert len(set(digits.train_indices.tolist()) | set(digits.val_indices.tolist())) == 1797
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.long
    xv, yv = _all_batches(digits.test_dataloader())
    assert xv.shape == (359, 1, 8, 8) and yv.shape == (359,)
    assert yv.min() >= 0 and yv.max() <= 9


def test_digits_normalization(digits):
    x, _ = _all_batches(digits.train_dataloader())
    assert abs(x.mean().item()) < 1e-3
    assert abs(x.std().item() - 1.0) < 1e-2
    xv, _ = _all_batches(digits.val_dataloader())
    assert abs(xv.mean().item()) < 0.15  # val uses train statistics, so only roughly centred


def test_digits_split_deterministic_and_seed_dependent(digits):
    again = DigitsDataModule(seed=0)
    again.setup()
    assert torch.equal(again.train_indices, digits.train_indices)
    assert torch.equal(again.val_indices, digits.val_indices)
    xa, ya = next(iter(again.train_dataloader()))
    xb, yb = next(iter(digits.train_dataloader()))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = DigitsDataModule(seed=1)
    other.setup()
    assert not torch.equal(other.val_indices, digits.val_indices)
    assert len(other.val_dataset) == 359


def test_digits_epochs_reshuffle(digits):
    loader = digits.train_dataloader()
    _, y1 = _all_batches(loader)
    _, y2 = _all_batches(loader)
    assert not torch.equal(y1, y2)
    assert torch.equal(torch.bincount(y1), torch.bincount(y2))


def test_digits_stratified(digits):
    train_counts = torch.bincount(digits.train_dataset.labels, minlength=10).double()
    val_counts = torch.bincount(digits.val_dataset.labels, minlength=10).double()
    total = train_counts + val_counts
    assert torch.all((val_counts - 0.2 * total).abs() <= 1.0)
    assert torch.all((val_counts / val_counts.sum() - total / total.sum()).abs() < 0.01)


def test_digits_32x32_rgb_variant():
    dm = DigitsDataModule(image_size=32, channels=3, batch_size=16)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and y.shape == (16,)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape == (16, 3, 32, 32)
    assert len(dm.mean) == 3 and len(dm.std) == 3


def test_digits_augment_train_only_and_worker_independent():
    plain = DigitsDataModule(batch_size=32, augment=False)
    aug = DigitsDataModule(batch_size=32, augment=True)
    aug_workers = DigitsDataModule(batch_size=32, augment=True, num_workers=2)
    xp, yp = next(iter(plain.train_dataloader()))
    xa, ya = next(iter(aug.train_dataloader()))
    assert torch.equal(yp, ya)  # same seed -> same order; only the pixels move
    assert xa.shape == xp.shape == (32, 1, 8, 8)
    assert (xa - xp).abs().flatten(1).amax(1).gt(1e-6).sum() > 10
    # Batches do not depend on the number of worker processes.
    loader = aug_workers.train_dataloader()
    assert loader.persistent_workers
    xw, yw = next(iter(loader))
    assert torch.equal(xw, xa) and torch.equal(yw, ya)
    # Validation is never augmented.
    assert torch.equal(_all_batches(aug.val_dataloader())[0], _all_batches(plain.val_dataloader())[0])
    assert not plain.train_dataloader().persistent_workers


def test_digits_trains_with_lightning_trainer():
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=2, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Tiny(), datamodule=DigitsDataModule(augment=True))
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["val_loss"])


# --------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------
def test_synthetic_shapes_and_determinism():
    a = SyntheticDataModule(num_classes=5, image_size=16, channels=3, train_size=100, val_size=40, batch_size=32)
    assert a.num_classes == 5 and a.image_shape == (3, 16, 16)
    a.setup()
    b = SyntheticDataModule(num_classes=5, image_size=16, channels=3, train_size=100, val_size=40, batch_size=32)
    b.setup()
    assert len(a.train_dataset) == 100 and len(a.val_dataset) == 40
    assert torch.equal(a.train_dataset.images, b.train_dataset.images)
    assert torch.equal(a.val_dataset.labels, b.val_dataset.labels)
    x, y = next(iter(a.train_dataloader()))
    x2, y2 = next(iter(b.train_dataloader()))
    assert x.shape == (32, 3, 16, 16) and y.shape == (32,)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.bincount(a.train_dataset.labels, minlength=5).tolist() == [20] * 5
    c = SyntheticDataModule(num_classes=5, image_size=16, channels=3, train_size=100, val_size=40, seed=1)
    c.setup()
    assert not torch.equal(c.train_dataset.images, a.train_dataset.images)
    # Val samples and prototypes do not change when only train_size changes.
    d = SyntheticDataModule(num_classes=5, image_size=16, channels=3, train_size=60, val_size=40)
    d.setup()
    assert torch.equal(d.val_dataset.images, a.val_dataset.images)


def test_synthetic_is_learnable_by_nearest_prototype():
    dm = SyntheticDataModule(noise=1.0, val_size=200)
    dm.setup()
    x, y = dm.val_dataset.images, dm.val_dataset.labels
    dists = torch.cdist(x.flatten(1), dm.prototypes.flatten(1))
    assert (dists.argmin(1) == y).float().mean() > 0.95
    xb, yb = next(iter(dm.test_dataloader()))
    assert xb.shape == (128, 3, 32, 32) and torch.equal(yb, y[:128])


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------
def test_cifar10_reads_fake_files(tmp_path):
    written = write_fake_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=16, augment=False)
    assert dm.num_classes == 10 and dm.image_shape == (3, 32, 32)
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_dataset) == 5 * N_FAKE and len(dm.val_dataset) == N_FAKE
    assert dm.test_dataset is dm.val_dataset
    assert dm.classes[0] == "airplane" and dm.classes[9] == "truck"
    # Labels and CHW layout match the files.
    train_labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert dm.train_dataset.labels.tolist() == train_labels
    data0 = written["data_batch_1"][0]
    img0 = dm.train_dataset.images[0]
    assert img0.dtype == torch.uint8
    assert torch.equal(img0[0].flatten(), torch.from_numpy(data0[0, :1024]))
    assert torch.equal(img0[2, 1], torch.from_numpy(data0[0, 2048 + 32 : 2048 + 64]))
    # Val loader: dataset order, normalized, labels from test_batch.
    xv, yv = _all_batches(dm.val_dataloader())
    assert yv.tolist() == written["test_batch"][1]
    assert torch.allclose(xv, _raw_float(dm, dm.val_dataset.images), atol=1e-5)
    # Train loader without augmentation: shuffled, but each image still carries its own label.
    xt, yt = _all_batches(dm.train_dataloader())
    assert xt.shape == (5 * N_FAKE, 3, 32, 32)
    ids = torch.round((xt[:, 0, 0, 0] * dm.STD[0] + dm.MEAN[0]) * 255).long()
    assert torch.equal(yt, dm.train_dataset.labels[ids])
    assert not torch.equal(ids, torch.arange(5 * N_FAKE))


def test_cifar100_reads_fine_labels(tmp_path):
    written = write_fake_cifar100(tmp_path)
    dm = CIFAR100DataModule(data_dir=str(tmp_path), batch_size=8)
    assert dm.num_classes == 100
    dm.setup()
    assert dm.train_dataset.labels.tolist() == written["train"][1]
    assert dm.val_dataset.labels.tolist() == written["test"][1]
    assert len(dm.classes) == 100 and dm.classes[3] == "class3"
    assert dm.MEAN != CIFAR10DataModule.MEAN
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.max() < 100


def test_cifar_data_dir_can_be_extracted_folder(tmp_path):
    write_fake_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "cifar-10-batches-py"))
    dm.setup()
    assert dm.dataset_dir == tmp_path / "cifar-10-batches-py"
    assert len(dm.train_dataset) == 5 * N_FAKE


def _crop_flip_matches(aug: torch.Tensor, raw01: torch.Tensor, dm: CIFARDataModule) -> list[set[bool]]:
    """Per image: flip flags f such that aug == normalize(4-pixel zero-padded crop of raw01, flipped if f)."""
    mean = torch.tensor(dm.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(dm.STD).view(1, 3, 1, 1)
    target = (aug * std + mean)[:, :, None, None]  # back to [0, 1] pixels: (N, 3, 1, 1, 32, 32)
    found = [set() for _ in range(len(aug))]
    for flip in (False, True):
        src = raw01.flip(-1) if flip else raw01
        windows = F.pad(src, (4, 4, 4, 4)).unfold(2, 32, 1).unfold(3, 32, 1)  # (N, 3, 9, 9, 32, 32)
        hit = ((windows - target).abs().amax(dim=(1, 4, 5)) < 1e-4).flatten(1).any(1)
        for i in torch.nonzero(hit, as_tuple=True)[0].tolist():
            found[i].add(flip)
    return found


def test_cifar_augmentation_changes_train_never_val(tmp_path):
    write_fake_cifar10(tmp_path)
    kw = dict(data_dir=str(tmp_path), batch_size=25, seed=3)
    aug, plain = CIFAR10DataModule(augment=True, **kw), CIFAR10DataModule(augment=False, **kw)
    xa, ya = _all_batches(aug.train_dataloader())
    xp, yp = _all_batches(plain.train_dataloader())
    assert xa.shape == xp.shape == (5 * N_FAKE, 3, 32, 32)
    assert torch.equal(ya, yp)  # same seed -> same order
    changed = (xa - xp).abs().flatten(1).amax(1) > 1e-6
    assert changed.sum() >= 0.5 * len(changed)
    # Every augmented image is a zero-padded crop (and maybe flip) of its original.
    ids = torch.round((xp[:, 0, 0, 0] * plain.STD[0] + plain.MEAN[0]) * 255).long()
    raw = plain.train_dataset.images[ids].float() / 255.0
    matches = _crop_flip_matches(xa, raw, aug)
    assert all(matches)
    assert any(m == {True} for m in matches) and any(m == {False} for m in matches)  # flips happen, not always
    # Validation/test: identical with and without augment, and equal to the plain normalized images.
    for loader_a, loader_p in ((aug.val_dataloader(), plain.val_dataloader()), (aug.test_dataloader(), plain.test_dataloader())):
        va, vp = _all_batches(loader_a), _all_batches(loader_p)
        assert torch.equal(va[0], vp[0]) and torch.equal(va[1], vp[1])
        assert torch.allclose(va[0], _raw_float(aug, aug.val_dataset.images), atol=1e-5)
    # Deterministic given the seed.
    again = CIFAR10DataModule(augment=True, **kw)
    assert torch.equal(_all_batches(again.train_dataloader())[0], xa)


def test_cifar_train_subset(tmp_path):
    written = write_fake_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), train_subset=30)
    dm.setup()
    assert len(dm.train_dataset) == 30
    expected = written["data_batch_1"][1] + written["data_batch_2"][1][:10]
    assert dm.train_dataset.labels.tolist() == expected
    too_many = CIFAR10DataModule(data_dir=str(tmp_path), train_subset=10_000)
    with pytest.raises(ValueError, match="train_subset"):
        too_many.setup()


def test_cifar_missing_directory(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert CIFAR_URL in msg and "cifar-10-batches-py" in msg and "python version" in msg
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        assert name in msg
    assert str(tmp_path / "nowhere") in msg
    dm100 = CIFAR100DataModule(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cifar-100-python") as info100:
        dm100.setup()
    assert all(name in str(info100.value) for name in ("train", "test", "meta"))
    assert CIFAR_URL in str(info100.value)


def test_cifar_missing_single_file(tmp_path):
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    dm = CIFAR10DataModule(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    msg = str(info.value)
    assert "data_batch_3" in msg and CIFAR_URL in msg
    for present in ("data_batch_1", "data_batch_2", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"):
        assert present not in msg.split("missing", 1)[1].split(" in ", 1)[0]
    assert str(tmp_path / "cifar-10-batches-py") in msg


def test_cifar_base_class_is_abstract():
    with pytest.raises(TypeError):
        CIFARDataModule()


# --------------------------------------------------------------------------------------------
# argument validation, registry, CLI introspection
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "kwargs", "argname"),
    [
        (DigitsDataModule, {"batch_size": 0}, "batch_size"),
        (DigitsDataModule, {"num_workers": -1}, "num_workers"),
        (DigitsDataModule, {"val_fraction": 1.0}, "val_fraction"),
        (DigitsDataModule, {"val_fraction": 0.0}, "val_fraction"),
        (DigitsDataModule, {"channels": 2}, "channels"),
        (DigitsDataModule, {"image_size": 1}, "image_size"),
        (SyntheticDataModule, {"num_classes": 1}, "num_classes"),
        (SyntheticDataModule, {"noise": -0.5}, "noise"),
        (SyntheticDataModule, {"train_size": 0}, "train_size"),
        (SyntheticDataModule, {"batch_size": 2.5}, "batch_size"),
        (CIFAR10DataModule, {"train_subset": 0}, "train_subset"),
        (CIFAR100DataModule, {"data_dir": ""}, "data_dir"),
        (CIFAR100DataModule, {"augment": "yes"}, "augment"),
    ],
)
def test_bad_args_raise_value_error(cls, kwargs, argname):
    with pytest.raises(ValueError, match=argname):
        cls(**kwargs)


def test_create_datamodule():
    assert set(DATAMODULES) == {"digits", "synthetic", "cifar10", "cifar100"}
    dm = create_datamodule("synthetic", num_classes=3, image_size=8, channels=1)
    assert isinstance(dm, SyntheticDataModule) and dm.image_shape == (1, 8, 8)
    assert isinstance(create_datamodule("CIFAR-10", data_dir="nowhere"), CIFAR10DataModule)
    with pytest.raises(ValueError) as info:
        create_datamodule("cifr10")
    msg = str(info.value)
    assert "Did you mean 'cifar10'" in msg
    assert all(name in msg for name in DATAMODULES)
    with pytest.raises(ValueError, match="digits"):
        create_datamodule("digit")


@pytest.mark.parametrize("cls", [*DATAMODULES.values(), CIFARDataModule])
def test_signatures_are_cli_friendly(cls):
    params = [p for p in inspect.signature(cls).parameters.values()]
    assert params, cls
    for p in params:
        assert p.annotation is not inspect.Parameter.empty, f"{cls.__name__}.{p.name} lacks an annotation"
        assert p.default is not inspect.Parameter.empty, f"{cls.__name__}.{p.name} lacks a default"
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    names = {p.name for p in params}
    assert {"batch_size", "num_workers", "seed"} <= names


def test_jsonargparse_builds_datamodules():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(CIFAR10DataModule, "cifar")
    parser.add_class_arguments(DigitsDataModule, "digits")
    cfg = parser.parse_args(["--cifar.train_subset=100", "--cifar.augment=false", "--digits.image_size=32"])
    objs = parser.instantiate_classes(cfg)
    assert objs.cifar.train_subset == 100 and objs.cifar.augment is False
    assert objs.digits.image_shape == (1, 32, 32)
    assert dict(objs.digits.hparams)["image_size"] == 32


# --------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------
def test_batch_transforms():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8, generator=g)
    assert torch.equal(random_crop(x, 0), x)
    shifted = random_crop(x, 2, offsets=(torch.full((6,), 2), torch.full((6,), 2)))
    assert torch.equal(shifted, x)  # offset == padding means no shift
    right = random_crop(x, 1, offsets=(torch.ones(6, dtype=torch.long), torch.zeros(6, dtype=torch.long)))
    assert torch.equal(right[..., 1:], x[..., :-1]) and torch.all(right[..., 0] == 0)
    mask = torch.tensor([True, False, True, False, False, False])
    flipped = random_hflip(x, mask=mask)
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])
    assert random_crop(x, 3, generator=g).shape == x.shape
    with pytest.raises(ValueError, match="mean/std"):
        normalize(x, [0.0], [1.0])


def test_sampler_epoch_order_is_reproducible_for_resume():
    """A sampler told the epoch (as Lightning does on resume) yields what an uninterrupted one did."""
    from lightning_shampoo4.data.transforms import SeededShuffleSampler

    running = SeededShuffleSampler(50, seed=3)
    epochs = [list(running) for _ in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
    resumed = SeededShuffleSampler(50, seed=3)
    resumed.set_epoch(2)
    assert list(resumed) == epochs[2]
    assert list(resumed) == list(running)  # both moved on to epoch 3
