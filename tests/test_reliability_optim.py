"""Reliability of ``Shampoo4bit`` itself: huge finite gradients, overflowing statistics, atomic
steps under exceptions, complex parameters, checked checkpoint loading, frozen storage formats,
per-optimizer intervals, argument checks, a warning when every step is skipped, copies."""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lightning_shampoo4.kernels as kernels_mod
import lightning_shampoo4.linalg as linalg_mod
import lightning_shampoo4.optim as optim_mod
from lightning_shampoo4 import Shampoo4bit
from lightning_shampoo4.optim import COUNTERS
from lightning_shampoo4.optim.storage import Storage

# the paper's eigenvector method, whose state the cases below name; the Cholesky cases say so
SMALL = dict(lr=1e-2, stat_interval=1, root_interval=2, min_quant_numel=0, storage="eigenvectors")


def _mlp(seed=0, hidden=8, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, 3, bias=bias))


def _batch(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, x[:, :3].argmax(1)


def _backward(model, x=None, y=None):
    x, y = _batch() if x is None else (x, y)
    model.zero_grad()
    loss = nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y)
    loss.backward()
    return loss.item()


def _train(model, opt, steps):
    losses = []
    for _ in range(steps):
        losses.append(_backward(model))
        opt.step()
    return losses


def _huge_like(t, norm, seed=0):
    """A random tensor shaped like ``t`` with Frobenius norm ``norm`` (scaled in float64)."""
    g = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (g * (norm / g.norm())).to(t.dtype)


def _shampoo_entries(opt):
    """Every second-order tensor (keys ``"{block}.{side}.{name}"``) of every parameter."""
    for p, st in opt.state.items():
        for k, v in st.items():
            if k[0].isdigit() and isinstance(v, torch.Tensor):
                yield p, k, v


def _counts(opt):
    c = opt.counters
    return {k: c[k] for k in COUNTERS}


def _snapshot(model, opt):
    params = list(model.parameters())
    return {
        "params": [p.detach().clone() for p in params],
        "state": {
            i: {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in opt.state[p].items()}
            for i, p in enumerate(params)
            if opt.state.get(p)
        },
        "counters": _counts(opt),
        "groups": [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
    }


def _same(a, b):
    if not isinstance(a, torch.Tensor):
        return a == b
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b) or torch.allclose(
        a.double(), b.double(), rtol=0, atol=0, equal_nan=True))


def _assert_unchanged(before, model, opt):
    after = _snapshot(model, opt)
    for i, (a, b) in enumerate(zip(before["params"], after["params"])):
        assert _same(a, b), f"parameter {i} changed"
    assert before["state"].keys() == after["state"].keys(), "parameters with state changed"
    for i in before["state"]:
        s1, s2 = before["state"][i], after["state"][i]
        assert s1.keys() == s2.keys(), f"state keys of parameter {i} changed"
        for k in s1:
            assert _same(s1[k], s2[k]), f"state '{k}' of parameter {i} changed"
    assert before["counters"] == after["counters"]
    assert before["groups"] == after["groups"]


def _inject(monkeypatch, owner, name, exc, at, times=1):
    """Make ``owner.name`` raise ``exc`` on calls ``at .. at + times - 1`` (counted from 1)."""
    real = getattr(owner, name)
    calls = [0]

    def fake(*args, **kwargs):
        calls[0] += 1
        if at <= calls[0] < at + times:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, fake)
    return calls


# -- 1. huge finite gradients -----------------------------------------------------------------


@pytest.mark.parametrize("norm", [1e20, 1e30, 3e38])
@pytest.mark.parametrize("when", ["steady", "stats", "roots"])
def test_huge_finite_gradient_after_first_root_stays_finite_like_adamw(norm, when):
    """||G|| overflowed the fp32 grafting norm before (inf / inf: NaN parameters)."""
    ours, ref = _mlp(), _mlp()
    opt = Shampoo4bit(ours.parameters(), lr=1e-2, stat_interval=2, root_interval=4, min_quant_numel=0)
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    extra = {"steady": 0, "stats": 1, "roots": 3}[when]  # the huge step is clock 5, 6 or 8
    for model, o in ((ours, opt), (ref, adamw)):
        _train(model, o, 4 + extra)
        _backward(model)
        for i, p in enumerate(model.parameters()):
            p.grad = _huge_like(p, norm, seed=i)
        o.step()
        _train(model, o, 3)
    assert opt.counters["root_updates"] > 0
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.isfinite(q).all()  # torch's AdamW survives these gradients ...
        assert torch.isfinite(p).all()  # ... and so must Shampoo4bit
    for _, k, v in _shampoo_entries(opt):
        assert torch.isfinite(v.float()).all(), k
    assert math.isfinite(_backward(ours))


# -- 2. an overflowing statistic is never stored ---------------------------------------------


@pytest.mark.parametrize("variant", [dict(bits=32), dict(bits=4, storage="naive"),
                                     dict(bits=8, storage="naive", root_method="eigen"),
                                     dict(bits=4, storage="cholesky", statistic_bits=4), dict(bits=4, storage="cholesky")])
def test_overflowing_statistic_is_not_stored(variant):
    model = _mlp()
    opt = Shampoo4bit(model.parameters(), **SMALL | variant)
    _train(model, opt, 2)  # one root update done
    w = model[0].weight
    stat = "chol" if variant.get("storage") == "cholesky" else "factor"
    factors = {k: v.clone() for k, v in opt.state[w].items() if f".{stat}" in k or ".ef_" in k}
    assert factors
    before = _counts(opt)
    _backward(model)
    w.grad = _huge_like(w, 1e25)  # G G^T and G^T G overflow fp32; G and the direction do not
    opt.step()  # clock 3: statistics only
    after = _counts(opt)
    assert after["failed_updates"] - before["failed_updates"] == 2  # both sides of w
    assert after["skipped_nonfinite"] == before["skipped_nonfinite"]
    for k, v in factors.items():
        assert torch.equal(opt.state[w][k], v), k
    for _, k, v in _shampoo_entries(opt):
        assert torch.isfinite(v.float()).all(), k
    losses = _train(model, opt, 6)  # the statistic moves again on normal gradients
    assert all(math.isfinite(x) for x in losses)
    moving = f"0.L.{stat}" if variant["bits"] == 32 else f"0.L.{stat}_absmax"
    assert not torch.equal(opt.state[w][moving], factors[moving])
    assert opt.counters["failed_updates"] == after["failed_updates"]


# -- 3. step() is atomic ----------------------------------------------------------------------

# (name, storage settings, clock of the faulty step, what to break)
ATOMIC_CASES = [
    ("first step, qr", dict(bits=4, root_interval=1), 1, (torch.linalg, "qr")),
    ("PU step, qr", dict(bits=4), 3, (torch.linalg, "qr")),
    ("PIRU step, eigen root", dict(bits=4), 4, (linalg_mod, "eigen_inverse_root")),
    ("PIRU step, eigh root", dict(bits=32), 4, (linalg_mod, "eigh_inverse_root")),
    ("PU step, store", dict(bits=8, storage="naive"), 3, (Storage, "store")),
    ("PU step, quantize", dict(bits=4), 3, (kernels_mod, "quantize")),
    ("PIRU step, Newton root", dict(bits=4, storage="naive"), 2, (torch.linalg, "matrix_norm")),
    ("PU step, cholesky 4-bit", dict(bits=4, storage="cholesky", statistic_bits=4), 3, (torch.linalg, "cholesky_ex")),
    ("PIRU step, cholesky root", dict(bits=4, storage="cholesky", statistic_bits=4), 4, (linalg_mod, "eigh_inverse_root")),
    ("PU step, cholesky 8-bit", dict(bits=4, storage="cholesky"), 3, (torch.linalg, "cholesky_ex")),
]


@pytest.mark.parametrize("exc", [RuntimeError("injected fault"), MemoryError("injected fault")],
                         ids=["RuntimeError", "MemoryError"])
@pytest.mark.parametrize("at", [1, 3])
@pytest.mark.parametrize("case", ATOMIC_CASES, ids=[c[0] for c in ATOMIC_CASES])
def test_exception_inside_step_propagates_and_changes_nothing(monkeypatch, case, at, exc):
    _, variant, clock, (owner, name) = case
    model = _mlp()
    opt = Shampoo4bit(model.parameters(), **SMALL | variant)
    _train(model, opt, clock - 1)
    _backward(model)
    before = _snapshot(model, opt)
    calls = _inject(monkeypatch, owner, name, exc, at)
    with pytest.raises(type(exc), match="injected fault"):
        opt.step()
    assert calls[0] == at
    _assert_unchanged(before, model, opt)
    assert all(g["clock"] == clock - 1 for g in opt.param_groups)
    monkeypatch.undo()
    opt.step()  # the same gradients again: no half-initialized state left behind
    assert opt.counters["steps"] == clock
    assert all(float(opt.state[p]["step"]) == clock for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("clock", [1, 3, 4])
def test_exception_in_the_base_update_changes_nothing(monkeypatch, clock):
    """The fused AdamW kernel is the last part of a step; if it raises (out of memory), the
    Shampoo state, the new states, the counters and the per-parameter step counts stay as they were."""
    model = _mlp()
    opt = Shampoo4bit(model.parameters(), **SMALL)
    _train(model, opt, clock - 1)
    _backward(model)
    before = _snapshot(model, opt)
    _inject(monkeypatch, torch, "_fused_adamw_", torch.OutOfMemoryError("injected fault"), 1)
    with pytest.raises(torch.OutOfMemoryError, match="injected fault"):
        opt.step()
    _assert_unchanged(before, model, opt)
    monkeypatch.undo()
    opt.step()
    assert opt.counters["steps"] == clock
    assert all(float(opt.state[p]["step"]) == clock for p in model.parameters())


def test_out_of_memory_inside_eigh_propagates(monkeypatch):
    """Only a linear-algebra error is a failed update; an out-of-memory error inside ``eigh``
    (a RuntimeError subclass) must reach the caller instead of being counted as one."""
    model = _mlp()
    opt = Shampoo4bit(model.parameters(), **SMALL | dict(bits=32))
    _train(model, opt, 1)
    _backward(model)
    before = _snapshot(model, opt)
    _inject(monkeypatch, torch.linalg, "eigh", torch.OutOfMemoryError("injected fault"), 1, times=100)
    with pytest.raises(torch.OutOfMemoryError, match="injected fault"):
        opt.step()
    _assert_unchanged(before, model, opt)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_linalg_error_is_a_counted_failure_and_keeps_that_factor(monkeypatch, k):
    model = _mlp()
    opt = Shampoo4bit(model.parameters(), **SMALL)
    _train(model, opt, 2)
    _backward(model)
    before = _snapshot(model, opt)
    sides = [(i, s) for i in (0, 2) for s in ("0.L", "0.R")]  # parameter index and side, in the order of the PUs
    _inject(monkeypatch, torch.linalg, "qr", torch.linalg.LinAlgError("injected fault"), k)
    opt.step()  # clock 3: four statistics updates, the k-th fails
    after = _counts(opt)
    assert after["failed_updates"] == before["counters"]["failed_updates"] + 1
    assert after["stat_updates"] == before["counters"]["stat_updates"] + 4
    assert after["steps"] == 3 and after["skipped_nonfinite"] == 0
    params = list(model.parameters())
    for j, (i, side) in enumerate(sides):
        old = before["state"][i][f"{side}.eigvals"]
        kept = torch.equal(opt.state[params[i]][f"{side}.eigvals"], old)
        assert kept == (j == k - 1), side
    assert all(float(opt.state[p]["step"]) == 3 for p in params)
    for _, key, v in _shampoo_entries(opt):
        assert torch.isfinite(v.float()).all(), key


# -- 4. complex parameters --------------------------------------------------------------------


def test_complex_parameters_are_refused_at_construction():
    z = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        Shampoo4bit([z])
    with pytest.raises(ValueError, match="complex"):
        Shampoo4bit([{"params": [nn.Parameter(torch.randn(3, 3))]}, {"params": [z], "lr": 1e-2}])


# -- 5. checked checkpoint loading ------------------------------------------------------------


def _mismatch_error():
    return optim_mod.CheckpointMismatchError


def _trained(model, steps=3, **kw):
    opt = Shampoo4bit(model.parameters(), **SMALL | kw)
    _train(model, opt, steps)
    return opt


def _saved(opt):
    return copy.deepcopy(opt.state_dict())


def _corrupt_key(key):
    def edit(sd):
        sd["state"][0][key] = sd["state"][0][key].clone()
        sd["state"][0][key].view(-1)[0] = float("nan")
    return edit


def _drop(key):
    def edit(sd):
        del sd["state"][0][key]
    return edit


def _codes_as_float(sd):
    sd["state"][0]["0.L.eigvecs_codes"] = sd["state"][0]["0.L.eigvecs_codes"].float()


def _set(key, value, index=0):
    def edit(sd):
        sd["state"][index][key] = value(sd["state"][index][key]) if callable(value) else value
    return edit


LOAD_CASES = [
    ("missing key", {}, _drop("0.L.eigvals"), ["parameter #0", "0.L.eigvals", "missing"]),
    ("codes saved as float", {}, _codes_as_float, ["parameter #0", "0.L.eigvecs_codes", "uint8"]),
    ("NaN eigenvalues", {}, _corrupt_key("0.R.eigvals"), ["parameter #0", "0.R.eigvals", "NaN"]),
    ("NaN root diagonal", {}, _corrupt_key("0.L.root_diag"), ["parameter #0", "0.L.root_diag", "NaN"]),
    ("NaN dense root", dict(bits=32), _corrupt_key("0.L.root"), ["parameter #0", "0.L.root", "NaN"]),
    ("NaN step", {}, _set("step", torch.tensor(math.nan), index=2), ["parameter #2", "'step'", "NaN"]),
    ("negative second moment", {}, _set("exp_avg_sq", lambda t: -1 - t, index=2), ["parameter #2", "exp_avg_sq"]),
    ("negative scale", {}, _set("0.R.root_absmax", lambda t: -t), ["parameter #0", "0.R.root_absmax"]),
    ("meta tensor", {}, _set("0.L.eigvals", lambda t: t.to("meta")), ["parameter #0", "0.L.eigvals", "meta"]),
    ("root step as text", {}, _set("last_root_step", "2"), ["parameter #0", "last_root_step", "integer"]),
    ("clock as text", {}, lambda sd: sd["param_groups"][0].update(clock="x"), ["clock", "integer"]),
    ("state not a dict", {}, lambda sd: sd["state"].update({0: None}), ["parameter #0", "dict"]),
    ("group without params", {}, lambda sd: sd["param_groups"][0].pop("params"), ["'params'"]),
    ("state as a list", {}, lambda sd: sd.update(state=[]), ["'state'"]),
]


@pytest.mark.parametrize("case", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_bad_checkpoint_is_refused_naming_parameter_and_mismatch(case):
    _, kw, edit, words = case
    src = _mlp(seed=1)
    sd = _saved(_trained(src, **kw))
    edit(sd)
    sd["param_groups"][0]["lr"] = 0.5  # would show if the groups were loaded anyway
    dst = _mlp(seed=2)
    opt = _trained(dst, steps=2, **kw)
    before = _snapshot(dst, opt)
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(sd)
    assert isinstance(info.value, _mismatch_error())
    for word in words:
        assert word in str(info.value)
    _assert_unchanged(before, dst, opt)
    _train(dst, opt, 1)


def test_checkpoint_of_another_model_is_refused():
    sd = _saved(_trained(_mlp(hidden=8)))
    dst = _mlp(hidden=9)
    opt = _trained(dst, steps=2)
    before = _snapshot(dst, opt)
    with pytest.raises(_mismatch_error(), match=r"parameter #0 \(shape \(9, 6\)\).*shape \(8, 6\)"):
        opt.load_state_dict(sd)
    _assert_unchanged(before, dst, opt)


def test_mismatch_names_the_parameter_by_name():
    src = _mlp(seed=1)
    opt = Shampoo4bit(src.named_parameters(), **SMALL)
    _train(src, opt, 2)
    sd = _saved(opt)
    sd["state"][2]["0.R.eigvals"][0] = math.nan  # the second Linear's weight, not the first parameter
    dst = _mlp(seed=2)
    opt2 = Shampoo4bit(dst.named_parameters(), **SMALL)
    _train(dst, opt2, 2)
    before = _snapshot(dst, opt2)
    with pytest.raises(_mismatch_error(), match=r"'0\.R\.eigvals' of parameter '2\.weight' \(shape \(3, 8\)\)"):
        opt2.load_state_dict(sd)
    _assert_unchanged(before, dst, opt2)
    other = _mlp(hidden=9)
    opt3 = Shampoo4bit(other.named_parameters(), **SMALL)
    with pytest.raises(_mismatch_error(), match=r"parameter '0\.weight' \(shape \(9, 6\)\)"):
        opt3.load_state_dict(_saved(opt))


def test_checkpoint_with_other_groups_or_parameter_counts_is_refused():
    src = _mlp()
    two = Shampoo4bit([{"params": [src[0].weight, src[0].bias]}, {"params": [src[2].weight, src[2].bias]}], **SMALL)
    _train(src, two, 2)
    dst = _mlp()
    opt = _trained(dst, steps=2)
    before = _snapshot(dst, opt)
    with pytest.raises(_mismatch_error(), match="2 parameter groups.*1"):
        opt.load_state_dict(_saved(two))
    _assert_unchanged(before, dst, opt)
    no_bias = _trained(_mlp(bias=False))
    with pytest.raises(_mismatch_error(), match="group 0 has 2 parameters in the checkpoint and 4"):
        opt.load_state_dict(_saved(no_bias))
    _assert_unchanged(before, dst, opt)


def test_bf16_checkpoint_resumes_on_fp32_parameters():
    src = _mlp().to(torch.bfloat16)
    sd = _saved(_trained(src, steps=4))
    dst = _mlp()
    dst.load_state_dict({k: v.float() for k, v in src.state_dict().items()})
    opt = Shampoo4bit(dst.parameters(), **SMALL)
    opt.load_state_dict(sd)
    ref_model = _mlp()
    ref = torch.optim.AdamW(ref_model.parameters())
    ref_sd = ref.state_dict()
    ref_sd["state"] = {i: {k: s[k] for k in ("step", "exp_avg", "exp_avg_sq")} for i, s in sd["state"].items()}
    ref.load_state_dict(ref_sd)
    for i, (p, q) in enumerate(zip(dst.parameters(), ref_model.parameters())):
        st = opt.state[p]
        for k in ("exp_avg", "exp_avg_sq"):
            assert st[k].dtype == torch.float32 and ref.state[q][k].dtype == torch.float32
            assert torch.equal(st[k], ref.state[q][k]), k  # cast exactly like torch's AdamW
        for k, v in st.items():
            if k.endswith("_codes"):
                assert v.dtype == torch.uint8
            elif k.endswith("eigvals"):
                assert v.dtype == torch.float32
    assert opt.counters["steps"] == 4
    losses = _train(dst, opt, 8)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in dst.parameters())


# -- 6. storage-format settings are frozen once there is state --------------------------------


@pytest.mark.parametrize("key, value", [("block_size", 32), ("codebook", "dynamic"), ("bits", 8), ("max_order", 4),
                                        ("storage", "naive"), ("statistic_bits", 8),
                                        ("error_feedback", True), ("base", "sgd")])
def test_changing_a_format_setting_with_state_raises(key, value):
    model = _mlp()
    opt = _trained(model, steps=2)
    opt.param_groups[0][key] = value
    _backward(model)
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=key):
        opt.step()
    _assert_unchanged(before, model, opt)


def test_changing_soft_settings_is_allowed_and_takes_effect():
    model = _mlp()
    opt = _trained(model, steps=2)
    group = opt.param_groups[0]
    group.update(lr=3e-3, stat_interval=2, root_interval=4, matrix_eps=1e-4, shampoo_beta=0.5)
    roots = opt.counters["root_updates"]
    stats = opt.counters["stat_updates"]
    losses = _train(model, opt, 6)  # clocks 3..8: statistics at 4, 6, 8; roots at 4, 8
    assert all(math.isfinite(x) for x in losses)
    assert opt.counters["stat_updates"] - stats == 3 * 4
    assert opt.counters["root_updates"] - roots == 2 * 4
    for *_, f in opt.factors():
        assert f.cfg.eps == 1e-4 and f.cfg.beta == 0.5
    group["stat_interval"], group["root_interval"] = 3, 4
    with pytest.raises(ValueError, match="multiple of stat_interval"):
        _train(model, opt, 1)


# -- 7. intervals follow the optimizer's clock -----------------------------------------------


@pytest.mark.parametrize("root_interval", [2, 3])
def test_intervals_follow_the_optimizer_clock_when_gradients_are_missing(root_interval):
    torch.manual_seed(0)
    a, b = nn.Linear(6, 5), nn.Linear(5, 3)
    opt = Shampoo4bit([*a.parameters(), *b.parameters()], lr=1e-2, stat_interval=1, root_interval=root_interval,
                      min_quant_numel=0, storage="eigenvectors")
    x, y = _batch()
    roots_a, roots_b, stats_b = [], [], []
    for clock in range(1, 13):
        opt.zero_grad(set_to_none=True)
        if clock % 2:  # b has no gradient on odd steps
            loss = a(x).square().mean()
        else:
            loss = nn.functional.cross_entropy(b(torch.tanh(a(x))), y)
        loss.backward()
        before_b = opt.state.get(b.weight, {}).get("0.L.eigvals", torch.empty(0)).clone()
        opt.step()
        assert opt.counters["steps"] == clock
        if opt.state[a.weight]["last_root_step"] == clock:
            roots_a.append(clock)
        if opt.state.get(b.weight) and opt.state[b.weight]["last_root_step"] == clock:
            roots_b.append(clock)
        if opt.state.get(b.weight) and not torch.equal(opt.state[b.weight]["0.L.eigvals"], before_b):
            stats_b.append(clock)
    assert roots_a == [c for c in range(1, 13) if c % root_interval == 0]
    assert roots_b == [c for c in roots_a if c % 2 == 0]
    assert stats_b == list(range(2, 13, 2))


# -- 8. argument checks -----------------------------------------------------------------------


@pytest.mark.parametrize("name, value", [("lr", math.inf), ("lr", math.nan), ("weight_decay", math.inf),
                                         ("eps", math.inf), ("matrix_eps", math.inf), ("matrix_eps", math.nan),
                                         ("shampoo_beta", math.nan), ("momentum", math.nan)])
def test_non_finite_arguments_are_rejected(name, value):
    with pytest.raises(ValueError, match=name):
        Shampoo4bit(nn.Linear(2, 2).parameters(), **{name: value})
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=name):
        Shampoo4bit([{"params": [m.weight], name: value}, {"params": [m.bias]}])


def test_numpy_and_tensor_scalars_are_stored_as_python_numbers():
    model = _mlp()
    opt = Shampoo4bit(model.parameters(), lr=np.float32(1e-3), betas=(np.float64(0.9), torch.tensor(0.99)),
                      eps=torch.tensor(1e-8), weight_decay=np.float32(0.0), stat_interval=np.int64(10),
                      root_interval=torch.tensor(20), block_size=np.int32(32), matrix_eps=np.float64(1e-6),
                      min_quant_numel=np.int64(0))
    for g in (opt.defaults, opt.param_groups[0]):
        for key in ("lr", "eps", "weight_decay", "matrix_eps"):
            assert type(g[key]) is float, key
        for key in ("stat_interval", "root_interval", "block_size", "min_quant_numel"):
            assert type(g[key]) is int, key
        assert all(type(b) is float for b in g["betas"])
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    flags = Shampoo4bit(_mlp().parameters(), nesterov=np.True_, base="sgd", precondition=torch.tensor(False))
    assert flags.defaults["nesterov"] is True and flags.param_groups[0]["precondition"] is False
    opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3))], "lr": torch.tensor(0.5)})
    assert type(opt.param_groups[1]["lr"]) is float
    pickle.dumps(opt.state_dict())
    _train(model, opt, 2)


@pytest.mark.parametrize("betas", [0.9, (0.9,), "ab", (0.9, 0.99, 0.999)])
def test_betas_must_be_a_pair(betas):
    with pytest.raises(ValueError, match="betas.*must be a pair"):
        Shampoo4bit(nn.Linear(2, 2).parameters(), betas=betas)


# -- 9. an optimizer that skips every step says so -------------------------------------------


def _skip_warnings(record):
    return [w for w in record if "skipped_nonfinite" in str(w.message)]


@pytest.mark.parametrize("stat_interval", [1, 10])
def test_warns_once_when_every_step_is_skipped(stat_interval):
    model = _mlp()
    opt = Shampoo4bit(model.parameters(), lr=1e-2, stat_interval=stat_interval, root_interval=2 * stat_interval)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # every gradient is NaN from now on
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _train(model, opt, 200)
        counters = opt.counters
        _train(model, opt, 50)
        opt.counters  # noqa: B018 - reading the counters is a point where the optimizer may warn
    assert counters["skipped_nonfinite"] == 200 and counters["steps"] == 200
    assert len(_skip_warnings(record)) == 1, [str(w.message) for w in record]


def test_no_warning_for_isolated_skipped_steps():
    model = _mlp()
    opt = Shampoo4bit(model.parameters(), **SMALL)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(120):
            _backward(model)
            if step % 10 == 0:
                model[0].weight.grad[0, 0] = float("inf")
            opt.step()
        assert opt.counters["skipped_nonfinite"] == 12
    assert not _skip_warnings(record)


# -- 11. copies ---------------------------------------------------------------------------------


def _next_step(model, opt):
    _backward(model)
    opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_keeps_counters_and_steps_like_the_original(how):
    model = _mlp()
    opt = Shampoo4bit(model.parameters(), **SMALL | dict(stat_interval=2, root_interval=4))
    _train(model, opt, 4)
    _backward(model)
    model[2].weight.grad[0, 0] = float("nan")
    opt.step()  # clock 5: a steady step skipped on the device
    _train(model, opt, 1)
    counts = _counts(opt)
    assert counts["skipped_nonfinite"] == 1 and counts["steps"] == 6
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert _counts(opt2) == counts
    for _ in range(3):  # clocks 7, 8 (statistics and roots), 9
        p1, p2 = _next_step(model, opt), _next_step(model2, opt2)
        for a, b in zip(p1, p2):
            assert torch.equal(a, b)
    assert _counts(opt2) == _counts(opt)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert opt.state[p].keys() == opt2.state[q].keys()
        for k, v in opt.state[p].items():
            assert _same(v, opt2.state[q][k]), k
