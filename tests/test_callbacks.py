"""The callbacks: PreconditionerSchedule, QuantizedStateMonitor, ShampooPrecision (arguments,
trainer checks, what they log or change, and when)."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_shampoo4.callbacks import PreconditionerSchedule, QuantizedStateMonitor, ShampooPrecision
from lightning_shampoo4.configure import configure_shampoo
from lightning_shampoo4.optim import Shampoo4bit
from lightning_shampoo4.strategies import UnsupportedStrategyError



class Net(pl.LightningModule):
    """Two layers with quantized factors (min_quant_numel=64) and a vector bias."""

    def __init__(self, bad_steps=(), bad_value=math.inf, **shampoo):
        super().__init__()
        self.body = nn.Linear(12, 16)
        self.head = nn.Linear(16, 10, bias=False)
        self.shampoo = {"lr": 0.01, "min_quant_numel": 64, "stat_interval": 1, "root_interval": 2, **shampoo}
        self.bad_steps = set(bad_steps)  # batch indices whose body gradient is poisoned
        self.bad_value = bad_value

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.head(torch.tanh(self.body(x))), y)
        self.log("train_loss", loss)
        return loss

    def on_after_backward(self):
        if self.trainer.global_step in self.bad_steps:
            self.body.weight.grad[0, 0] = self.bad_value

    def configure_optimizers(self):
        return Shampoo4bit(self.parameters(), **self.shampoo)


def _loader(n=64, batch_size=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    return DataLoader(TensorDataset(x, x[:, :10].argmax(1)), batch_size=batch_size)


def _trainer(tmp_path=None, **kwargs):
    defaults = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_steps=4, limit_val_batches=0,
    )  # fmt: skip
    if tmp_path is not None:
        defaults["logger"] = CSVLogger(tmp_path, name="logs")
    return pl.Trainer(**{**defaults, **kwargs})


class Recorder(Callback):
    """Per optimizer step: counters and the group settings the step ran with."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        g = opt.param_groups[0]
        steps = {n: int(opt.state[p]["step"]) if opt.state[p] else 0 for n, p in pl_module.named_parameters()}
        self.rows.append(
            dict(
                counters=dict(opt.counters), stat=g["stat_interval"], root=g["root_interval"],
                start=g["start_preconditioning_step"], dtype=g["precondition_dtype"], param_steps=steps,
            )
        )  # fmt: skip


def _root_update_steps(rows, per_update):
    """Optimizer steps (1-based) in which root updates happened."""
    out, before = [], 0
    for i, row in enumerate(rows, start=1):
        if row["counters"]["root_updates"] > before:
            assert row["counters"]["root_updates"] - before == per_update
            out.append(i)
        before = row["counters"]["root_updates"]
    return out


# -- shared checks -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: QuantizedStateMonitor(every_n_steps=0), "every_n_steps=0"),
        (lambda: QuantizedStateMonitor(errors="yes"), "errors='yes'"),
        (lambda: QuantizedStateMonitor(prefix=3), "prefix=3"),
        (lambda: ShampooPrecision("fp8"), "precondition_dtype='fp8'.*bfloat16"),
        (lambda: PreconditionerSchedule(), "needs a schedule table and/or warmup_steps"),
        (lambda: PreconditionerSchedule({0: {"root_interval": 0}}), r"schedule\[0\]\['root_interval'\]=0"),
        (lambda: PreconditionerSchedule({0: {"lr": 1}}), "sets 'lr'.*stat_interval"),
        (lambda: PreconditionerSchedule({-1: {"root_interval": 2}}), "schedule key -1"),
        (lambda: PreconditionerSchedule({0: {"root_interval": 2}}, unit="batch"), "unit='batch'.*'epoch'"),
        (lambda: PreconditionerSchedule(warmup_steps=10), "warmup_root_interval"),
        (lambda: PreconditionerSchedule(warmup_root_interval=10), "need warmup_steps > 0"),
        (lambda: PreconditionerSchedule(warmup_steps=5, warmup_root_interval=6, warmup_stat_interval=4), "multiple"),
    ],
)
def test_bad_arguments_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


ALL_CALLBACKS = [
    lambda: PreconditionerSchedule(warmup_steps=2, warmup_root_interval=1),
    lambda: QuantizedStateMonitor(every_n_steps=1),
    lambda: ShampooPrecision(),
]


@pytest.mark.parametrize("make", ALL_CALLBACKS, ids=["schedule", "monitor", "precision"])
def test_no_shampoo_optimizer_is_a_clear_error(make):
    trainer = _trainer(max_steps=1, callbacks=[make()])
    with pytest.raises(MisconfigurationException, match="needs a Shampoo4bit( or SOAP4bit)? optimizer.*SGD"):
        trainer.fit(BoringModel())


@pytest.mark.parametrize("make", ALL_CALLBACKS, ids=["schedule", "monitor", "precision"])
@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy])
def test_unsupported_strategy_fails_in_setup(make, strategy):
    # Neither can be built on a CPU-only Trainer; setup only looks at trainer.strategy.
    trainer = SimpleNamespace(strategy=strategy.__new__(strategy), precision="32-true", loggers=[])
    with pytest.raises(UnsupportedStrategyError, match=f"{strategy.__name__}.*ddp"):
        make().setup(trainer, BoringModel(), "fit")


# -- QuantizedStateMonitor -----------------------------------------------------------------
EXPECTED_KEYS = [
    *(f"bytes/{k}" for k in ("moments", "eigenvectors", "eigenvalues", "roots", "scales", "second_order", "total")),
    "bytes/fp32_shampoo", "compression_ratio", "bytes/adamw_fp32", "memory_vs_adamw", "factors", "quantized_factors",
    "eigvec_orth_error", "eigvec_orth_error_max", "eigvec_orth_error_rectified", "eigvec_orth_error_rectified_max",
    "eigvec_nre", "eigvec_nre_max", "root_nre", "root_nre_max", "eigval_min", "eigval_max", "condition_max",
    "steps", "stat_updates", "root_updates", "skipped_nonfinite", "retried_updates", "failed_updates",
    "time_stats_s", "time_roots_s", "stat_interval", "root_interval",
]  # fmt: skip


def _metrics(tmp_path):
    (path,) = tmp_path.glob("logs/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def test_monitor_logs_every_key_with_finite_values(tmp_path):
    monitor = QuantizedStateMonitor(every_n_steps=2)
    trainer = _trainer(tmp_path, max_steps=4, callbacks=[monitor], log_every_n_steps=1)
    trainer.fit(Net(storage="eigenvectors"), _loader())  # the mode with every key
    rows = [r for r in _metrics(tmp_path) if r.get("shampoo/steps")]
    assert [int(r["step"]) for r in rows] == [1, 3]  # Lightning's step of the batches of optimizer steps 2 and 4
    for row in rows:
        for key in EXPECTED_KEYS:
            assert math.isfinite(float(row[f"shampoo/{key}"])), key
    last = monitor.last_metrics
    assert last["shampoo/steps"] == 4 and last["shampoo/quantized_factors"] == 4  # orders 16, 12, 10, 16: all >= 8
    assert last["shampoo/compression_ratio"] > 1.0
    assert last["shampoo/eigvec_orth_error_rectified"] < last["shampoo/eigvec_orth_error"]
    assert 0 < last["shampoo/root_nre"] < 0.5 and last["shampoo/root_nre"] <= last["shampoo/root_nre_max"]
    assert 0 < last["shampoo/eigval_min"] <= last["shampoo/eigval_max"] and last["shampoo/condition_max"] >= 1
    assert monitor.worst["shampoo/root_nre_max"].split("[")[0] in ("body.weight", "head.weight")
    opt = trainer.optimizers[0]
    assert last["shampoo/bytes/total"] == opt.memory_report()["total"]
    numel = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert last["shampoo/bytes/adamw_fp32"] == 8 * numel
    assert last["shampoo/memory_vs_adamw"] == pytest.approx(last["shampoo/bytes/total"] / (8 * numel))
    assert any("train_loss" in r and r["train_loss"] for r in _metrics(tmp_path))  # user logging unaffected


def test_monitor_costs_nothing_between_its_steps(tmp_path, monkeypatch):
    calls = []
    monitor = QuantizedStateMonitor(every_n_steps=3)
    original = monitor.collect
    monkeypatch.setattr(monitor, "collect", lambda *a, **k: calls.append(1) or original(*a, **k))
    trainer = _trainer(tmp_path, max_steps=7, accumulate_grad_batches=2, callbacks=[monitor])
    trainer.fit(Net(), _loader())  # 14 batches, 7 optimizer steps: logs at optimizer steps 3 and 6
    assert len(calls) == 2 and monitor.state_dict() == {"last_logged_steps": [6]}


@pytest.mark.parametrize(
    "shampoo, present, absent",
    [
        (dict(storage="naive"), ["root_nre"], ["eigvec_nre", "eigvec_orth_error"]),
        (dict(storage="cholesky"), ["root_nre"], ["eigvec_nre", "eigvec_orth_error"]),
        (dict(bits=32), ["eigval_max", "compression_ratio"], ["root_nre", "eigvec_nre"]),
        (dict(min_quant_numel=4096), ["eigval_max"], ["root_nre", "eigvec_orth_error"]),  # nothing quantized
    ],
)
def test_monitor_collect_in_other_modes(shampoo, present, absent):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(16, 12)), nn.Parameter(torch.randn(16))]
    opt = Shampoo4bit(params, **{"min_quant_numel": 64, "stat_interval": 1, "root_interval": 2, **shampoo})
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    metrics = QuantizedStateMonitor().collect(opt, {id(params[0]): "w"}, prefix="")
    assert all(math.isfinite(v) for v in metrics.values())
    assert all(k in metrics for k in present) and not any(k in metrics for k in absent)
    if shampoo.get("bits") == 32:
        assert metrics["compression_ratio"] == pytest.approx(8 * (16**2 + 12**2) / (8 * (16**2 + 12**2)))


@pytest.mark.parametrize("base, moments", [("adamw", ("exp_avg", "exp_avg_sq")), ("sgd", ("momentum_buffer",))])
@pytest.mark.parametrize("moment_bits", [32, 8, 4])
def test_monitor_bytes_count_quantized_moments(base, moments, moment_bits):
    from lightning_shampoo4.quant.moments import moment_bytes

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(96, 80, dtype=torch.bfloat16)), nn.Parameter(torch.randn(96))]
    opt = Shampoo4bit(params, base=base, momentum=0.9, moment_bits=moment_bits, stat_interval=1, root_interval=1)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    metrics = QuantizedStateMonitor(errors=False).collect(opt, {}, prefix="")
    state = opt.state[params[0]]
    expected = sum(moment_bytes(p.numel(), base, moment_bits, p.element_size()) for p in params)
    assert metrics["bytes/moments"] == expected
    if moment_bits != 32:  # the big matrix keeps codes + scales, the bias stays dense
        assert all(f"{m}_codes" in state and f"{m}_absmax" in state and m not in state for m in moments)
        assert all(m in opt.state[params[1]] for m in moments)
    # fp32 AdamW's reference is 8 bytes per element even for bf16 parameters
    assert metrics["bytes/adamw_fp32"] == 8 * (96 * 80 + 96)
    assert metrics["memory_vs_adamw"] == pytest.approx(metrics["bytes/total"] / metrics["bytes/adamw_fp32"])


def test_monitor_skips_first_order_groups_of_configure_shampoo():
    module = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 16))
    opt = configure_shampoo(module, min_quant_numel=64, stat_interval=1, root_interval=1)["optimizer"]
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    metrics = QuantizedStateMonitor().collect(opt, {}, prefix="")
    assert metrics["factors"] == 2  # the Linear's L and R; the embedding's unused factors are left out
    assert metrics["bytes/fp32_shampoo"] == 8 * 2 * 16**2


# -- PreconditionerSchedule ----------------------------------------------------------------
def test_schedule_by_step_changes_intervals_exactly_when_it_says():
    recorder = Recorder()
    table = {0: {"stat_interval": 1, "root_interval": 2}, 4: {"root_interval": 4}, 6: {"root_interval": 1}}
    trainer = _trainer(max_steps=8, callbacks=[PreconditionerSchedule(table), recorder])
    trainer.fit(Net(stat_interval=5, root_interval=10), _loader())
    assert [r["root"] for r in recorder.rows] == [2, 2, 2, 2, 4, 4, 1, 1]
    assert [r["stat"] for r in recorder.rows] == [1] * 8
    assert _root_update_steps(recorder.rows, per_update=4) == [2, 4, 7, 8]  # two weights, L and R each
    assert recorder.rows[-1]["counters"]["stat_updates"] == 8 * 4


def test_schedule_by_epoch_and_start_step():
    recorder = Recorder()
    table = {0: {"start_preconditioning_step": 3}, 1: {"root_interval": 1}, 2: {"root_interval": 4}}
    callback = PreconditionerSchedule(table, unit="epoch")
    trainer = _trainer(max_epochs=3, max_steps=-1, limit_train_batches=2, callbacks=[callback, recorder])
    trainer.fit(Net(), _loader())
    assert [r["root"] for r in recorder.rows] == [2, 2, 1, 1, 4, 4]
    assert [r["start"] for r in recorder.rows] == [3] * 6
    assert _root_update_steps(recorder.rows, per_update=4) == [3, 4]  # nothing before step 3, none at 5, 6
    assert callback.state_dict() == {
        "base": {"0.0": {"stat_interval": 1, "root_interval": 2, "start_preconditioning_step": 0}}
    }


def test_warmup_rule_then_the_configured_intervals():
    recorder = Recorder()
    callback = PreconditionerSchedule(warmup_steps=4, warmup_root_interval=2)
    trainer = _trainer(max_steps=8, callbacks=[callback, recorder])
    trainer.fit(Net(stat_interval=4, root_interval=8), _loader())
    assert [(r["stat"], r["root"]) for r in recorder.rows] == [(2, 2)] * 4 + [(4, 8)] * 4  # stat: gcd(4, 2)
    assert _root_update_steps(recorder.rows, per_update=4) == [2, 4, 8]
    assert recorder.rows[-1]["counters"]["stat_updates"] == 3 * 4  # steps 2 and 4 (warm-up), then 8


def test_schedule_that_breaks_the_multiple_rule_fails_clearly():
    callback = PreconditionerSchedule({1: {"stat_interval": 3}})
    trainer = _trainer(max_steps=3, callbacks=[callback])
    with pytest.raises(ValueError, match="root_interval=2, which is not a multiple of stat_interval=3"):
        trainer.fit(Net(), _loader())


def test_schedule_leaves_first_order_groups_alone():
    class Embedded(Net):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(4, 12)

        def training_step(self, batch, batch_idx):
            x, y = batch
            x = x + self.emb.weight.sum(0)
            return nn.functional.cross_entropy(self.head(torch.tanh(self.body(x))), y)

        def configure_optimizers(self):
            return configure_shampoo(self, **self.shampoo)

    trainer = _trainer(max_steps=2, callbacks=[PreconditionerSchedule({0: {"root_interval": 1}})])
    module = Embedded()
    trainer.fit(module, _loader())
    groups = trainer.optimizers[0].param_groups
    emb_group = next(g for g in groups if any(p is module.emb.weight for p in g["params"]))
    assert emb_group["root_interval"] == 2 and emb_group["precondition"] is False
    assert all(g["root_interval"] == 1 for g in groups if g is not emb_group)


# -- ShampooPrecision ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "precision, arg, expected",
    [("bf16-mixed", None, "bfloat16"), ("32-true", None, "float32"), ("bf16-mixed", "float32", "float32")],
)
def test_precision_sets_the_preconditioning_dtype(precision, arg, expected):
    recorder = Recorder()
    callback = ShampooPrecision(arg)
    trainer = _trainer(max_steps=3, precision=precision, callbacks=[callback, recorder])
    trainer.fit(Net(), _loader())
    assert [r["dtype"] for r in recorder.rows] == [expected] * 3
    assert trainer.optimizers[0].counters["root_updates"] > 0
    assert callback.state_dict() == {"precision": precision, "precondition_dtype": expected}


def test_grad_scaler_skipped_step_does_not_advance_the_preconditioner():
    """16-mixed with a GradScaler: an inf gradient makes the scaler skip optimizer.step()."""
    recorder = Recorder()
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**4))
    trainer = _trainer(max_steps=5, plugins=[plugin], callbacks=[ShampooPrecision(), recorder])
    trainer.fit(Net(bad_steps={2}), _loader())
    rows = recorder.rows
    assert rows[0]["dtype"] == "float32"
    assert [r["counters"]["steps"] for r in rows] == [1, 2, 2, 3, 4]  # the third batch did not step
    assert rows[2]["param_steps"] == rows[1]["param_steps"] == {"body.weight": 2, "body.bias": 2, "head.weight": 2}
    assert rows[2]["counters"] == rows[1]["counters"]  # no statistics, no roots, nothing skipped inside
    assert rows[-1]["counters"]["skipped_nonfinite"] == 0
    assert plugin.scaler.get_scale() < 2.0**4  # the scaler saw the inf and backed off
    state = trainer.optimizers[0].state
    assert all(
        torch.isfinite(v).all()
        for s in state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.is_floating_point()
    )


def test_nonfinite_gradient_without_scaler_is_skipped_by_the_optimizer():
    """bf16-mixed has no scaler: the optimizer itself skips the poisoned step and counts it."""
    recorder = Recorder()
    trainer = _trainer(max_steps=4, precision="bf16-mixed", callbacks=[ShampooPrecision(), recorder])
    trainer.fit(Net(bad_steps={1}, bad_value=math.nan), _loader())
    rows = recorder.rows
    # the whole step is skipped, so every parameter keeps the same step count
    assert rows[1]["param_steps"]["body.weight"] == 1 and rows[1]["param_steps"]["head.weight"] == 1
    # the interval clock counts the skipped call too
    assert rows[-1]["counters"]["skipped_nonfinite"] == 1 and rows[-1]["counters"]["steps"] == 4
    state = trainer.optimizers[0].state
    assert all(
        torch.isfinite(v).all()
        for s in state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.is_floating_point()
    )


def test_monitor_logs_soap4bit_bytes_and_counters(tmp_path):
    from lightning_shampoo4 import SOAP4bit

    class SoapNet(Net):
        def configure_optimizers(self):
            return SOAP4bit(self.parameters(), lr=0.01, precondition_frequency=2, min_quant_numel=64)

    monitor = QuantizedStateMonitor(every_n_steps=2)
    trainer = _trainer(callbacks=[monitor])
    trainer.fit(SoapNet(), _loader())
    last = monitor.last_metrics
    assert last["shampoo/steps"] == 4 and last["shampoo/refreshes"] >= 1 and last["shampoo/skipped_nonfinite"] == 0
    assert last["shampoo/bytes/total"] > 0 and 0 < last["shampoo/memory_vs_adamw"]
    assert "shampoo/root_nre" not in last  # Shampoo4bit's factor metrics only
