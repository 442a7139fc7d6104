"""Recipes: registry and overrides, the paper's hyper-parameters, every recipe x optimizer variant
running a few steps, CIFAR from tiny fake files, callbacks by name, and the YAML folder."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from lightning_shampoo4.module import ImageClassifier
from lightning_shampoo4.optim import SOAP4bit, Shampoo4bit
from lightning_shampoo4.recipes import (
    DEFAULT_RECIPE,
    VARIANTS,
    OptimizerConfig,
    Recipe,
    RecipeError,
    get_recipe,
    list_recipes,
    register_recipe,
)
from lightning_shampoo4.recipes import _registry
from lightning_shampoo4.recipes.config import resolve_callback
from lightning_shampoo4.recipes.export import cli_config, out_of_date, recipe_table, recipe_yaml
from lightning_shampoo4.recipes.optimizers import milestone_steps

REPO = Path(__file__).resolve().parents[1]
CIFAR = [n for n in list_recipes() if "cifar" in n]
FAST = dict(
    max_steps=2,
    limit_val_batches=1,
    num_sanity_val_steps=0,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)


def tiny(name: str, *extra: str) -> Recipe:
    """``name`` at reduced size; CIFAR recipes on synthetic data of the same shape and classes."""
    overrides = ["callbacks=[]", *extra]
    if "cifar" in name:
        classes = 100 if name.endswith("cifar100") else 10
        overrides += [
            "model.width=0.0625",
            "data.name=synthetic",
            f"data.kwargs={{num_classes: {classes}, image_size: 32, channels: 3, train_size: 8, val_size: 4, batch_size: 4}}",
        ]
    return get_recipe(name, overrides=overrides)


def fit(recipe: Recipe, **trainer_kwargs) -> tuple[pl.Trainer, ImageClassifier]:
    pl.seed_everything(0, verbose=False)
    dm = recipe.build_datamodule()
    module = recipe.build_module(dm)
    trainer = recipe.build_trainer(**{**FAST, **trainer_kwargs})
    trainer.fit(module, dm)
    return trainer, module


# -- registry -------------------------------------------------------------------------------------
def test_registry_lists_the_paper_and_digits_recipes():
    names = list_recipes()
    for arch in ("resnet34", "vgg19", "vit_small", "swin_tiny"):
        assert f"{arch}_cifar100" in names and f"{arch}_cifar10" in names
    assert {"digits_cnn", "digits_mlp", "digits_resnet18"} <= set(names)
    assert DEFAULT_RECIPE == "digits_cnn"
    assert list_recipes("*_cifar100") == sorted(n for n in names if n.endswith("_cifar100"))
    assert list_recipes("nothing*") == []


def test_override_spellings_agree():
    a = get_recipe("resnet34_cifar100", overrides=["optimizer.bits=32", "trainer.max_epochs=3", "data.kwargs.batch_size=32"])
    b = get_recipe("resnet34_cifar100", overrides={"optimizer.bits": 32, "trainer": {"max_epochs": 3}, "data.kwargs.batch_size": 32})
    c = get_recipe("resnet34_cifar100", trainer={"max_epochs": 3}, **{"optimizer.bits": 32, "data.kwargs.batch_size": 32})
    assert a == b == c
    assert a.optimizer.bits == 32 and a.optimizer.lr == 0.1  # a section mapping changes only what it names
    assert a.data.kwargs == {"data_dir": "data", "batch_size": 32, "num_workers": 0, "augment": True}
    assert a.optimizer.shampoo_kwargs()["bits"] == 32 and a.optimizer.describe() == "32-bit Shampoo + SGDM"


def test_get_recipe_returns_fresh_type_checked_copies():
    a = get_recipe("digits_cnn")
    a.optimizer.lr = 123.0
    assert get_recipe("digits_cnn").optimizer.lr != 123.0
    r = get_recipe("digits_cnn", overrides=["optimizer.betas=[0.8,0.9]", "schedule.warmup_epochs=2"])
    assert r.optimizer.betas == (0.8, 0.9) and isinstance(r.schedule.warmup_epochs, float)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"overrides": ["optimizer.bitz=4"]}, "did you mean 'optimizer.bits'"),
        ({"overrides": ["optimzer.lr=0.1"]}, "did you mean 'optimizer.lr'"),
        ({"overrides": ["trainer.max_epoch=1"]}, "did you mean 'trainer.max_epochs'"),
        ({"overrides": ["optimizer.bits=5"]}, r"optimizer\.bits.*expected one of \[4, 8, 32\]"),
        ({"overrides": ["optimizer.variant=4bt"]}, "did you mean '4bit'"),
        ({"overrides": ["schedule.name=cosin"]}, "did you mean 'cosine'"),
        ({"overrides": ["optimizer.lr=fast"]}, r"optimizer\.lr"),
        ({"overrides": ["optimizer.lr=-1"]}, "optimizer.lr must be > 0"),
        ({"overrides": ["optimizer.root_interval=15"]}, "multiple of optimizer.stat_interval"),
        ({"overrides": ["optimizer.variant=first_order", "optimizer.bits=8"]}, "no effect with variant='first_order'"),
        ({"overrides": ["lr 0.1"]}, "key=value"),
        ({"optimizer": {"lrr": 0.1}}, "did you mean 'optimizer.lr'"),
    ],
)
def test_bad_overrides_fail_with_suggestions(kwargs, match):
    with pytest.raises(RecipeError, match=f"(?i){match}"):
        get_recipe("digits_cnn", **kwargs)


def test_unknown_recipe_suggests_names():
    with pytest.raises(RecipeError, match="(?i)did you mean 'resnet34_cifar100'") as err:
        get_recipe("resnet34_cifar1000")
    assert "vit_small_cifar100" in str(err.value)  # and lists them all


def test_unknown_callback_and_data_names_suggest():
    with pytest.raises(RecipeError, match="LearningRateMonitor"):
        resolve_callback("LearningRateMonitr")
    with pytest.raises(RecipeError, match="cifar100"):
        get_recipe("digits_cnn", overrides=["data.name=cifar1000"]).build_datamodule()


def test_register_recipe_decorator_instance_and_duplicates():
    try:

        @register_recipe
        def my_digits() -> Recipe:
            return get_recipe("digits_mlp", overrides=["trainer.max_epochs=1"])

        register_recipe(Recipe(name="my_instance", description="x"))
        assert get_recipe("my_digits").name == "my_digits" and get_recipe("my_digits").trainer.max_epochs == 1
        assert get_recipe("my_instance").description == "x"

        def other() -> Recipe:
            return Recipe()

        with pytest.raises(ValueError, match="already registered"):
            register_recipe("my_digits")(other)
        with pytest.raises(ValueError, match="already registered"):
            register_recipe(Recipe(name="digits_cnn"))
        register_recipe(Recipe(name="my_instance", description="y"))  # an instance may replace an instance
        assert get_recipe("my_instance").description == "y"
    finally:
        _registry._RECIPES.pop("my_digits", None)
        _registry._RECIPES.pop("my_instance", None)


# -- the paper's settings -----------------------------------------------------------------------
@pytest.mark.parametrize("name", CIFAR)
def test_paper_hyperparameters(name):
    r = get_recipe(name)
    o, s = r.optimizer, r.schedule
    assert (o.variant, o.shampoo_beta, o.matrix_eps, o.stat_interval, o.root_interval) == ("4bit", 0.95, 1e-6, 100, 500)
    # the storage settings are the optimizer's own defaults (null: resolved by the optimizer)
    assert (o.storage, o.block_size, o.codebook, o.root_block_size, o.max_order) == (None, None, None, None, 1200)
    assert r.data.name == name.rsplit("_", 1)[1] and r.data.kwargs["batch_size"] == 128 and r.data.kwargs["augment"]
    if name.startswith(("resnet34", "vgg19")):
        assert (o.base, o.lr, o.momentum, o.weight_decay, r.trainer.max_epochs) == ("sgd", 0.1, 0.9, 5e-4, 200)
        assert (s.name, s.warmup_epochs, s.milestones, s.gamma) == ("step", 5.0, [0.3, 0.6, 0.9], 0.1)
    else:
        assert (o.base, o.lr, o.betas, o.weight_decay, r.trainer.max_epochs) == ("adamw", 1e-3, (0.9, 0.999), 0.05, 100)
        assert s.name == "cosine" and r.model.arch_kwargs["drop_path_rate"] == 0.1
    if name in ("resnet34_cifar100", "vit_small_cifar100", "swin_tiny_cifar100"):
        assert set(r.reference) >= {"first_order", "32bit", "4bit"}


@pytest.mark.parametrize(
    "variant, implied", [("4bit", {}), ("8bit", {"bits": 8}), ("32bit", {"bits": 32}), ("naive4bit", {"storage": "naive"})]
)
def test_variants_resolve_to_shampoo_settings(variant, implied):
    kw = OptimizerConfig(variant=variant).shampoo_kwargs()
    assert {k: kw[k] for k in ("bits", "storage") if k in kw} == implied  # the rest: the optimizer's defaults
    with pytest.raises(RecipeError):
        OptimizerConfig(variant="first_order").shampoo_kwargs()


def test_moment_bits_reach_the_optimizer_and_its_name():
    r = get_recipe("vit_small_cifar100", overrides=["optimizer.moment_bits=4"])
    default = "4-bit Shampoo (cholesky, 8-bit statistic)"
    assert r.optimizer.shampoo_kwargs()["moment_bits"] == 4 and r.optimizer.describe() == f"{default} + 4-bit AdamW"
    # the paper's fp32 moments by default: null, the optimizer's own default
    assert get_recipe("resnet34_cifar100").optimizer.moment_bits is None
    assert Shampoo4bit.SETTINGS["moment_bits"].default == 32
    eigen = get_recipe("vit_small_cifar100", overrides=["optimizer.storage=eigenvectors"]).optimizer
    assert eigen.describe() == "4-bit Shampoo (eigenvectors) + AdamW"
    with pytest.warns(DeprecationWarning, match="optimizer.storage=eigenvectors"):  # the old spelling still works
        old = get_recipe("vit_small_cifar100", overrides=["optimizer.quantize=eigenvectors"]).optimizer
    assert old.describe() == eigen.describe() and old.shampoo_kwargs()["storage"] == "eigenvectors"
    assert get_recipe("resnet34_cifar100", **{"optimizer.moment_bits": 8}).optimizer.describe() == f"{default} + 8-bit SGDM"
    with pytest.raises(RecipeError, match=r"optimizer\.moment_bits.*expected one of \[4, 8, 32\]"):
        get_recipe("vit_small_cifar100", overrides=["optimizer.moment_bits=2"])
    with pytest.raises(RecipeError, match="moment_bits=4 needs another variant"):
        get_recipe("vit_small_cifar100", overrides=["optimizer.variant=first_order", "optimizer.moment_bits=4"])


@pytest.mark.parametrize("name", ["digits_mlp", "digits_resnet18"])  # AdamW and SGDM bases
def test_quantized_moments_recipe_trains_and_keeps_less_than_adamw(name):
    trainer, _ = fit(tiny(name, "optimizer.moment_bits=4"))
    optimizer = trainer.optimizers[0]
    assert {g["moment_bits"] for g in optimizer.param_groups} == {4}
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    keys = {k for st in optimizer.state.values() for k in st}
    big = [p for g in optimizer.param_groups for p in g["params"] if p.numel() >= 4096]
    if big:  # tensors of >= 4096 elements keep codes + scales, still counted as moments
        moment = "exp_avg" if optimizer.param_groups[0]["base"] == "adamw" else "momentum_buffer"
        assert {f"{moment}_codes", f"{moment}_absmax"} <= keys
        fp32 = sum(p.numel() * 4 * (2 if moment == "exp_avg" else 1) for g in optimizer.param_groups for p in g["params"])
        assert optimizer.memory_report()["moments"] < fp32 / 2


def test_milestones_stay_increasing_in_tiny_runs():
    assert milestone_steps([0.3, 0.6, 0.9], 1000) == (300, 600, 900)
    assert milestone_steps([0.3, 0.6, 0.9], 2) == (1, 2, 3)


# -- every recipe x every variant runs ------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_and_variant_trains_a_few_steps(name, variant):
    recipe = tiny(name, f"optimizer.variant={variant}")
    trainer, module = fit(recipe)
    assert trainer.global_step == 2
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    optimizer = trainer.optimizers[0]
    if variant == "first_order":
        expected = torch.optim.SGD if recipe.optimizer.base == "sgd" else torch.optim.AdamW
        assert type(optimizer) is expected
    elif variant == "soap4bit":
        assert isinstance(optimizer, SOAP4bit) and optimizer.counters["steps"] == 2
    else:
        assert isinstance(optimizer, Shampoo4bit) and optimizer.counters["steps"] == 2
        kw = Shampoo4bit.SETTINGS.defaults() | recipe.optimizer.shampoo_kwargs()
        assert {(g["bits"], g["storage"], g["base"]) for g in optimizer.param_groups} == {(kw["bits"], kw["storage"], kw["base"])}
    groups = optimizer.param_groups
    assert any(g["weight_decay"] == 0.0 for g in groups)  # biases and norms
    if recipe.schedule.name != "none":
        assert trainer.lr_scheduler_configs and trainer.lr_scheduler_configs[0].interval == "step"


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in ("first_order", "soap4bit")])
def test_shampoo_variants_update_quantized_state(variant):
    """Statistics and roots really update (T1 = T2 = 1) and factors of order >= 64 are quantized."""
    trainer, _ = fit(tiny("digits_mlp", f"optimizer.variant={variant}", "optimizer.stat_interval=1", "optimizer.root_interval=1"))
    optimizer = trainer.optimizers[0]
    assert optimizer.counters["root_updates"] > 0 and optimizer.counters["failed_updates"] == 0
    report = optimizer.memory_report()
    if variant == "32bit":
        assert report["scales"] == 0
    else:
        assert report["scales"] > 0  # quantized state exists


def test_digits_default_uses_quantized_factors():
    """The default model has factors of order >= 64, so 4-bit state is in use."""
    recipe = get_recipe(DEFAULT_RECIPE)
    module = recipe.build_module(recipe.build_datamodule())
    sides = [s for p in module.parameters() if p.ndim >= 2 for s in (p.shape[0], p[0].numel())]
    assert max(sides) >= 64 and recipe.optimizer.min_quant_numel <= 64 * 64
    assert (recipe.optimizer.stat_interval, recipe.optimizer.root_interval) == (20, 100)


def test_warmup_and_step_schedule_follow_the_trainer():
    recipe = tiny("resnet34_cifar100", "schedule.warmup_epochs=1")  # 2 batches per epoch
    trainer, _ = fit(recipe, max_steps=6)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    factor = scheduler.lr_lambdas[0]  # 6 steps: warm-up 2, milestones at 30/60/90 % = steps 2, 4, 5
    assert [round(factor(i), 6) for i in range(6)] == [0.5, 1.0, 0.1, 0.1, 0.01, 0.001]
    assert scheduler.get_last_lr()[0] == pytest.approx(recipe.optimizer.lr * 0.001)


# -- data from files, callbacks, checkpoints ----------------------------------------------------------
def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_fake_cifar(root: Path, classes: int, n: int = 16) -> None:
    rng = np.random.default_rng(0)

    def batch(k: int) -> dict:
        key = b"fine_labels" if classes == 100 else b"labels"
        return {b"data": rng.integers(0, 256, (k, 3072), dtype=np.uint8), key: rng.integers(0, classes, k).tolist()}

    if classes == 100:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        _pickle(folder / "train", batch(n))
        _pickle(folder / "test", batch(n // 2))
        _pickle(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    else:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i in range(1, 6):
            _pickle(folder / f"data_batch_{i}", batch(n // 4))
        _pickle(folder / "test_batch", batch(n // 2))
        _pickle(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})


@pytest.mark.parametrize("name", ["resnet34_cifar100", "vit_small_cifar10"])
def test_cifar_recipes_read_fake_files(tmp_path, name):
    write_fake_cifar(tmp_path, 100 if name.endswith("100") else 10)
    recipe = get_recipe(
        name,
        overrides=["model.width=0.0625", f"data.kwargs.data_dir={tmp_path}", "data.kwargs.batch_size=8", "callbacks=[]"],
    )
    trainer, module = fit(recipe, max_steps=-1, max_epochs=1)  # 16 (CIFAR-100) or 20 (CIFAR-10) images
    assert trainer.global_step in (2, 3) and module.hparams.num_classes == (100 if name.endswith("100") else 10)
    assert type(trainer.datamodule).__name__ == ("CIFAR100DataModule" if name.endswith("100") else "CIFAR10DataModule")
    assert "val/acc" in trainer.callback_metrics


def test_recipe_callbacks_by_name(tmp_path):
    pytest.importorskip("lightning_shampoo4.callbacks")
    from lightning_shampoo4.callbacks import QuantizedStateMonitor

    recipe = tiny(
        "digits_mlp",
        "callbacks=[{name: QuantizedStateMonitor, kwargs: {every_n_steps: 1, errors: false}}, {name: LearningRateMonitor}]",
    )
    trainer, _ = fit(recipe, logger=CSVLogger(tmp_path), max_steps=3)
    monitor = next(c for c in trainer.callbacks if isinstance(c, QuantizedStateMonitor))
    assert monitor.last_metrics["shampoo/bytes/total"] > 0
    assert cli_config(recipe)["trainer"]["callbacks"][0]["class_path"] == "lightning_shampoo4.callbacks.QuantizedStateMonitor"


def test_checkpoint_hparams_are_plain_and_restore_the_optimizer(tmp_path):
    trainer, module = fit(tiny("digits_cnn", "optimizer.variant=8bit", "model.label_smoothing=0.1"))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["hyper_parameters"]["optimizer"]["variant"] == "8bit"
    restored = ImageClassifier.load_from_checkpoint(path)
    assert restored.optimizer_config == module.optimizer_config and restored.label_smoothing == 0.1


# -- YAML and tables -----------------------------------------------------------------------------
def test_yaml_folder_matches_the_registry_exactly():
    folder = REPO / "recipes"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == list_recipes()
    assert out_of_date(folder) == [], "run: python -m lightning_shampoo4.recipes.export recipes/"
    for name in list_recipes():
        text = (folder / f"{name}.yaml").read_text()
        assert text == recipe_yaml(get_recipe(name))
        assert yaml.safe_load(text) == cli_config(get_recipe(name))


def test_export_writes_and_checks(tmp_path):
    from lightning_shampoo4.recipes.export import main

    assert main([str(tmp_path), "--check"]) == 1
    assert main([str(tmp_path)]) == 0 and main([str(tmp_path), "--check"]) == 0
    (tmp_path / "digits_mlp.yaml").write_text("# edited\n")
    assert main([str(tmp_path), "--check"]) == 1


def test_recipe_table_lists_every_recipe_with_paper_numbers():
    table = recipe_table()
    for name in list_recipes():
        assert name in table
    assert "78.98 / 79.71 / 79.17" in table  # ResNet-34 CIFAR-100: SGDM / 32-bit / 4-bit
    assert recipe_table(markdown=True).startswith("| recipe |")


def test_docs_table_is_current():
    docs = (REPO / "docs" / "recipes.md").read_text()
    assert recipe_table(markdown=True) in docs, "paste recipe_table(markdown=True) into docs/recipes.md"
