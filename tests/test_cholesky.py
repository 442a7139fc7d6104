"""``storage="cholesky"``: the statistic stored as its quantized Cholesky factor, at 4 bits with
error feedback ("ef") or with 8-bit codes and no error state ("c8", the default). Codec,
error feedback, accuracy against a float64 Shampoo, training, checkpoints, memory accounting
and failure handling."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from lightning_shampoo4 import Shampoo4bit
from lightning_shampoo4.optim import COUNTERS, CheckpointMismatchError
from lightning_shampoo4.optim.storage import FAILED, OK, RETRIED, FactorConfig, storage_for
from lightning_shampoo4.optim.storage.cholesky import CholeskyStorage

BETA, EPS = 0.95, 1e-6


def _spell(kind, bits=4):
    """The storage settings of ``kind``: "ef" (Li et al.: the factor at ``bits`` with error
    feedback), "c8" (the default: the factor at 8 bits, no error state) or "eigenvectors"."""
    return {
        "ef": dict(storage="cholesky", statistic_bits=bits, error_feedback=True),
        "c8": dict(storage="cholesky", statistic_bits=8, error_feedback=False),
        "eigenvectors": dict(storage="eigenvectors", statistic_bits=None, error_feedback=None),
    }[kind]


def _storage(n, bits=4, kind="ef", **kw):
    """A stand-alone cholesky storage of order ``n`` (quantized whatever its size)."""
    p = nn.Parameter(torch.zeros(2, 2))
    group = Shampoo4bit([p], bits=bits, min_quant_numel=0, **_spell(kind, bits), **kw).param_groups[0]
    storage = storage_for(FactorConfig.from_group(group, n))
    assert isinstance(storage, CholeskyStorage) and storage.cfg.quantized
    return storage


def _lower(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, n, generator=g).tril()
    c.diagonal().abs_().add_(0.1)
    return c


def _nre(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def _pd(n, cond, seed=0):
    """A float64 symmetric positive definite matrix with log-spaced spectrum 1 .. 1 / cond."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q * torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)) @ q.T


# -- the stored triangle ------------------------------------------------------------------------


@pytest.mark.parametrize("bits, kind, bound", [(8, "ef", 0.02), (4, "ef", 0.15), (4, "c8", 0.02)])
@pytest.mark.parametrize("n", [1, 2, 7, 65, 300])
def test_triangle_round_trip(n, bits, kind, bound):
    s = _storage(n, bits, kind)
    c = _lower(n, seed=n)
    entries = s._put("chol", c)
    assert set(entries) == {"chol_codes", "chol_absmax", "chol_diag"}
    back = s.chol(entries)
    assert back.dtype == torch.float32 and back.shape == (n, n)
    assert torch.equal(back.triu(1), torch.zeros(n, n))  # exactly lower triangular
    assert torch.equal(back.diagonal(), c.diagonal())  # the diagonal is kept in fp32
    assert _nre(back, c) < bound
    # and the description used for checkpoint checks has the real shapes and dtypes
    meta = s._put("chol", c.to("meta"))
    assert {k: (v.shape, v.dtype) for k, v in meta.items()} == {k: (v.shape, v.dtype) for k, v in entries.items()}


def test_init_describe_and_unquantized_layout():
    s = _storage(70)
    st = s.init(torch.device("cpu"))
    assert set(st) == {"chol_codes", "chol_absmax", "chol_diag", "ef_codes", "ef_absmax",
                       "root_codes", "root_absmax", "root_diag"}
    assert torch.allclose(s.statistic(st), EPS * torch.eye(70), rtol=1e-6, atol=0)
    assert torch.equal(s.root(st), torch.eye(70)) and not s.error(st).any()
    meta = s.init(torch.device("meta"))
    assert {k: (v.shape, v.dtype) for k, v in meta.items()} == {k: (v.shape, v.dtype) for k, v in st.items()}
    # cholesky8: no error state; the factor's codes are bytes, the root's still packed nibbles
    s8 = _storage(70, kind="c8")
    assert not s8.error_feedback
    st8 = s8.init(torch.device("cpu"))
    assert set(st8) == {"chol_codes", "chol_absmax", "chol_diag", "root_codes", "root_absmax", "root_diag"}
    assert st8["chol_codes"].numel() == 70 * 69 // 2 and st8["root_codes"].numel() == st["root_codes"].numel()
    meta = s8.init(torch.device("meta"))
    assert {k: (v.shape, v.dtype) for k, v in meta.items()} == {k: (v.shape, v.dtype) for k, v in st8.items()}
    upd = s8.update_stats(st8, _pd(70, 1e2).float())
    assert upd.status == OK and set(upd.entries) == {"chol_codes", "chol_absmax", "chol_diag"}
    assert _nre(s8.chol(upd.entries), upd.fresh["chol"]) < 0.01
    # below min_quant_numel: C itself in fp32, no error state
    p = nn.Parameter(torch.zeros(2, 2))
    small = storage_for(FactorConfig.from_group(Shampoo4bit([p], **_spell("ef")).param_groups[0], 10))
    st = small.init(torch.device("cpu"))
    assert set(st) == {"chol", "root"} and st["chol"].dtype == torch.float32
    m = _pd(10, 10.0).float()
    upd = small.update_stats(st, m)
    exact = torch.linalg.cholesky(BETA * EPS * torch.eye(10, dtype=torch.float64) + (1 - BETA) * m.double())
    assert upd.status == OK and torch.allclose(upd.entries["chol"].double(), exact, rtol=1e-5, atol=1e-7)


def test_32_bits_stays_dense_whatever_the_storage():
    p = nn.Parameter(torch.zeros(80, 80))
    opt = Shampoo4bit([p], bits=32, storage="cholesky")
    opt.init_state()
    assert {k.split(".", 2)[2] for k in opt.state[p] if k[0].isdigit()} == {"factor", "root"}


# -- error feedback -----------------------------------------------------------------------------


def _fixed_target_run(feedback, n=96, steps=40, last=20, beta=0.5):
    """Feed the same M every update; time averages over the last ``last`` updates of the stored C
    and of the exact float64 Cholesky factor of the exact EMA, and of both statistics."""
    target = _pd(n, 1e3, seed=3)
    s = _storage(n, shampoo_beta=beta)
    s._feedback = feedback
    st = s.init(torch.device("cpu"))
    exact = EPS * torch.eye(n, dtype=torch.float64)
    sums = dict(c=0.0, c_ref=0.0, a=0.0, a_ref=0.0)
    for t in range(steps):
        prev_err = s.error(st)
        upd = s.update_stats(st, target.float())
        assert upd.status == OK
        st = {**st, **upd.entries}
        err = s.error(st)
        assert torch.equal(err.triu(), torch.zeros(n, n))  # strictly lower: C's diagonal is exact
        # what was stored plus what it lost is this update's factor plus the error carried in
        # (up to the 4-bit codes of the new error itself, a small fraction of it)
        if feedback == 1.0:
            lhs, rhs = s.chol(st) + err, upd.fresh["chol"] + prev_err
            assert float((lhs - rhs).norm()) < 0.2 * float(err.norm()) + 1e-12
        exact = beta * exact + (1 - beta) * target
        if t >= steps - last:
            c = s.chol(st).double()
            sums["c"] += c / last
            sums["c_ref"] += torch.linalg.cholesky(exact) / last
            sums["a"] += c @ c.T / last
            sums["a_ref"] += exact / last
    return _nre(sums["c"], sums["c_ref"]), _nre(sums["a"], sums["a_ref"])


def test_error_feedback_cancels_the_requantization_error():
    with_c, with_a = _fixed_target_run(1.0)
    without_c, without_a = _fixed_target_run(0.0)
    # measured: C 0.037 vs 0.092, C C^T 0.017 vs 0.099
    assert with_c < 0.6 * without_c
    assert with_a < 0.4 * without_a
    assert with_c < 0.06 and with_a < 0.04


def test_requantizing_the_factor_from_itself_accumulates_no_rounding_bias():
    """cholesky8 re-quantizes C from the C it stored: any bias of a single rounding compounds
    over the EMA's memory. With gradients shrinking (late training) the old state dominates, and
    bf16 scales rounded up (every block maximum inflated by up to 2^-8) gave a statistic 0.43
    away from the exact EMA after 150 updates; rounded to nearest: 0.046."""
    n = 96
    s = _storage(n, kind="c8")
    st = s.init(torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    a = _factor_half(n, 1e4, gen)
    exact = EPS * torch.eye(n, dtype=torch.float64)
    for t in range(150):
        g = 0.97**t * a @ torch.randn(n, 2 * n, generator=gen, dtype=torch.float64) / n
        exact = BETA * exact + (1 - BETA) * g @ g.T
        upd = s.update_stats(st, (g @ g.T).float())
        assert upd.status in (OK, RETRIED)
        st = {**st, **upd.entries}
    assert _nre(s.statistic(st), exact) < 0.08


def _factor_half(order, cond, gen):
    q, _ = torch.linalg.qr(torch.randn(order, order, generator=gen, dtype=torch.float64))
    return q * torch.logspace(0, -0.5 * math.log10(cond), order, dtype=torch.float64)


def _exact_root(a):
    w, v = torch.linalg.eigh(a)
    w = w.clamp(min=0)
    return (v * (w + EPS * w.max()).pow(-0.25)) @ v.T


def _root_drift(kind, m=64, n=96, steps=60, cond=1e3, seed=0):
    """Worst root NRE over updates 20..steps against a float64 Shampoo on G = A Z B."""
    gen = torch.Generator().manual_seed(seed)
    a, b = _factor_half(m, cond, gen), _factor_half(n, cond, gen).T
    p = nn.Parameter(torch.zeros(m, n))
    opt = Shampoo4bit([p], lr=0.0, weight_decay=0.0, bits=4, **_spell(kind), stat_interval=1, root_interval=1,
                      shampoo_beta=BETA, matrix_eps=EPS)
    stats = {"L": EPS * torch.eye(m, dtype=torch.float64), "R": EPS * torch.eye(n, dtype=torch.float64)}
    worst = 0.0
    for t in range(1, steps + 1):
        g = a @ torch.randn(m, n, generator=gen, dtype=torch.float64) @ b / math.sqrt(m * n)
        p.grad = g.float()
        opt.step()
        stats["L"] = BETA * stats["L"] + (1 - BETA) * g @ g.T
        stats["R"] = BETA * stats["R"] + (1 - BETA) * g.T @ g
        if t >= 20:
            for _, _, side, f in opt.factors():
                worst = max(worst, _nre(f.root(), _exact_root(stats[side])))
    assert opt.counters["failed_updates"] == 0
    return worst


def test_root_stays_close_to_float64_shampoo_on_an_ill_conditioned_stream():
    chol = _root_drift("ef")
    chol8 = _root_drift("c8")
    eigen = _root_drift("eigenvectors")
    # measured (seeds 0-2): cholesky 0.138-0.142, cholesky8 0.051-0.052, eigenvectors 0.265-0.269;
    # 4-bit without error feedback 0.29, cholesky at 8 bits 0.007
    assert chol < 0.2
    assert chol < eigen
    assert chol8 < 0.6 * chol


# -- training and checkpoints -----------------------------------------------------------------


def _model(seed=0):
    torch.manual_seed(seed)
    # orders 80 (quantized) and 32, 4 (fp32 below min_quant_numel)
    return nn.Sequential(nn.Linear(32, 80), nn.Tanh(), nn.Linear(80, 4))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 32, generator=g)
    w = torch.randn(32, 4, generator=g) / math.sqrt(32)
    return x, torch.tanh(x @ w) + 0.5 * (x @ w)


KW = dict(**_spell("ef"), lr=3e-3, stat_interval=1, root_interval=2)


def _train(model, opt, steps):
    x, y = _data()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("bits, kind", [(4, "ef"), (8, "ef"), (4, "c8")])
def test_training_reduces_the_loss(bits, kind):
    model = _model()
    opt = Shampoo4bit(model.parameters(), bits=bits, **(KW | _spell(kind, bits)))
    losses = _train(model, opt, 40)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.2 * losses[0]
    assert opt.counters["root_updates"] > 0 and opt.counters["failed_updates"] == 0
    state = opt.state[model[0].weight]
    assert any(k.endswith("chol_codes") for k in state)  # the quantized path ran
    assert any(k.endswith("ef_codes") for k in state) == (kind == "ef")


def test_schur_newton_root_matches_the_eigh_root():
    s = _storage(70, root_method="schur_newton")
    st = s.init(torch.device("cpu"))
    st = {**st, **s.update_stats(st, _pd(70, 1e2).float()).entries}
    upd = s.update_root(st)
    assert upd.status == OK
    a = s.statistic(st).double()
    assert _nre(s.root({**st, **upd.entries}), _exact_root(a)) < 0.1  # the 4-bit root's own error


@pytest.mark.parametrize("kind", ["ef", "c8"])
def test_weights_only_checkpoint_resumes_bit_identically(kind):
    kw = KW | _spell(kind)
    full = _model()
    opt_full = Shampoo4bit(full.parameters(), **kw)
    _train(full, opt_full, 9)

    first = _model()
    opt_first = Shampoo4bit(first.parameters(), **kw)
    _train(first, opt_first, 5)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt_first.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = _model(seed=7)
    resumed.load_state_dict(ckpt["model"])
    opt_resumed = Shampoo4bit(resumed.parameters(), **kw)
    opt_resumed.load_state_dict(ckpt["opt"])
    _train(resumed, opt_resumed, 4)

    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        s1, s2 = opt_full.state[p], opt_resumed.state[q]
        assert s1.keys() == s2.keys()
        for k, v in s1.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == s2[k].dtype and torch.equal(v, s2[k]), k
            else:
                assert v == s2[k], k
    for k in COUNTERS:
        assert opt_resumed.counters[k] == opt_full.counters[k], k


@pytest.mark.parametrize("other", [_spell("eigenvectors"), _spell("c8"), dict(bits=8, statistic_bits=8),
                                   dict(block_size=32)])
def test_checkpoint_state_must_fit_its_format(other):
    model = _model()
    opt = Shampoo4bit(model.parameters(), **KW)
    _train(model, opt, 2)
    sd = opt.state_dict()
    # a checkpoint's groups carry its format (as torch's optimizers load their hyper-parameters),
    # so an optimizer built with other settings becomes a cholesky one, state unchanged
    target_model = _model()
    target = Shampoo4bit(target_model.parameters(), **(KW | other))
    target.load_state_dict(copy.deepcopy(sd))
    assert all(target.param_groups[0][k] == v for k, v in KW.items())
    w, v = model[0].weight, target_model[0].weight
    assert all(torch.equal(opt.state[w][k], target.state[v][k]) for k in opt.state[w] if k[0].isdigit())
    assert all(math.isfinite(x) for x in _train(target_model, target, 2))
    # cholesky state under groups that say otherwise is refused, and the other way round
    mixed = copy.deepcopy(sd)
    for g in mixed["param_groups"]:
        g.update(other)
    with pytest.raises(CheckpointMismatchError, match="0.L"):
        Shampoo4bit(_model().parameters(), **KW).load_state_dict(mixed)
    src = _model()
    opt_src = Shampoo4bit(src.parameters(), **(KW | other))
    _train(src, opt_src, 2)
    mixed = copy.deepcopy(opt_src.state_dict())
    for g in mixed["param_groups"]:
        g.update(_spell("ef"), bits=4, block_size=64)
    with pytest.raises(CheckpointMismatchError, match="0.L"):
        Shampoo4bit(_model().parameters(), **(KW | other)).load_state_dict(mixed)


# -- memory ---------------------------------------------------------------------------------------


def test_memory_report_is_exact_and_close_to_the_eigen_mode():
    n = 256
    p = nn.Parameter(torch.zeros(n, n))
    opt = Shampoo4bit([p], **_spell("ef"))
    p.grad = torch.randn(n, n)
    opt.step()
    st = opt.state[p]
    report = opt.memory_report()
    assert report["total"] == sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    second = sum(v.numel() * v.element_size() for k, v in st.items() if k[0].isdigit())
    assert report["second_order"] == second and report["other"] == 4  # the step counter
    # per factor: two strict triangles of 4-bit codes with bf16 scales per 64 along each column,
    # C's fp32 diagonal; the root's triangle with bf16 scales per 256 and its fp32 diagonal
    tri = n * (n - 1) // 2
    blocks = lambda size: sum(-(-(n - 1 - i) // size) for i in range(n - 1))  # noqa: E731
    per_factor = 2 * ((tri + 1) // 2 + 2 * blocks(64)) + 4 * n + (tri + 1) // 2 + 2 * blocks(256) + 4 * n
    assert report["second_order"] == 2 * per_factor
    assert report["factors"] == 2 * (2 * ((tri + 1) // 2) + 4 * n)
    q = nn.Parameter(torch.zeros(n, n))
    eigen = Shampoo4bit([q])
    eigen.init_state()
    ratio = report["second_order"] / eigen.memory_report()["second_order"]
    assert 0.85 < ratio < 1.15, ratio


def test_cholesky8_stores_one_8bit_triangle_and_one_4bit_root_at_fewer_bytes_than_cholesky():
    n = 256
    reports = {}
    for quantize in ("cholesky", "cholesky8"):
        p = nn.Parameter(torch.zeros(n, n))
        opt = Shampoo4bit([p], **_spell({"cholesky": "ef", "cholesky8": "c8"}[quantize]))
        p.grad = torch.randn(n, n)
        opt.step()
        reports[quantize] = opt.memory_report()
        st = opt.state[p]
        assert reports[quantize]["second_order"] == sum(
            v.numel() * v.element_size() for k, v in st.items() if k[0].isdigit())
    tri = n * (n - 1) // 2
    blocks = lambda size: sum(-(-(n - 1 - i) // size) for i in range(n - 1))  # noqa: E731
    # per factor: one strict triangle of 8-bit codes with one bf16 scale per column (blocks of up to
    # 1200 down each column) and C's fp32 diagonal, the 4-bit root's triangle in blocks of 40
    per_factor = tri + 2 * blocks(1200) + 4 * n + (tri + 1) // 2 + 2 * blocks(40) + 4 * n
    assert reports["cholesky8"]["second_order"] == 2 * per_factor
    # cholesky: two 4-bit triangles (C and its error) in blocks of 64, the root in blocks of 256
    per_factor = 2 * ((tri + 1) // 2 + 2 * blocks(64)) + 4 * n + (tri + 1) // 2 + 2 * blocks(256) + 4 * n
    assert reports["cholesky"]["second_order"] == 2 * per_factor
    assert reports["cholesky8"]["second_order"] < reports["cholesky"]["second_order"]


# -- failures -------------------------------------------------------------------------------------


def test_overflowing_statistic_fails_and_keeps_the_state():
    model = _model()
    opt = Shampoo4bit(model.parameters(), **KW)
    _train(model, opt, 2)
    w = model[0].weight
    before = {k: v.clone() for k, v in opt.state[w].items() if isinstance(v, torch.Tensor) and k[0].isdigit()}
    failed = opt.counters["failed_updates"]
    x, y = _data()
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    g = torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w.grad = (g * (1e25 / g.norm())).float()  # G G^T overflows fp32
    opt.step()  # clock 3: statistics only
    assert opt.counters["failed_updates"] == failed + 2
    for k, v in before.items():
        assert torch.equal(opt.state[w][k], v), k
    assert all(math.isfinite(x) for x in _train(model, opt, 4))


def test_non_finite_statistic_is_a_failed_update():
    s = _storage(70)
    st = s.init(torch.device("cpu"))
    m = _pd(70, 10.0).float()
    m[3, 5] = float("nan")
    assert s.update_stats(st, m) == (({}, FAILED, None))


def test_cholesky_falls_back_to_float64_then_jitter_then_fails(monkeypatch):
    s = _storage(70)
    st = s.init(torch.device("cpu"))
    m = _pd(70, 10.0).float()
    ok = s.update_stats(st, m)
    assert ok.status == OK

    real = torch.linalg.cholesky_ex

    def no_fp32(a, *args, **kwargs):
        out = real(a, *args, **kwargs)
        return (out[0], torch.ones_like(out[1])) if a.dtype == torch.float32 else out

    monkeypatch.setattr(torch.linalg, "cholesky_ex", no_fp32)
    retried = s.update_stats(st, m)
    assert retried.status == RETRIED
    assert torch.allclose(retried.fresh["chol"], ok.fresh["chol"], rtol=1e-4, atol=1e-6)
    monkeypatch.undo()

    # indefinite by less than the jitter eps * max_i A_ii: factorized after the jitter
    want = torch.ones(70, dtype=torch.float64)
    want[69] = -1e-3 * EPS  # the statistic beta eps I + (1 - beta) M is diag(1, ..., 1, -1e-9)
    slightly = (torch.diag(want) - BETA * EPS * torch.eye(70, dtype=torch.float64)) / (1 - BETA)
    jittered = s.update_stats(st, slightly.float())
    assert jittered.status == RETRIED
    a = jittered.fresh["chol"].double() @ jittered.fresh["chol"].double().T
    assert 0 < float(a[69, 69]) <= EPS * 1.01
    # clearly indefinite: failed, nothing to store
    assert s.update_stats(st, -m) == (({}, FAILED, None))


def test_failed_cholesky_keeps_the_factor_inside_the_optimizer(monkeypatch):
    model = _model()
    opt = Shampoo4bit(model.parameters(), **KW)
    _train(model, opt, 2)
    w = model[0].weight
    before = {k: v.clone() for k, v in opt.state[w].items() if ".chol" in k or ".ef" in k}
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda a, *r, **k: (real(a)[0], torch.ones((), dtype=torch.int32)))
    losses = _train(model, opt, 2)  # clock 3 and 4: every statistics update fails
    assert opt.counters["failed_updates"] == 2 * 2 * 2  # two steps, two weight matrices, two sides
    for k, v in before.items():
        assert torch.equal(opt.state[w][k], v), k
    assert all(math.isfinite(x) for x in losses)
