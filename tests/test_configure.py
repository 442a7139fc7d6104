"""configure_shampoo: parameter groups, the learning-rate schedule, the Lightning return form,
the strategy check, and GroupedShampoo4bit as a LightningCLI ``OptimizerCallable`` default."""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_shampoo4.configure import (
    GroupedShampoo4bit,
    LRSchedule,
    build_lr_scheduler,
    configure_shampoo,
    is_preconditioned,
    shampoo_param_groups,
)
from lightning_shampoo4.optim import Shampoo4bit
from lightning_shampoo4.strategies import UnsupportedStrategyError



class Encoder(nn.Module):
    """Every kind of parameter the grouping rule distinguishes."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(40, 8)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.proj = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.conv = nn.Conv1d(16, 16, 3)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 300)  # a "vocabulary" head with max_precondition_dim=256
        self.rel_bias_table = nn.Parameter(torch.zeros(9, 2))
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)

    def no_weight_decay(self):
        return {"pos_embed"}

    def no_weight_decay_keywords(self):
        return {"rel_bias"}


class Wrapper(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()


def _groups_by_name(module, groups):
    names = {id(p): n for n, p in module.named_parameters()}
    out = {}
    for g in groups:
        key = ("no_decay" if g.get("weight_decay") == 0.0 else "decay", is_preconditioned(g))
        out[key] = sorted(names[id(p)] for p in g["params"])
    return out


def test_param_groups_by_module_type_rank_and_model_names():
    module = Wrapper()
    groups = shampoo_param_groups(module, max_precondition_dim=256, no_weight_decay=["proj.weight"])
    got = _groups_by_name(module, groups)
    e = "encoder."
    assert got[("decay", True)] == [e + "conv.weight"]
    assert got[("no_decay", True)] == sorted(
        e + n
        for n in [
            "bn.bias", "bn.weight", "cls_token", "conv.bias", "head.bias", "norm.bias", "norm.weight",
            "pos_embed", "proj.bias", "proj.weight", "rel_bias_table",
        ]
    )  # fmt: skip
    assert got[("decay", False)] == [e + "head.weight"]  # 300 > max_precondition_dim
    assert got[("no_decay", False)] == [e + "tok.weight"]  # embedding: neither
    for g in groups:
        if not is_preconditioned(g):
            assert "start_preconditioning_step" not in g
        if "weight_decay" in g:
            assert g["weight_decay"] == 0.0
    assert all(p.requires_grad for g in groups for p in g["params"])  # frozen left out


def test_param_groups_options_and_other_inputs():
    module = Encoder()
    groups = shampoo_param_groups(
        module, precondition_embeddings=True, max_precondition_dim=None, no_precondition=["conv.*"]
    )
    got = _groups_by_name(module, groups)
    assert got[("no_decay", True)].count("tok.weight") == 1 and "head.weight" in got[("decay", True)]
    assert got[("decay", False)] == ["conv.weight"]
    # named parameters: names, no layer types; plain parameters: shapes only
    got = _groups_by_name(
        module, shampoo_param_groups(module.named_parameters(), no_weight_decay=["*.weight", "pos_embed", "rel_*"])
    )
    assert set(got) == {("no_decay", True)}
    got = _groups_by_name(module, shampoo_param_groups(module.parameters()))
    assert "tok.weight" in got[("decay", True)] and "norm.weight" in got[("no_decay", True)]
    dicts = [{"params": [module.proj.weight], "lr": 0.1}]
    assert shampoo_param_groups(dicts) == dicts
    with pytest.raises(ValueError, match="params is empty"):
        shampoo_param_groups([])
    with pytest.raises(ValueError, match="max_precondition_dim"):
        shampoo_param_groups(module, max_precondition_dim=0)
    with pytest.raises(ValueError, match="no_weight_decay"):
        shampoo_param_groups(module, no_weight_decay="bias")


def test_groups_work_with_other_torch_optimizers():
    module = Encoder()
    opt = torch.optim.AdamW(shampoo_param_groups(module), weight_decay=0.1)  # extra group keys are ignored
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [
        0.0,
        0.0,
        0.1,
    ]  # the embedding group has no decay and no Shampoo


def test_configure_shampoo_return_forms_and_arguments():
    module = Wrapper()
    out = configure_shampoo(module, lr=0.01, weight_decay=0.05, bits=8, stat_interval=5, root_interval=10)
    assert set(out) == {"optimizer"}
    opt = out["optimizer"]
    assert isinstance(opt, Shampoo4bit) and opt.defaults["bits"] == 8 and opt.defaults["root_interval"] == 10
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.05}
    out = configure_shampoo(module, schedule="cosine", total_steps=100, warmup_steps=10)
    config = out["lr_scheduler"]
    assert config["interval"] == "step" and config["frequency"] == 1
    assert isinstance(config["scheduler"], torch.optim.lr_scheduler.LambdaLR)
    assert config["scheduler"].optimizer is out["optimizer"]
    with pytest.raises(TypeError, match="unknown argument.*'bitz'.*stat_interval"):
        configure_shampoo(module, bitz=4)
    with pytest.raises(ValueError, match="bits=3"):
        configure_shampoo(module, bits=3)
    with pytest.raises(ValueError, match="schedule='linear'.*'cosine'"):
        configure_shampoo(module, schedule="linear")
    with pytest.raises(ValueError, match="needs total_steps"):
        configure_shampoo(module, schedule="cosine")  # no trainer, no total
    with pytest.raises(TypeError, match="pass self"):
        configure_shampoo(module.parameters())


def test_cosine_schedule_values():
    f = LRSchedule("cosine", total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    g = LRSchedule("cosine", total_steps=200, warmup_steps=0.05)
    assert g.warmup_steps == 10 and g(10) == 1.0


def test_step_schedule_values_through_lambda_lr():
    opt = Shampoo4bit([nn.Parameter(torch.zeros(3))], lr=1.0)
    sched = build_lr_scheduler(opt, schedule="step", total_steps=100, milestones=(0.3, 0.6, 0.9), gamma=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[29] == 1.0 and lrs[30] == pytest.approx(0.1) and lrs[59] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.01) and lrs[95] == pytest.approx(0.001)
    assert LRSchedule("step", total_steps=50, milestones=(10, 20), gamma=0.5)(25) == 0.25
    assert LRSchedule("none", warmup_steps=4)(1) == 0.5 and LRSchedule("none", warmup_steps=4)(100) == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule="step", total_steps=10, milestones=(0.6, 0.3)), "strictly increasing"),
        (dict(schedule="step", total_steps=10, milestones=(1.5,)), "milestones=1.5"),
        (dict(schedule="cosine", total_steps=10, warmup_steps=-1), "warmup_steps=-1"),
        (dict(schedule="cosine", total_steps=0), "total_steps=0"),
        (dict(schedule="step", total_steps=10, gamma=0.0), "gamma=0.0"),
        (dict(schedule="cosine", total_steps=10, min_lr_ratio=2), "min_lr_ratio=2"),
        (dict(schedule="none", warmup_steps=0.5), "total_steps is needed"),
    ],
)
def test_schedule_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRSchedule(**kwargs)


class Tiny(pl.LightningModule):
    def __init__(self, **shampoo):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.shampoo = shampoo
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return configure_shampoo(self, **self.shampoo)


def _loader(n=64, batch_size=8):
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)), batch_size=batch_size
    )


def test_total_steps_come_from_the_trainer():
    module = Tiny(lr=0.1, schedule="step", milestones=(0.5,), warmup_steps=0.25, stat_interval=2, root_interval=4)
    trainer = pl.Trainer(
        max_epochs=2, accumulate_grad_batches=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, _loader())  # 8 batches x 2 epochs / 2 accumulated = 8 optimizer steps
    schedule = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert schedule.total_steps == 8 and schedule.warmup_steps == 2 and schedule.milestones == (4,)
    per_step = module.lrs[::2]  # one optimizer step every two batches
    assert per_step == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01])
    assert trainer.optimizers[0].counters["steps"] == 8


def test_unbounded_trainer_needs_total_steps():
    module = Tiny(schedule="cosine")
    module._trainer = pl.Trainer(max_epochs=-1, accelerator="cpu", logger=False)
    with pytest.raises(ValueError, match="total_steps"):
        module.configure_optimizers()


def test_configure_shampoo_refuses_unsupported_strategies():
    module = Tiny()
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(UnsupportedStrategyError, match="FSDPStrategy.*ddp"):
        configure_shampoo(module)


def test_grouped_optimizer_takes_modules_and_parameters():
    module = Encoder()
    opt = GroupedShampoo4bit(module, lr=0.02, weight_decay=0.1, max_precondition_dim=256)
    assert isinstance(opt, Shampoo4bit) and opt.defaults["lr"] == 0.02
    got = _groups_by_name(module, opt.param_groups)
    assert got[("no_decay", False)] == ["tok.weight"] and got[("decay", False)] == ["head.weight"]
    opt = GroupedShampoo4bit(module.parameters(), bits=8)
    assert len(opt.param_groups) == 2 and opt.defaults["bits"] == 8


# -- dependency injection through LightningCLI ---------------------------------------------
class InjectedModel(pl.LightningModule):
    def __init__(self, optimizer: OptimizerCallable = GroupedShampoo4bit, pass_module: bool = False):
        super().__init__()
        self.optimizer = optimizer
        self.pass_module = pass_module
        self.emb = nn.Embedding(10, 4)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(self.emb(x)).pow(2).mean()

    def configure_optimizers(self):
        return self.optimizer(self if self.pass_module else self.parameters())


class TokenData(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.arange(32) % 10), batch_size=8)


def _cli(args):
    common = ["--trainer.max_steps=4", "--trainer.logger=false", "--trainer.enable_checkpointing=false"]
    common += [
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
    ]
    return LightningCLI(InjectedModel, TokenData, args=["fit", *args, *common], save_config_callback=None)


def test_optimizer_callable_default_through_lightning_cli(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    cli = _cli(["--model.optimizer.lr=0.05", "--model.optimizer.weight_decay=0.1", "--model.optimizer.stat_interval=2"])
    opt = cli.trainer.optimizers[0]
    assert type(opt) is GroupedShampoo4bit and opt.defaults["lr"] == 0.05 and opt.defaults["stat_interval"] == 2
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]  # vectors vs matrices
    assert opt.counters["steps"] == 4 and opt.counters["stat_updates"] > 0

    cli = _cli(["--model.pass_module=true", "--model.optimizer.max_precondition_dim=null"])
    opt = cli.trainer.optimizers[0]
    emb_group = next(g for g in opt.param_groups if any(p is cli.model.emb.weight for p in g["params"]))
    assert not is_preconditioned(emb_group) and emb_group["weight_decay"] == 0.0

    cli = _cli(["--model.optimizer=SGD", "--model.optimizer.lr=0.5"])  # swapped out entirely
    assert type(cli.trainer.optimizers[0]) is torch.optim.SGD and cli.trainer.optimizers[0].defaults["lr"] == 0.5


def test_lr_schedule_state_is_plain_numbers():
    opt = Shampoo4bit([nn.Parameter(torch.zeros(3))])
    sched = build_lr_scheduler(opt, schedule="cosine", total_steps=10, warmup_steps=0.2)
    state = sched.state_dict()
    lam = state["lr_lambdas"][0]
    assert lam["schedule"] == "cosine" and lam["warmup_steps"] == 2
    assert all(isinstance(v, (str, int, float, tuple, type(None))) for v in lam.values())
    assert not math.isnan(sched.get_last_lr()[0])
