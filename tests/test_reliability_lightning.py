"""Reliability of the Lightning side: resuming with another run length, callbacks reused across
fits, where the monitor's metrics land, parameter-name patterns without names, import cost and
clean command-line errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_shampoo4.callbacks import PreconditionerSchedule, QuantizedStateMonitor
from lightning_shampoo4.cli import ShampooCLI, main
from lightning_shampoo4.configure import GroupedShampoo4bit, configure_shampoo
from lightning_shampoo4.optim import Shampoo4bit

QUIET = dict(
    accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
    enable_model_summary=False, limit_val_batches=0,
)  # fmt: skip


def _loader(n=32, batch_size=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return DataLoader(TensorDataset(x, x[:, :3].argmax(1)), batch_size=batch_size)


class Tiny(pl.LightningModule):
    def __init__(self, schedule="none", **shampoo):
        super().__init__()
        self.net = nn.Linear(6, 3)
        self.schedule = schedule
        self.shampoo = {"stat_interval": 1, "root_interval": 2, **shampoo}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return configure_shampoo(self, lr=0.1, schedule=self.schedule, **self.shampoo)


class LRRecorder(Callback):
    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


# -- 12: resuming with a longer run ---------------------------------------------------------
def test_resume_with_more_epochs_follows_the_new_schedule_length(tmp_path):
    """4 steps of a 4-step cosine, then resumed to 8 steps: the extra steps follow an 8-step cosine
    (not lr 0), exactly as an uninterrupted 8-step run does from step 4 on."""
    full = LRRecorder()
    pl.Trainer(max_epochs=2, callbacks=[full], **QUIET).fit(Tiny("cosine"), _loader())

    first = LRRecorder()
    trainer = pl.Trainer(max_epochs=1, callbacks=[first], **QUIET)
    trainer.fit(Tiny("cosine"), _loader())
    ckpt = tmp_path / "short.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = LRRecorder()
    trainer = pl.Trainer(max_epochs=2, callbacks=[resumed], **QUIET)
    with pytest.warns(UserWarning, match="total_steps 4 -> 8"):
        trainer.fit(Tiny("cosine"), _loader(), ckpt_path=ckpt)
    assert len(first.lrs) == 4 and len(resumed.lrs) == 4
    assert resumed.lrs == pytest.approx(full.lrs[4:])
    assert all(lr > 0 for lr in resumed.lrs)
    assert trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0].total_steps == 8


# -- 13: a PreconditionerSchedule reused across fits ---------------------------------------------
def test_preconditioner_schedule_reused_across_fits_starts_from_the_new_optimizer():
    schedule = PreconditionerSchedule({3: {"root_interval": 4}})
    pl.Trainer(max_steps=2, callbacks=[schedule], **QUIET).fit(Tiny(stat_interval=1, root_interval=2), _loader())
    trainer = pl.Trainer(max_steps=2, callbacks=[schedule], **QUIET)
    trainer.fit(Tiny(stat_interval=3, root_interval=6), _loader())
    group = trainer.optimizers[0].param_groups[0]
    assert (group["stat_interval"], group["root_interval"]) == (3, 6)  # before the threshold: configured values


# -- 14: where QuantizedStateMonitor's metrics land --------------------------------------------------
class Boring(BoringModel):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("batch", float(batch_idx))
        return out

    def configure_optimizers(self):
        return Shampoo4bit(self.parameters(), lr=0.01, stat_interval=1, root_interval=2, min_quant_numel=4)


def test_monitor_metrics_reach_callback_metrics_at_lightnings_step(tmp_path):
    monitor = QuantizedStateMonitor(every_n_steps=2)
    stop = EarlyStopping(monitor="shampoo/bytes/total", check_on_train_epoch_end=True, patience=10)
    trainer = pl.Trainer(
        **{**QUIET, "logger": CSVLogger(tmp_path, name="logs")},
        max_epochs=1, limit_train_batches=4, log_every_n_steps=1, callbacks=[monitor, stop],
    )  # fmt: skip
    trainer.fit(Boring())
    assert "shampoo/steps" in trainer.callback_metrics and "shampoo/root_nre" in trainer.callback_metrics
    assert float(trainer.callback_metrics["shampoo/steps"]) == 4
    (path,) = tmp_path.glob("logs/version_*/metrics.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    step_of_batch = {int(float(r["batch"])): int(r["step"]) for r in rows if r.get("batch")}
    logged = {int(float(r["shampoo/steps"])): int(r["step"]) for r in rows if r.get("shampoo/steps")}
    # optimizer step k is taken on batch k - 1
    assert logged == {2: step_of_batch[1], 4: step_of_batch[3]}


# -- 15: name patterns need names ---------------------------------------------------------------------
def test_grouped_optimizer_refuses_patterns_without_names():
    module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no_weight_decay.*named_parameters\(\)"):
        GroupedShampoo4bit(module.parameters(), no_weight_decay=["0.*"])
    with pytest.raises(ValueError, match=r"no_precondition.*named_parameters\(\)"):
        GroupedShampoo4bit([{"params": list(module.parameters())}], no_precondition=["1.weight"])
    opt = GroupedShampoo4bit(module.named_parameters(), no_precondition=["1.weight"])  # names: fine
    assert [g.get("precondition", True) for g in opt.param_groups].count(False) == 1
    assert len(GroupedShampoo4bit(module.parameters()).param_groups) == 2  # no patterns: shapes only


# -- 16: the optimizer does not import Lightning ----------------------------------------------------------
def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=env
    )


def test_importing_the_package_and_optimizer_leaves_lightning_out():
    run = _python(
        """
        import sys
        import lightning_shampoo4, lightning_shampoo4.optim, lightning_shampoo4.configure
        assert lightning_shampoo4.Shampoo4bit is lightning_shampoo4.optim.Shampoo4bit
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")))
        """
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize("lightning_first", [False, True], ids=["package-first", "lightning-first"])
def test_lightning_cli_short_names_after_importing_the_package(lightning_first):
    imports = ["import lightning_shampoo4", "from lightning.pytorch.cli import LightningCLI"]
    run = _python(
        "\n".join(imports[::-1] if lightning_first else imports)
        + """
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
args = ["--optimizer=Shampoo4bit", "--trainer.callbacks+=QuantizedStateMonitor"]
args += ["--trainer.callbacks+=ShampooPrecision", "--trainer.callbacks+=PreconditionerSchedule", "--trainer.callbacks.warmup_steps=2"]
args += ["--trainer.callbacks.warmup_root_interval=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
cli = LightningCLI(BoringModel, BoringDataModule, args=args, run=False, save_config_callback=None)
print(cli.config["optimizer"]["class_path"])
print(" ".join(type(c).__name__ for c in cli.trainer.callbacks[:3]))
"""
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[:2] == [
        "lightning_shampoo4.Shampoo4bit",
        "QuantizedStateMonitor ShampooPrecision PreconditionerSchedule",
    ]


# -- 17: the command's listing filter and argument errors --------------------------------------------
def test_list_recipes_matches_substrings_and_reports_no_match(capsys):
    assert main(["list-recipes", "vit"]) == 0
    out = capsys.readouterr().out
    assert "vit_small_cifar10" in out and "vit_small_cifar100" in out and "resnet34_cifar10" not in out
    assert main(["list-recipes", "nothing_like_this"]) != 0
    captured = capsys.readouterr()
    assert "no recipe matches 'nothing_like_this'" in captured.err and "digits_cnn" in captured.err
    assert captured.out == ""


def test_bad_callback_argument_is_one_error_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["lightning-shampoo4"])
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--trainer.callbacks+=PreconditionerSchedule", "--trainer.callbacks.warmup_steps=-1"]
    assert main([*args, "--trainer.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Union subtypes" not in err
    assert err.strip().splitlines()[-1] == (
        "lightning-shampoo4: error: PreconditionerSchedule: warmup_steps=-1 must be an integer >= 0"
    )


def test_internal_errors_keep_their_traceback(monkeypatch, tmp_path):
    """Only argument validation is turned into one line; anything else propagates."""
    monkeypatch.setattr(sys, "argv", ["lightning-shampoo4"])
    monkeypatch.chdir(tmp_path)

    def broken(*args, **kwargs):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(PreconditionerSchedule, "settings_for", broken)
    args = ["fit", "--trainer.callbacks+=PreconditionerSchedule", "--trainer.callbacks.warmup_steps=1"]
    args += ["--trainer.callbacks.warmup_root_interval=1", "--trainer.max_steps=1", "--trainer.limit_val_batches=0"]
    with pytest.raises(ZeroDivisionError):
        main([*args, "--trainer.enable_progress_bar=false", "--trainer.logger=false"])



def test_fit_summary_asks_for_the_log_dir_on_every_rank(capsys):
    """``trainer.log_dir`` broadcasts under DDP: asking on rank 0 only left the other ranks gone."""

    class Trainer:
        is_global_zero = False
        asked = 0

        @property
        def log_dir(self):
            Trainer.asked += 1
            return "logs/version_0"

    cli = ShampooCLI.__new__(ShampooCLI)
    cli.trainer, cli._fit_started = Trainer(), 0.0
    cli.after_fit()
    assert Trainer.asked == 1 and capsys.readouterr().out == ""
