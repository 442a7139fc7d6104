"""The ``lightning-shampoo4`` command: default run and summary, --recipe, overrides, YAML configs,
--help / --print_config, listing, and clean errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_shampoo4.cli import ShampooCLI, main, requested_recipe
from lightning_shampoo4.data import CIFAR100DataModule, DigitsDataModule, SyntheticDataModule
from lightning_shampoo4.recipes import get_recipe, list_recipes

REPO = Path(__file__).resolve().parents[1]
SHORT = ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch, tmp_path):
    """LightningCLI warns when both sys.argv and args are given; run in a scratch directory."""
    monkeypatch.setattr(sys, "argv", ["lightning-shampoo4"])
    monkeypatch.chdir(tmp_path)


def cli(*args: str) -> ShampooCLI:
    """Parse and instantiate without running (no subcommand)."""
    return ShampooCLI(args=list(args), run=False)


# -- running ----------------------------------------------------------------------------------------
def test_default_fit_ends_with_the_summary(capsys, tmp_path):
    assert main(["fit", *SHORT, "--trainer.default_root_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    summary = out[out.index("lightning-shampoo4 fit summary") :]
    assert "recipe            digits_cnn: small_cnn on DigitsDataModule" in summary
    assert "4-bit Shampoo (cholesky, 8-bit statistic) + AdamW" in summary and "val/acc" in summary
    # the storage the run used, with the optimizer's own (benchmarked) settings
    assert ("storage           bits=4 moment_bits=32 storage=cholesky statistic_bits=8 error_feedback=False "
            "codebook=linear1.5 block_size=1200 root_block_size=40 scale_dtype=bfloat16 min_quant_numel=4096 "
            "max_order=1200") in summary
    for line in ("optimizer state", "second-order", "moments", "AdamW would keep", "32-bit Shampoo"):
        assert line in summary
    params = sum(p.numel() * 4 for p in get_recipe().build_module().parameters())
    assert f"{2 * params:,} B" in summary  # AdamW: exactly 2 fp32 moments per parameter


def test_console_script_runs_the_default_recipe(tmp_path):
    script = shutil.which("lightning-shampoo4")
    command = [script] if script else [sys.executable, "-m", "lightning_shampoo4.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [*command, "fit", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fit summary" in result.stdout and "AdamW would keep" in result.stdout
    assert "Epoch 0" in result.stdout + result.stderr  # the progress bar


def test_recipe_flag_picks_the_recipe(capsys, tmp_path):
    assert main(["fit", "--recipe", "digits_mlp", *SHORT, "--trainer.default_root_dir", str(tmp_path)]) == 0
    assert "digits_mlp: mlp on DigitsDataModule" in capsys.readouterr().out


def test_quantized_moments_run_reports_less_than_adamw(capsys, tmp_path):
    args = ["fit", "--optimizer.moment_bits", "4", *SHORT, "--trainer.default_root_dir", str(tmp_path)]
    assert main(args) == 0
    summary = capsys.readouterr().out.split("lightning-shampoo4 fit summary")[-1]
    assert "optimizer         4-bit Shampoo (cholesky, 8-bit statistic) + 4-bit AdamW" in summary
    assert "moment_bits=4" in summary
    assert "(4-bit codes + scales; small tensors dense)" in summary
    total = int(re.search(r"optimizer state   ([\d,]+) B", summary).group(1).replace(",", ""))
    moments = int(re.search(r"moments         ([\d,]+) B", summary).group(1).replace(",", ""))
    numel = sum(p.numel() for p in get_recipe().build_module().parameters())
    ratio = float(re.search(r"this run: ([\d.]+)x AdamW", summary).group(1))
    assert moments < 2 * 4 * numel / 4  # codes + scales of two moments: far below fp32 AdamW's
    assert ratio == pytest.approx(total / (8 * numel), abs=0.005) and ratio < 1.0


def test_first_order_run_reports_its_state(capsys, tmp_path):
    args = ["fit", "--optimizer.variant", "first_order", *SHORT, "--trainer.default_root_dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "optimizer         AdamW" in out and "this run: 1.00x AdamW" in out


# -- configuration ----------------------------------------------------------------------------------
def test_defaults_are_the_default_recipe():
    c = cli()
    recipe = get_recipe()
    assert c.config.recipe == "digits_cnn" and c.config.seed_everything == recipe.seed
    assert isinstance(c.datamodule, DigitsDataModule) and c.datamodule.augment
    assert c.model.optimizer_config == recipe.optimizer and c.model.schedule_config == recipe.schedule
    assert c.trainer.max_epochs == recipe.trainer.max_epochs


def test_flags_override_any_recipe_field():
    c = cli(
        "--recipe", "vit_small_cifar100",
        "--optimizer.variant", "32bit", "--optimizer.lr", "0.002", "--optimizer.betas", "[0.8, 0.9]",
        "--schedule.name", "step", "--model.width", "0.0625", "--model.arch_kwargs", "{drop_path_rate: 0.2}",
        "--data.batch_size", "16", "--data.data_dir", "/nowhere", "--trainer.max_epochs", "1", "--seed_everything", "3",
    )
    o = c.model.optimizer_config
    assert (o.variant, o.lr, o.betas, o.weight_decay) == ("32bit", 0.002, (0.8, 0.9), 0.05)
    assert c.model.schedule_config.name == "step" and c.model.hparams.arch_kwargs == {"drop_path_rate": 0.2}
    assert isinstance(c.datamodule, CIFAR100DataModule) and c.datamodule.batch_size == 16
    assert c.model.hparams.num_classes == 100 and c.trainer.max_epochs == 1 and c.config.seed_everything == 3


def test_data_can_be_swapped_and_the_model_follows():
    c = cli("--recipe", "resnet34_cifar10", "--data", "SyntheticDataModule", "--data.num_classes", "7", "--model.width", "0.0625")
    assert isinstance(c.datamodule, SyntheticDataModule)
    assert c.model.hparams.num_classes == 7 and c.model.hparams.in_chans == 3 and c.model.hparams.img_size == 32


@pytest.mark.parametrize("name", list_recipes())
def test_yaml_config_equals_the_recipe(name):
    """``--config recipes/<name>.yaml`` and ``--recipe <name>`` configure the same run as the registry."""
    recipe = get_recipe(name)
    by_file = cli("--config", str(REPO / "recipes" / f"{name}.yaml"), "--model.width", "0.0625")
    by_name = cli("--recipe", name, "--model.width", "0.0625")
    for c in (by_file, by_name):
        assert c.config.recipe == name
        assert c.model.optimizer_config == recipe.optimizer and c.model.schedule_config == recipe.schedule
        assert (c.model.hparams.arch, dict(c.model.hparams.arch_kwargs)) == (recipe.model.arch, recipe.model.arch_kwargs)
        assert type(c.datamodule).__name__.lower().startswith(recipe.data.name)
        assert {k: getattr(c.datamodule, k) for k in recipe.data.kwargs} == recipe.data.kwargs
        assert c.trainer.max_epochs == recipe.trainer.max_epochs
        assert len(c.trainer.callbacks) >= len(recipe.callbacks)
    assert by_file.parser.dump(by_file.config) == by_name.parser.dump(by_name.config)


def test_recipe_key_in_a_partial_config_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("recipe: digits_mlp\noptimizer:\n  variant: 8bit\ntrainer:\n  max_epochs: 2\n")
    c = cli("--config", str(path))
    assert c.model.hparams.arch == "mlp" and c.model.optimizer_config.variant == "8bit"
    assert c.model.optimizer_config.lr == get_recipe("digits_mlp").optimizer.lr and c.trainer.max_epochs == 2
    assert requested_recipe(["fit", "--recipe", "a", f"--config={path}"]) == "digits_mlp"
    assert requested_recipe(["fit", "--config", str(path), "--recipe=b"]) == "b"


def test_print_config_round_trips(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--recipe", "swin_tiny_cifar100", "--optimizer.variant", "naive4bit", "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["recipe"] == "swin_tiny_cifar100" and config["optimizer"]["variant"] == "naive4bit"
    assert config["data"]["class_path"] == "lightning_shampoo4.data.CIFAR100DataModule"
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path), "--print_config"])
    assert capsys.readouterr().out == printed


def test_help_lists_recipe_optimizer_and_schedule(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--recipe", "--optimizer.variant", "--optimizer.stat_interval", "--schedule.name", "--model.arch", "--data"):
        assert flag in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "list-recipes" in capsys.readouterr().out


# -- listing and errors -----------------------------------------------------------------------------
def test_list_recipes_subcommand_and_flag(capsys):
    assert main(["list-recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_recipes())
    with pytest.raises(SystemExit) as exit_:
        main(["--list-recipes", "vit*"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "vit_small_cifar100" in out and "resnet34_cifar100" not in out


def test_missing_cifar_dir_is_one_clear_error(capsys, tmp_path):
    args = ["fit", "--recipe", "resnet34_cifar100", "--data.data_dir", str(tmp_path / "nope"), "--model.width", "0.0625"]
    assert main(args) == 1
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("lightning-shampoo4: error: CIFAR-100 data not found")
    assert "cifar-100-python.tar.gz" in last and "Traceback" not in captured.err


def test_unknown_recipe_and_option_suggest(capsys):
    assert main(["fit", "--recipe", "resnet34_cifar"]) == 2
    assert "did you mean 'resnet34_cifar10'" in capsys.readouterr().err.lower()
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--optimizer.bitz", "4"])
    assert exit_.value.code == 2
    assert "did you mean --optimizer.bits" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--optimizer.variant", "4bt"])
    assert "first_order" in capsys.readouterr().err


def test_validate_from_checkpoint(capsys, tmp_path):
    assert main(["fit", *SHORT, "--trainer.default_root_dir", str(tmp_path)]) == 0
    ckpt = next(tmp_path.rglob("*.ckpt"))
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["optimizer"]["variant"] == "4bit"
    capsys.readouterr()
    assert main(["validate", "--ckpt_path", str(ckpt), "--trainer.limit_val_batches", "2",
                 "--trainer.default_root_dir", str(tmp_path)]) == 0
    assert "val/acc" in capsys.readouterr().out


def test_soap_variant_runs_and_its_summary_names_it(capsys):
    assert main(["fit", "--optimizer.variant", "soap4bit", *SHORT]) == 0
    summary = capsys.readouterr().out.split("lightning-shampoo4 fit summary")[-1]
    assert "optimizer         4-bit SOAP" in summary
    assert "storage           max_precondition_dim=256 large_dims=block bits=4 moment_bits=8" in summary
