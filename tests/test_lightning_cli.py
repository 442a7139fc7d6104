"""LightningCLI: ``--optimizer Shampoo4bit`` (short name after import, full path without import),
every constructor argument on the command line and in YAML, ``--lr_scheduler``, ``--help``;
and the snippets of docs/lightning.md, run as written."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
from torch import nn

from lightning_shampoo4.callbacks import PreconditionerSchedule, QuantizedStateMonitor
from lightning_shampoo4.data import DigitsDataModule
from lightning_shampoo4.models import create_model
from lightning_shampoo4.optim import Shampoo4bit

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "lightning.md"



QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.accelerator=cpu",
]

# A non-default value for every Shampoo4bit argument (CLI spelling) and what it parses to.
ALL_ARGS = {
    "lr": ("0.02", 0.02),
    "betas": ("[0.8, 0.95]", (0.8, 0.95)),
    "eps": ("1e-07", 1e-7),
    "weight_decay": ("0.01", 0.01),
    "momentum": ("0.8", 0.8),
    "nesterov": ("true", True),
    "base": ("sgd", "sgd"),
    "bits": ("8", 8),
    "storage": ("eigenvectors", "eigenvectors"),
    "statistic_bits": ("8", 8),
    "error_feedback": ("false", False),
    "codebook": ("dynamic", "dynamic"),
    "block_size": ("32", 32),
    "root_block_size": ("128", 128),
    "scale_dtype": ("float16", "float16"),
    "moment_bits": ("8", 8),
    "min_quant_numel": ("16", 16),
    "max_order": ("64", 64),
    "shampoo_beta": ("0.9", 0.9),
    "matrix_eps": ("1e-05", 1e-5),
    "stat_interval": ("2", 2),
    "root_interval": ("4", 4),
    "bjorck_steps": ("[2, 3]", (2, 3)),
    "root_method": ("eigen", "eigen"),
    "kernel_backend": ("torch", "torch"),
    "precondition_dtype": ("bfloat16", "bfloat16"),
    "start_preconditioning_step": ("1", 1),
    "precondition": ("false", False),
    "distributed": ("off", "off"),  # optimizer-wide: attributes, not group defaults
    "distributed_dtype": ("bfloat16", "bfloat16"),
}
OPTIMIZER_WIDE = ("distributed", "distributed_dtype")


def _setting(opt: Shampoo4bit, name: str):
    return getattr(opt, name) if name in OPTIMIZER_WIDE else opt.defaults[name]


def _shampoo_args() -> set[str]:
    """The arguments, less the renamed ones still accepted for a release (tested on their own)."""
    deprecated = {s.name for s in Shampoo4bit.SETTINGS.settings if s.deprecated}
    return {n for n in inspect.signature(Shampoo4bit.__init__).parameters if n not in ("self", "params", *deprecated)}


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when both ``args`` and a command line are given; the command line is pytest's."""
    monkeypatch.setattr(sys, "argv", ["train.py"])


def _cli(model, data, args, **kwargs) -> LightningCLI:
    return LightningCLI(model, data, args=args, save_config_callback=None, **kwargs)


def _optimizer(cli: LightningCLI) -> Shampoo4bit:
    out = cli.model.configure_optimizers()
    opt = out[0][0] if isinstance(out, tuple) else out
    assert isinstance(opt, Shampoo4bit)
    return opt


def test_every_argument_is_listed():
    assert set(ALL_ARGS) == _shampoo_args(), "a Shampoo4bit argument is missing from the CLI test"


def test_short_name_after_import_and_every_argument(tmp_path):
    args = ["--optimizer", "Shampoo4bit"] + [f"--optimizer.{k}={v}" for k, (v, _) in ALL_ARGS.items()]
    cli = _cli(BoringModel, BoringDataModule, args, run=False)
    assert cli.config["optimizer"]["class_path"] == "lightning_shampoo4.Shampoo4bit"
    opt = _optimizer(cli)
    for name, (_, value) in ALL_ARGS.items():
        assert _setting(opt, name) == value, name


def test_yaml_config_sets_every_argument(tmp_path):
    lines = ["optimizer:", "  class_path: lightning_shampoo4.Shampoo4bit", "  init_args:"]
    lines += [f"    {k}: {v}" for k, (v, _) in ALL_ARGS.items()]
    config = tmp_path / "shampoo.yaml"
    config.write_text("\n".join(lines) + "\n")
    cli = _cli(BoringModel, BoringDataModule, [f"--config={config}"], run=False)
    opt = _optimizer(cli)
    for name, (_, value) in ALL_ARGS.items():
        assert _setting(opt, name) == value, name


def test_the_old_quantize_spelling_still_works():
    with pytest.warns(DeprecationWarning, match="storage='naive'"):
        cli = _cli(BoringModel, BoringDataModule, ["--optimizer=Shampoo4bit", "--optimizer.quantize=preconditioner"],
                   run=False)
        opt = _optimizer(cli)
    assert opt.param_groups[0]["storage"] == "naive" and "quantize" not in opt.param_groups[0]


def test_bad_value_is_rejected_with_the_allowed_choices(capsys):
    with pytest.raises(SystemExit):
        _cli(BoringModel, BoringDataModule, ["--optimizer=Shampoo4bit", "--optimizer.bits=3"], run=False)
    err = capsys.readouterr().err
    assert "bits" in err and "8" in err


def test_fit_with_lr_scheduler(tmp_path):
    args = ["fit", "--optimizer=Shampoo4bit", "--optimizer.lr=0.1", "--optimizer.stat_interval=1"]
    args += ["--optimizer.root_interval=2", "--lr_scheduler=StepLR", "--lr_scheduler.step_size=1"]
    args += ["--lr_scheduler.gamma=0.5", "--trainer.max_epochs=2", "--trainer.limit_train_batches=2"]
    args += ["--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path}", *QUIET]
    cli = _cli(BoringModel, BoringDataModule, args)
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, Shampoo4bit)
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.optimizer is opt
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)  # stepped once per epoch
    assert opt.counters["steps"] == 4 and opt.counters["root_updates"] == 2 * 2  # one 32x2 weight: L and R


def test_callbacks_by_short_name_and_yaml_table(tmp_path):
    config = tmp_path / "callbacks.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: PreconditionerSchedule\n      init_args:\n"
        "        schedule: {0: {stat_interval: 1, root_interval: 2}, 4: {root_interval: 4}}\n"
    )
    args = ["--optimizer=Shampoo4bit", f"--config={config}", "--trainer.callbacks+=QuantizedStateMonitor"]
    args += ["--trainer.callbacks.every_n_steps=5", "--trainer.callbacks+=ShampooPrecision"]
    cli = _cli(BoringModel, BoringDataModule, args, run=False)
    schedule, monitor, precision = cli.trainer.callbacks[:3]
    assert schedule.table == {0: {"stat_interval": 1, "root_interval": 2}, 4: {"root_interval": 4}}
    assert monitor.every_n_steps == 5 and type(precision).__name__ == "ShampooPrecision"


def test_help_documents_the_arguments(capsys):
    with pytest.raises(SystemExit) as exit_:
        _cli(BoringModel, BoringDataModule, ["fit", "--optimizer.help", "Shampoo4bit"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in _shampoo_args():
        assert f"--optimizer.{name}" in out
    assert "optimizer steps between statistics updates" in out  # the docstring's Args render
    assert "Literal['adamw', 'sgd']" in out or "{adamw,sgd}" in out
    with pytest.raises(SystemExit):
        _cli(BoringModel, BoringDataModule, ["fit", "--help"])
    assert "Shampoo4bit" in capsys.readouterr().out  # listed among the known optimizers


class DigitsClassifier(pl.LightningModule):
    """A small real module for the CLI: a registered model on the sklearn digits."""

    def __init__(self, model_name: str = "mlp", width: float = 0.25):
        super().__init__()
        self.model = create_model(model_name, num_classes=10, in_chans=1, img_size=8, width=width)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = nn.functional.cross_entropy(self.model(images), labels)
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss


def test_real_module_trains_from_the_cli(tmp_path):
    args = ["fit", "--optimizer=Shampoo4bit", "--optimizer.lr=0.01", "--optimizer.stat_interval=2"]
    args += ["--optimizer.root_interval=4", "--data.batch_size=128", "--trainer.max_steps=12"]
    args += ["--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path}", *QUIET]
    cli = _cli(DigitsClassifier, DigitsDataModule, args)
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, Shampoo4bit) and opt.counters["root_updates"] > 0
    assert opt.memory_report()["factors"] > 0  # the default storage: Cholesky factors
    losses = cli.model.losses
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])


# -- docs/lightning.md ---------------------------------------------------------------------
def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)


def _named_block(lang: str, name: str) -> str:
    for block in _blocks(lang):
        if block.startswith(f"# {name}\n"):
            return block
    raise AssertionError(f"docs/lightning.md has no ```{lang} block starting with '# {name}'")


def _commands(script: str) -> list[list[str]]:
    return [
        line.split()[2:] for b in _blocks("bash") for line in b.splitlines() if line.startswith(f"python {script} ")
    ]


def _load_script(path: Path, monkeypatch) -> dict:
    """Import a snippet file as a real module (jsonargparse inspects classes through their module)."""
    name = f"doc_snippet_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return vars(module)


def test_doc_cli_script_runs_with_no_import_in_a_fresh_interpreter(tmp_path):
    """Way 1 as written: train.py never imports lightning_shampoo4; the full class path resolves."""
    script = tmp_path / "train.py"
    script.write_text(_named_block("python", "train.py"))
    assert "lightning_shampoo4" not in script.read_text()
    fit, help_ = _commands("train.py")
    assert fit[:3] == ["fit", "--optimizer", "lightning_shampoo4.Shampoo4bit"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(script), *fit], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    config = (tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text()
    assert "class_path: lightning_shampoo4.Shampoo4bit" in config and "stat_interval: 4" in config
    assert "class_path: torch.optim.lr_scheduler.StepLR" in config
    assert (tmp_path / "lightning_logs" / "version_0" / "checkpoints").is_dir()


def test_doc_cli_help_and_yaml_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "train.py"
    script.write_text(_named_block("python", "train.py"))
    (tmp_path / "shampoo.yaml").write_text(_named_block("yaml", "shampoo.yaml"))
    ns = _load_script(script, monkeypatch)
    fit, help_ = _commands("train.py")
    with pytest.raises(SystemExit):
        LightningCLI(ns["Classifier"], ns["RandomData"], args=help_)
    assert "--optimizer.root_interval" in capsys.readouterr().out
    args = ["fit", "--config", "shampoo.yaml", "--trainer.limit_train_batches=2", *QUIET[:4]]
    cli = LightningCLI(ns["Classifier"], ns["RandomData"], args=args, save_config_callback=None)
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, Shampoo4bit) and opt.defaults["root_interval"] == 8 and opt.defaults["weight_decay"] == 0.01
    assert isinstance(cli.trainer.lr_scheduler_configs[0].scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert opt.counters["steps"] == 4
    schedule, monitor = (c for c in cli.trainer.callbacks if type(c).__module__.startswith("lightning_shampoo4"))
    assert isinstance(schedule, PreconditionerSchedule) and schedule.warmup_root_interval == 2
    assert isinstance(monitor, QuantizedStateMonitor) and monitor.last_metrics["shampoo/steps"] == 4


def test_doc_dependency_injection_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "inject.py"
    script.write_text(_named_block("python", "inject.py"))
    ns = _load_script(script, monkeypatch)
    (args,) = _commands("inject.py")
    cli = LightningCLI(ns["Model"], ns["BoringDataModule"], args=[*args, *QUIET], save_config_callback=None)
    opt = cli.trainer.optimizers[0]
    assert type(opt).__name__ == "GroupedShampoo4bit" and opt.defaults["lr"] == 0.01
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]  # weight (default 0) and bias (forced 0)
    assert len(opt.param_groups) == 2 and opt.counters["root_updates"] == 2 * 2


@pytest.mark.parametrize("index", [0, 1], ids=["configure_shampoo", "callbacks"])
def test_doc_python_snippets_run_as_written(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snippets = [b for b in _blocks("python") if not b.startswith("# ")]
    assert len(snippets) == 2
    namespace: dict = {"__name__": "__main__"}
    exec(compile(snippets[index], f"docs/lightning.md#{index}", "exec"), namespace)
    trainer = namespace["trainer"]
    opt = trainer.optimizers[0]
    assert isinstance(opt, Shampoo4bit) and opt.counters["root_updates"] > 0
    if index == 0:
        assert trainer.lr_scheduler_configs[0].interval == "step"
        assert len(opt.param_groups) == 2  # weights with decay, biases without
    else:
        assert opt.param_groups[0]["precondition_dtype"] == "bfloat16"
        metrics = (tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
        assert "shampoo/compression_ratio" in metrics and "shampoo/root_nre" in metrics


@pytest.mark.parametrize("spelling", ["SOAP4bit", "lightning_shampoo4.SOAP4bit"])
def test_soap_by_short_name_and_class_path(spelling):
    from lightning_shampoo4 import SOAP4bit

    cli = _cli(BoringModel, BoringDataModule, ["--optimizer", spelling, "--optimizer.lr=0.01",
                                               "--optimizer.precondition_frequency=5"], run=False)
    assert cli.config["optimizer"]["class_path"] == "lightning_shampoo4.SOAP4bit"
    out = cli.model.configure_optimizers()
    opt = out[0][0] if isinstance(out, tuple) else out
    assert isinstance(opt, SOAP4bit) and opt.defaults["lr"] == 0.01 and opt.defaults["precondition_frequency"] == 5
