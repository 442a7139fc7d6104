"""Fault injection for SOAP4bit: every fault class at seeded steps, across its state formats.

A tiny two-layer classifier trains while a fixed plan injects, at refresh and steady steps:

* ``nonfinite_grad``: inf / NaN in one gradient: the step changes nothing and is counted as skipped;
* ``huge_grad``: a finite gradient of norm 1e15 .. 1e30: parameters and state stay finite (a
  step whose statistics or moments would overflow is skipped whole and counted);
* ``linalg_error`` (at refreshes): ``torch.linalg.LinAlgError`` in ``qr`` (retried in float64,
  then a counted failure that keeps the previous basis) or a singular ``lu_factor_ex`` (the
  stored basis taken as orthogonal): the step completes;
* ``exception``: a ``RuntimeError`` inside the step (in a kernel or a block's math): it
  propagates and the step changes nothing.

After every fault no state entry is non-finite and the checks above hold (against a snapshot of
parameters and state); after the plan the loss is finite and below the first step's.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from lightning_shampoo4 import SOAP4bit, kernels
from lightning_shampoo4.optim import soap_block

STEPS, FIRST_FAULT, LAST_FAULT = 80, 4, 30  # Adam carries a huge gradient in its moments for a while
SETTINGS = dict(lr=1e-2, precondition_frequency=3, max_precondition_dim=16, min_quant_numel=0, block_size=16)
MODES = {
    "4bit-defaults": dict(bits=4),
    "32bit": dict(bits=32),
    "4bit-normalized-m4": dict(bits=4, first_moment_basis="normalized", moment_bits=4),
    "4bit-cholesky8-full-v": dict(bits=4, statistics="cholesky8", second_moment="full", moment_bits=8),
}
FAULTS = ("nonfinite_grad", "huge_grad", "linalg_error", "exception")


def _snapshot(model: nn.Module, opt: SOAP4bit) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out += [v.clone() for _, v in sorted(opt.state.get(p, {}).items()) if isinstance(v, torch.Tensor)]
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _state_finite(opt: SOAP4bit) -> bool:
    return all(bool(torch.isfinite(v).all()) for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())


class _LinalgFault:
    """Makes the next ``qr`` / ``eigh`` calls raise, or ``lu_factor_ex`` report a singular matrix."""

    def __init__(self, monkeypatch, which: str, times: int):
        self.left = times
        real = getattr(torch.linalg, which)

        def broken(*args, **kwargs):
            if self.left > 0:
                self.left -= 1
                if which == "lu_factor_ex":
                    lu, piv, info = real(*args, **kwargs)
                    return lu, piv, torch.ones_like(info)
                raise torch.linalg.LinAlgError(f"injected {which} failure")
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, which, broken)


@pytest.mark.parametrize("name", list(MODES))
def test_soap4bit_survives_every_fault_class(name, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 5))
    opt = SOAP4bit(model.parameters(), **SETTINGS, **MODES[name])
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 12, generator=gen), torch.randint(0, 5, (64,), generator=gen)
    plan = random.Random(7)
    faults = {step: FAULTS[i % len(FAULTS)] for i, step in enumerate(range(FIRST_FAULT, LAST_FAULT, 2))}
    seen = dict.fromkeys(FAULTS, 0)
    first_loss, pending = None, 0
    for step in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        first_loss = float(loss.detach()) if first_loss is None else first_loss
        fault = faults.get(step)
        pending += fault == "linalg_error"
        adam_steps = int(opt.state[model[0].weight]["step"]) if opt.state else 0
        refresh = adam_steps > 0 and adam_steps % SETTINGS["precondition_frequency"] == 0
        if fault == "linalg_error" or (fault is None and pending):
            fault = "linalg_error" if refresh else None  # decompositions run at refreshes: wait for one
            pending -= fault is not None
        before, counters = _snapshot(model, opt), dict(opt.counters)
        with monkeypatch.context() as m:
            if fault == "nonfinite_grad":
                g = list(model.parameters())[plan.randrange(4)].grad
                g.view(-1)[plan.randrange(g.numel())] = plan.choice([float("nan"), float("inf"), -float("inf")])
            elif fault == "huge_grad":
                g = list(model.parameters())[plan.choice([0, 2])].grad
                g.mul_(10.0 ** plan.choice([15, 20, 25, 30]) / g.norm().clamp(min=1e-30))
            elif fault == "linalg_error":
                which, times = plan.choice(["qr", "lu_factor_ex"]), plan.choice([1, 2])
                _LinalgFault(m, which, times)
            elif fault == "exception":
                def boom(*args, **kwargs):
                    raise RuntimeError("injected kernel failure")

                where, what = plan.choice([(soap_block, "_rotate"), (soap_block, "_outer"), (soap_block, "adam_direction"),
                                           (kernels, "dequantize" if MODES[name]["bits"] != 32 else "materialize")])
                if what == "materialize":
                    where = soap_block
                    what = "_rotate_back"
                m.setattr(where, what, boom)
            if fault == "exception":
                with pytest.raises(RuntimeError, match="injected"):
                    opt.step()
                assert _same(before, _snapshot(model, opt)), "a failed step changed something"
                assert opt.counters == counters
            else:
                opt.step()
        if fault is not None:
            seen[fault] += 1
        assert _state_finite(opt) and all(bool(torch.isfinite(p).all()) for p in model.parameters()), (step, fault)
        if fault == "nonfinite_grad":
            assert _same(before, _snapshot(model, opt))
            assert opt.counters["skipped_nonfinite"] == counters["skipped_nonfinite"] + 1
        if fault == "linalg_error":
            assert opt.counters["skipped_nonfinite"] == counters["skipped_nonfinite"]  # the step completed
            if which == "qr":  # float32 failed: retried in float64; both failed: the old basis kept
                moved = opt.counters["retried_updates" if times == 1 else "failed_updates"] - counters[
                    "retried_updates" if times == 1 else "failed_updates"]
                assert moved >= 1, (step, which, times)
    assert all(seen[f] >= 3 for f in FAULTS), seen
    final = float(nn.functional.cross_entropy(model(x), y).detach())
    assert final == final and final < first_loss, (first_loss, final)
