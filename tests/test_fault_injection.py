"""Fault injection: every fault class, many times, across storage modes and base optimizers.

Each mode trains a tiny two-layer classifier while a fixed, seeded plan injects faults at
statistics (PU), root (PIRU) and steady steps into varied layers. After every fault the test
checks that no state is non-finite, that a step either completed or left no trace (against a
snapshot, or against an untouched twin for linear-algebra errors), and that the counters moved
by exactly what the fault implies; after the plan, the loss must still be finite and falling.
The module ends with the line ``SUMMARY`` filled with the real counts.
"""

from __future__ import annotations

import copy
import math
import random
from collections import Counter

import pytest
import torch
from torch import nn

import lightning_shampoo4.kernels as kernels_mod
import lightning_shampoo4.linalg as linalg_mod
from lightning_shampoo4 import Shampoo4bit
from lightning_shampoo4.optim import COUNTERS
from lightning_shampoo4.optim.blocking import blocks_for
from lightning_shampoo4.optim.storage import RETRIED, Storage
from lightning_shampoo4.optim.storage.naive import NaiveStorage

# What each fault class is and what surviving it means (quoted by the README).
FAULT_CLASSES = {
    "nonfinite_grad": "inf / NaN entries in one gradient: the step changes nothing and is counted as skipped",
    "huge_grad": "a finite gradient of norm 1e10 .. 3e38: parameters and state stay finite, an overflowing "
                 "statistic is a counted failure and is not stored",
    "linalg_error": "torch.linalg.LinAlgError in qr / eigh / matrix_norm: that update fails (or retries in "
                    "float64) and is counted, its factor keeps its previous state, the step completes",
    "exception": "any other exception in the step (RuntimeError, out of memory, KeyboardInterrupt): it "
                 "propagates and the step changes nothing",
}
SUMMARY = "fault injection: {injected} faults injected, {survived} survived, state lost: {state_lost}"

STEPS, FIRST_FAULT, LAST_FAULT = 44, 5, 34  # faults at clocks 5..34, then clean steps to the end
LAST_HUGE = 26  # AdamW carries a huge gradient in its moments for a few dozen steps
SETTINGS = dict(stat_interval=2, root_interval=4, min_quant_numel=0, block_size=16, max_order=8, lr=2e-2)
MODES = {
    "4bit-eigenvectors-adamw": dict(bits=4, storage="eigenvectors"),
    "8bit-eigenvectors-dynamic-adamw": dict(bits=8, storage="eigenvectors", codebook="dynamic"),
    "32bit-adamw": dict(bits=32),
    "4bit-naive-adamw": dict(bits=4, storage="naive"),
    "8bit-naive-eigh-adamw": dict(bits=8, storage="naive", root_method="eigen"),
    "4bit-eigenvectors-sgd": dict(bits=4, storage="eigenvectors", base="sgd", lr=0.1),
    "32bit-sgd": dict(bits=32, base="sgd", lr=0.1),
    "4bit-naive-sgd": dict(bits=4, storage="naive", base="sgd", lr=0.1),
    "4bit-cholesky-ef-adamw": dict(bits=4, storage="cholesky", statistic_bits=4),
    "4bit-cholesky-adamw": dict(bits=4, storage="cholesky"),
}
N_PARAMS = 4  # weight, bias, weight, bias

TALLY: Counter = Counter(injected=0, survived=0, state_lost=0)
BY_CLASS: Counter = Counter()
RAN: list[str] = []


def _storage(kw) -> str:
    if kw.get("bits", 4) == 32:
        return "dense"
    if kw.get("storage", "cholesky") == "cholesky":
        return "cholesky"
    return "naive" if kw["storage"] == "naive" else "eigen"


def _linalg_target(kw):
    """The torch.linalg function called exactly once per update of one kind: (name, kind)."""
    mode = _storage(kw)
    if mode == "eigen":
        return "qr", "stats"  # subspace iteration of every PU
    if mode in ("dense", "cholesky") or kw.get("root_method") == "eigen":
        return "eigh", "roots"  # the fp32 attempt of every PIRU (float64 retry on failure)
    return "matrix_norm", "roots"  # once per coupled-Newton PIRU


def _exception_targets(kw):
    """(owner, name, kind) of functions the step calls; kind: "stats", "roots" or "any"."""
    mode = _storage(kw)
    out = [(kernels_mod, "precondition", "any")]
    if mode != "dense":  # (de)quantizing a factor's matrices
        out += [(Storage, "store", "stats"), (Storage, "load", "roots")]
    if mode == "eigen":
        out += [(torch.linalg, "qr", "stats"), (linalg_mod, "eigen_inverse_root", "roots"),
                (kernels_mod, "quantize", "stats"), (kernels_mod, "dequantize", "stats")]
    elif mode == "dense":
        out += [(linalg_mod, "eigh_inverse_root", "roots"), (torch.linalg, "eigh", "roots")]
    elif mode == "cholesky":  # the factorization of every PU, the eigh root of every PIRU
        out += [(torch.linalg, "cholesky_ex", "stats"), (linalg_mod, "eigh_inverse_root", "roots"),
                (torch.linalg, "eigh", "roots")]
    else:
        if kw.get("root_method") == "eigen":
            out.append((linalg_mod, "eigh_inverse_root", "roots"))
        else:
            out.append((torch.linalg, "matrix_norm", "roots"))  # once per Newton root, whichever variant
    return out


def _exceptions(owner, name):
    # linalg's eigh helper treats a RuntimeError from eigh as a failed decomposition, so only
    # exceptions outside RuntimeError are injected there (tests/test_reliability_optim.py has its own case)
    if owner is torch.linalg and name == "eigh":
        return [MemoryError, KeyboardInterrupt]
    return [RuntimeError, MemoryError, KeyboardInterrupt, torch.OutOfMemoryError]


def _due(clock, kind):
    return {"stats": clock % 2 == 0, "roots": clock % 4 == 0, "any": True}[kind]


def _plan(name, kw):
    """The seeded fault plan of one mode: ``{clock: fault}``."""
    rng = random.Random(f"faults/{name}")
    classes = ["nonfinite_grad", "exception"]
    if kw.get("base", "adamw") == "adamw":
        classes.append("huge_grad")  # SGD moves by lr * ||G||: see test_huge_gradient_with_sgd
    lin_name, lin_kind = _linalg_target(kw)
    # huge gradients hit one tensor per mode: AdamW's second moment overflows as torch's does and
    # freezes that tensor, the others keep training
    huge_param = rng.choice([0, 2])  # a weight matrix: the preconditioned, grafted path
    plan = {}
    for clock in range(FIRST_FAULT, LAST_FAULT + 1):
        if rng.random() < 0.25:
            continue
        if _due(clock, lin_kind) and rng.random() < 0.5:
            cls = "linalg_error"
        else:
            cls = rng.choice([c for c in classes if c != "huge_grad" or clock <= LAST_HUGE])
        if cls == "nonfinite_grad":
            fault = dict(param=rng.randrange(N_PARAMS), value=rng.choice([math.nan, math.inf, -math.inf]),
                         count=rng.choice([1, 2, 1000]))
        elif cls == "huge_grad":
            fault = dict(param=huge_param, norm=min(10.0 ** rng.uniform(10, 38.6), 3e38))
        elif cls == "linalg_error":
            # the first layer has 2 blocks (max_order 8), the second 2: 8 sides per update kind
            fault = dict(name=lin_name, at=rng.randint(1, 7), times=rng.choice([1, 2]))
        else:
            targets = [t for t in _exception_targets(kw) if _due(clock, t[2])]
            owner, fname, _ = rng.choice(targets)
            fault = dict(owner=owner, name=fname, exc=rng.choice(_exceptions(owner, fname)), at=rng.randint(1, 3))
        plan[clock] = dict(cls=cls, **fault)
    return plan


PLANS = {name: _plan(name, kw) for name, kw in MODES.items()}
PLANNED = {name: len(plan) for name, plan in PLANS.items()}


# -- the tiny problem ---------------------------------------------------------------------------


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


X = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
Y = (X[:, :3] - X[:, 3:]).argmax(1)


def _backward(model):
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(X), Y)
    loss.backward()
    return loss.item()


def _sides(model):
    """``(param index, block, "i.L" / "i.R")`` in the order the step updates them."""
    out = []
    for i, p in enumerate(model.parameters()):
        _, blocks = blocks_for(tuple(p.shape), SETTINGS["max_order"])
        for b, block in enumerate(blocks):
            out += [(i, block, f"{b}.L"), (i, block, f"{b}.R")]
    return out


def _counts(opt):
    c = opt.counters
    return {k: c[k] for k in COUNTERS}


def _snapshot(model, opt):
    params = list(model.parameters())
    return {
        "params": [p.detach().clone() for p in params],
        "state": [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state.get(p, {}).items()}
                  for p in params],
        "counters": _counts(opt),
        "clock": [g["clock"] for g in opt.param_groups],
    }


def _equal(a, b):
    if not isinstance(a, torch.Tensor):
        return a == b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _side_keys(state, side):
    return [k for k in state if k.startswith(side + ".")]


def _stats_keys(state, side):
    return [k for k in _side_keys(state, side) if ".root" not in k]


def _root_keys(state, side):
    return [k for k in _side_keys(state, side) if ".root" in k]


# -- checks -------------------------------------------------------------------------------------


def _check_not_lost(model, opt, before=None):
    """No non-finite second-order state, and (with ``before``) no partial step: every
    parameter's update count moved together. Counts a lost state before failing."""
    bad = [k for p in model.parameters() for k, v in opt.state.get(p, {}).items()
           if k[0].isdigit() and not torch.isfinite(v.float()).all()]
    partial = False
    if before is not None:
        moved = {float(opt.state[p]["step"]) - float(s["step"]) for p, s in zip(model.parameters(), before["state"])}
        partial = len(moved) != 1
    if bad or partial:
        TALLY["state_lost"] += 1
    assert not bad, f"non-finite state {bad}"
    assert not partial, "parameters advanced unevenly: a partial step"


def _assert_unchanged(before, model, opt, counters):
    after = _snapshot(model, opt)
    for i, (a, b) in enumerate(zip(before["params"], after["params"])):
        assert _equal(a, b), f"parameter {i} changed"
    for i, (s1, s2) in enumerate(zip(before["state"], after["state"])):
        assert s1.keys() == s2.keys(), f"state keys of parameter {i} changed"
        for k in s1:
            assert _equal(s1[k], s2[k]), f"state '{k}' of parameter {i} changed"
    assert after["counters"] == counters


def _moved(before, **delta):
    return {k: v + delta.get(k, 0) for k, v in before["counters"].items()}


def _inject(owner, name, exc, at, times=1, log=None):
    """Patch ``owner.name`` to raise ``exc`` on calls ``at .. at + times - 1``; returns the undo."""
    real = getattr(owner, name)
    calls = [0]

    def fake(*args, **kwargs):
        calls[0] += 1
        if at <= calls[0] < at + times:
            if log is not None:
                log.append(calls[0])
            raise exc("injected fault")
        return real(*args, **kwargs)

    setattr(owner, name, fake)
    return lambda: setattr(owner, name, real)


def _fault_nonfinite(fault, model, opt, clock):
    p = list(model.parameters())[fault["param"]]
    flat = p.grad.view(-1)
    idx = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(clock))[: fault["count"]]
    flat[idx] = fault["value"]
    before = _snapshot(model, opt)
    opt.step()
    _check_not_lost(model, opt, before)
    _assert_unchanged(before, model, opt, _moved(before, steps=1, skipped_nonfinite=1))
    assert all(g["clock"] == clock for g in opt.param_groups)


def _fault_huge(fault, model, opt, clock):
    params = list(model.parameters())
    p = params[fault["param"]]
    g = torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(clock))
    p.grad = (g * (fault["norm"] / g.norm())).float()
    stats, roots = clock % 2 == 0, clock % 4 == 0
    sides = _sides(model)
    overflow = set()
    if stats:
        for j, (i, b, side) in enumerate(sides):
            gm = params[i].grad.float().reshape(params[i].shape[0], -1)[b.r0:b.r1, b.c0:b.c1]
            mm = gm @ gm.mT if side.endswith("L") else gm.mT @ gm
            if not torch.isfinite(mm).all():
                overflow.add(j)
    before = _snapshot(model, opt)
    opt.step()
    _check_not_lost(model, opt, before)
    skipped = all(float(opt.state[q]["step"]) == float(s["step"]) for q, s in zip(params, before["state"]))
    if fault["norm"] <= 1e30:
        assert not skipped, "a gradient of norm <= 1e30 must give a finite direction"
    if skipped:
        _assert_unchanged(before, model, opt, _moved(before, steps=1, skipped_nonfinite=1))
        return
    assert all(torch.isfinite(q).all() for q in params), "AdamW keeps parameters finite"
    n = len(sides)
    expected = _moved(before, steps=1, stat_updates=n * stats, root_updates=n * roots, failed_updates=len(overflow))
    got = _counts(opt)
    retried = got.pop("retried_updates") - expected.pop("retried_updates")
    assert got == expected
    assert 0 <= retried <= n * (stats + roots)
    for j in overflow:  # an overflowing statistic never enters the state
        i, _, side = sides[j]
        for k in _stats_keys(before["state"][i], side):
            assert _equal(opt.state[params[i]][k], before["state"][i][k]), k


def _fault_linalg(fault, model, opt, clock):
    params = list(model.parameters())
    twin_model, twin = copy.deepcopy((model, opt))
    for p, q in zip(params, twin_model.parameters()):
        q.grad = p.grad.clone()
    root_retried = []  # per root update of the clean step, in order: was it retried?
    real_root = NaiveStorage.update_root

    def logged(self, *args, **kwargs):
        result = real_root(self, *args, **kwargs)
        root_retried.append(result.status == RETRIED)
        return result

    NaiveStorage.update_root = logged
    try:
        twin.step()
    finally:
        NaiveStorage.update_root = real_root
    clean = _counts(twin)
    before = _snapshot(model, opt)
    hits = []
    undo = _inject(torch.linalg, fault["name"], torch.linalg.LinAlgError, fault["at"], fault["times"], hits)
    try:
        opt.step()
    finally:
        undo()
    _check_not_lost(model, opt, before)
    assert hits, "the fault did not fire"
    assert all(torch.isfinite(q).all() for q in params)
    sides = _sides(model)
    name, times = fault["name"], len(hits)
    if name == "eigh":  # one call per root; a failed fp32 call is retried in float64 (the next call)
        assert clean["retried_updates"] == before["counters"]["retried_updates"], "the clean step must not retry"
        failed_sides = [fault["at"] - 1] if times == 2 else []
        retried_sides = [fault["at"] - 1] if times == 1 else []
    else:  # qr (one per PU) or matrix_norm (one per Newton root): every hit fails one update
        if name == "qr":
            assert clean["retried_updates"] == before["counters"]["retried_updates"], "the clean step must not retry"
        failed_sides = [c - 1 for c in hits]
        retried_sides = []
    was_retried = sum(root_retried[j] for j in failed_sides) if name == "matrix_norm" else 0
    expected = dict(clean)
    expected["failed_updates"] += len(failed_sides)
    expected["retried_updates"] += len(retried_sides) - was_retried
    assert _counts(opt) == expected
    kind_keys = _stats_keys if name == "qr" else _root_keys
    twin_params = list(twin_model.parameters())
    for j, (i, _, side) in enumerate(sides):
        st, tw, old = opt.state[params[i]], twin.state[twin_params[i]], before["state"][i]
        if j in failed_sides:  # the failed update left its entries as they were
            for k in kind_keys(old, side):
                assert _equal(st[k], old[k]), k
        elif j not in retried_sides:  # every other factor did what the clean step did
            for k in _side_keys(old, side):
                assert _equal(st[k], tw[k]), k


def _fault_exception(fault, model, opt, clock):
    before = _snapshot(model, opt)
    hits = []
    undo = _inject(fault["owner"], fault["name"], fault["exc"], fault["at"], 1, hits)
    try:
        with pytest.raises(fault["exc"], match="injected fault"):
            opt.step()
    finally:
        undo()
    assert hits, "the fault did not fire"
    _check_not_lost(model, opt, before)
    _assert_unchanged(before, model, opt, before["counters"])
    assert [g["clock"] for g in opt.param_groups] == before["clock"]
    opt.step()  # the same gradients again: the step runs as if nothing had happened
    assert _counts(opt)["steps"] == clock


FAULTS = {"nonfinite_grad": _fault_nonfinite, "huge_grad": _fault_huge, "linalg_error": _fault_linalg,
          "exception": _fault_exception}


@pytest.fixture(scope="module", autouse=True)
def _print_summary(request):
    yield
    line = SUMMARY.format(**TALLY)
    classes = ", ".join(f"{k} {BY_CLASS[k]}" for k in FAULT_CLASSES)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(f"{line} ({classes})")


@pytest.mark.parametrize("name", list(MODES))
def test_faults_are_survived(name):
    kw = SETTINGS | MODES[name]
    model = _model()
    opt = Shampoo4bit(model.parameters(), **kw)
    RAN.append(name)
    losses = []
    for clock in range(1, STEPS + 1):
        losses.append(_backward(model))
        fault = PLANS[name].get(clock)
        if fault is None:
            opt.step()
            continue
        TALLY["injected"] += 1
        BY_CLASS[fault["cls"]] += 1
        FAULTS[fault["cls"]](fault, model, opt, clock)
        TALLY["survived"] += 1
        assert _counts(opt)["steps"] == clock
    _check_not_lost(model, opt)
    tail = losses[LAST_FAULT:]
    assert all(math.isfinite(x) for x in losses)
    assert tail[-1] < tail[0] and tail[-1] < losses[0], (losses[0], tail)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", [n for n, kw in MODES.items() if kw.get("base") == "sgd"])
def test_huge_gradient_with_sgd(name):
    """SGD steps by ``lr * ||G||``, so a huge gradient wrecks the model as it does torch's SGD;
    the parameters must be exactly as finite as torch's and the state stay finite."""
    kw = SETTINGS | MODES[name]
    for k, (norm, clock) in enumerate([(1e10, 5), (1e20, 6), (1e30, 8), (3e38, 6), (1e36, 5)]):
        model, ref = _model(), _model()
        opt = Shampoo4bit(model.parameters(), **kw)
        sgd = torch.optim.SGD(ref.parameters(), lr=kw["lr"], momentum=0.9)
        for m, o in ((model, opt), (ref, sgd)):
            for _ in range(clock - 1):
                _backward(m)
                o.step()
            _backward(m)
        p, q = model[k % 2 * 2].weight, ref[k % 2 * 2].weight
        g = torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        p.grad = q.grad = (g * (norm / g.norm())).float()
        before = _snapshot(model, opt)
        TALLY["injected"] += 1
        BY_CLASS["huge_grad"] += 1
        opt.step()
        sgd.step()
        _check_not_lost(model, opt, before)
        for a, b in zip(model.parameters(), ref.parameters()):
            assert bool(torch.isfinite(a).all()) == bool(torch.isfinite(b).all())
        got = _counts(opt)
        assert got["steps"] == clock and got["skipped_nonfinite"] in (0, 1)
        for _ in range(2):  # it keeps stepping; inf / NaN gradients from here on are skipped
            _backward(model)
            opt.step()
        _check_not_lost(model, opt)
        TALLY["survived"] += 1


@pytest.mark.parametrize("name", [n for n, kw in MODES.items() if kw.get("base") != "sgd"])
def test_direction_overflow_at_update_steps_is_skipped_whole(name):
    """Finite gradients whose preconditioned direction overflows, at PU and PIRU steps: the
    updates already computed for that step must not be committed."""
    kw = SETTINGS | MODES[name]
    model = _model()
    opt = Shampoo4bit(model.parameters(), **kw)
    for clock in range(1, 13):
        _backward(model)
        if clock in (6, 8, 10, 12):
            w = model[0].weight if clock % 4 else model[2].weight
            w.grad = torch.full_like(w, 3e38 / w.numel() ** 0.5)
            before = _snapshot(model, opt)
            TALLY["injected"] += 1
            BY_CLASS["huge_grad"] += 1
            opt.step()
            _check_not_lost(model, opt, before)
            _assert_unchanged(before, model, opt, _moved(before, steps=1, skipped_nonfinite=1))
            TALLY["survived"] += 1
        else:
            opt.step()
    losses = [_backward(model)]
    for _ in range(8):
        opt.step()
        losses.append(_backward(model))
    assert losses[-1] < losses[0]


def test_summary():
    """Every planned fault of the modes that ran was injected and survived, no state was lost."""
    planned = sum(PLANNED[n] for n in RAN)
    assert TALLY["injected"] >= planned
    assert TALLY["survived"] == TALLY["injected"] and TALLY["state_lost"] == 0
    if RAN:
        assert set(BY_CLASS) == set(FAULT_CLASSES), BY_CLASS
