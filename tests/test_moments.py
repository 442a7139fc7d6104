"""Quantized first-order moments (``quant/moments.py``) and their fused kernel."""

import io
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_shampoo4 import kernels
from lightning_shampoo4.quant import moments as M

HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8)


def _adamw(p, g, state, bits, step, lr=1e-2, wd=0.1, backend="auto"):
    M.adamw_update(p, g, state, lr=lr, weight_decay=wd, step=step, bits=bits, backend=backend, **HYPER)


def _dense_moments(state, p, bits, names=("exp_avg", "exp_avg_sq")):
    """The moments of ``state`` as fp32 tensors of ``p``'s shape."""
    spec = M.moment_spec(p.numel(), bits)
    out = []
    for name in names:
        if not spec.quantized:
            out.append(state[name].float())
            continue
        cb = M.moment_codebook(name, bits)
        flat = M.dequantize_moment(state[f"{name}_codes"], state[f"{name}_absmax"], cb, p.numel(), bits, spec.block_size)
        out.append(flat.view(p.shape))
    return out


# ----------------------------------------------------------------------------- spec, maps, bytes


def test_spec_thresholds_and_validation():
    assert M.moment_spec(4095, 4) == M.MomentSpec(4095, 32)
    assert M.moment_spec((64, 64), 4) == M.MomentSpec(4096, 4, 128)
    assert M.moment_spec((64, 64), 8).block_size == 256
    assert not M.moment_spec((1000, 1000), 32).quantized
    with pytest.raises(ValueError, match="bits"):
        M.moment_spec(10_000, 16)
    with pytest.raises(ValueError, match="base"):
        M.init_moments(torch.zeros(3), "adam", 32)


@pytest.mark.parametrize("bits", [4, 8])
def test_maps(bits):
    u = M.unsigned_map(bits)
    assert u.numel() == 2**bits and u.dtype == torch.float32
    assert torch.all(u[1:] > u[:-1]) and u.max() == 1.0
    assert u.min() > 0  # no zero: the second moment never decodes to 0 inside a non-zero block
    s = M.moment_codebook("exp_avg", bits)
    assert s.numel() == 2**bits and (s == 0).any()  # the signed map keeps an exact zero


def test_exact_state_bytes():
    p = torch.empty(1000, 1000)
    state = M.init_moments(p, "adamw", 4)
    nblocks = math.ceil(1_000_000 / 128)  # 7813
    expected = 2 * (500_000 + 4 * nblocks)  # 1,062,504 bytes
    assert sum(t.numel() * t.element_size() for t in state.values()) == expected == 1_062_504
    assert M.moment_bytes((1000, 1000), "adamw", 4) == expected
    assert M.moment_bytes((1000, 1000), "adamw", 8) == 2 * (1_000_000 + 4 * math.ceil(1_000_000 / 256))
    assert M.moment_bytes((1000, 1000), "adamw", 32) == 8_000_000
    assert M.moment_bytes((1000, 1000), "sgd", 4) == expected // 2
    assert M.moment_bytes((10, 10), "adamw", 4) == 800  # small tensors stay fp32


@pytest.mark.parametrize("base", ["adamw", "sgd"])
@pytest.mark.parametrize("bits", [4, 8])
def test_state_is_plain_uint8_and_fp32(base, bits):
    p = torch.randn(70, 90)
    state = M.init_moments(p, base, bits)
    names = M.moment_names(base)
    assert set(state) == {f"{n}_{part}" for n in names for part in ("codes", "absmax")}
    for key, t in state.items():
        assert any(key.startswith(n) for n in names)
        assert type(t) is torch.Tensor and t.dtype == (torch.uint8 if key.endswith("_codes") else torch.float32)
    assert M.init_moments(p, "sgd", bits, momentum=0.0) == {}


# ----------------------------------------------------------------------------- exactness at 32 bits


def _torch_trajectory(opt_cls, params, grads, lrs, **kw):
    params = [p.clone() for p in params]
    opt = opt_cls([{"params": [p]} for p in params], lr=lrs[0], **kw)
    for lr, gs in zip(lrs, grads):
        for group, p, g in zip(opt.param_groups, params, gs):
            group["lr"] = lr
            p.grad = g.clone()
        opt.step()
    return params


SHAPES = [(80, 80), (7,), (8, 4, 3, 3), (4097,)]


@pytest.mark.parametrize("bits", [32, 4])  # at 4 bits only the tensors below the threshold stay exact
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_bits32_matches_torch(bits, dtype):
    shapes = SHAPES if bits == 32 else [(7,), (8, 4, 3, 3), (63, 65)]
    params = [torch.randn(s).to(dtype) for s in shapes]
    lrs = [1e-2, 3e-3, 5e-3, 1e-3, 2e-2]  # a schedule: every call must read the new value
    grads = [[torch.randn(s).to(dtype) for s in shapes] for _ in lrs]
    want = _torch_trajectory(torch.optim.AdamW, params, grads, lrs, weight_decay=0.1, foreach=False, **_betas())
    got = [p.clone() for p in params]
    states = [M.init_moments(p, "adamw", bits) for p in got]
    for step, (lr, gs) in enumerate(zip(lrs, grads), start=1):
        for p, g, st in zip(got, gs, states):
            _adamw(p, g, st, bits, step, lr=lr)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _betas():
    return dict(betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"])


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.9, False, 0.0), (0.9, True, 1e-2), (0.0, False, 1e-2)])
def test_sgd_bits32_matches_torch(momentum, nesterov, wd):
    params = [torch.randn(s) for s in SHAPES]
    lrs = [0.1, 0.05, 0.2, 0.01]
    grads = [[torch.randn(s) for s in SHAPES] for _ in lrs]
    want = _torch_trajectory(
        torch.optim.SGD, params, grads, lrs, momentum=momentum, nesterov=nesterov, weight_decay=wd, foreach=False
    )
    got = [p.clone() for p in params]
    states = [M.init_moments(p, "sgd", 32, momentum=momentum) for p in got]
    for lr, gs in zip(lrs, grads):
        for p, g, st in zip(got, gs, states):
            M.sgd_update(p, g, st, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd, bits=32)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_foreach_matches_torch_and_single_tensor():
    shapes = SHAPES + [(3, 5)]
    params = [torch.randn(s) for s in shapes]
    lrs = [1e-2, 5e-3, 2e-3]
    grads = [[torch.randn(s) for s in shapes] for _ in lrs]
    want = _torch_trajectory(torch.optim.AdamW, params, grads, lrs, weight_decay=0.1, foreach=True, **_betas())
    fe = [p.clone() for p in params]
    single = [p.clone() for p in params]
    fe_m = [torch.zeros_like(p) for p in fe]
    fe_v = [torch.zeros_like(p) for p in fe]
    states = [M.init_moments(p, "adamw", 32) for p in single]
    for step, (lr, gs) in enumerate(zip(lrs, grads), start=1):
        M.adamw_update_foreach(fe, gs, fe_m, fe_v, lr=lr, weight_decay=0.1, step=step, **HYPER)
        for p, g, st in zip(single, gs, states):
            _adamw(p, g, st, 32, step, lr=lr)
    for a, b, c, st, m in zip(fe, want, single, states, fe_m):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m, st["exp_avg"], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="steps"):
        M.adamw_update_foreach(fe, grads[0], fe_m, fe_v, lr=1e-3, weight_decay=0.0, step=[1, 2], **HYPER)


# ----------------------------------------------------------------------------- 8 / 4 bits vs fp32


def _grads(shape, steps, seed=0):
    """Gradients with a per-row scale spread over 3 decades and a persistent mean, like real layers."""
    gen = torch.Generator().manual_seed(seed)
    rows = shape[0]
    scale = torch.logspace(-3, 0, rows)[torch.randperm(rows, generator=gen)].view(rows, *([1] * (len(shape) - 1)))
    mean = torch.randn(shape, generator=gen)
    return [(mean + torch.randn(shape, generator=gen)) * scale for _ in range(steps)]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _one_shot(x, name, bits):
    """Relative error of quantizing ``x`` once: the floor for moments kept quantized."""
    cb, bs = M.moment_codebook(name, bits), M.BLOCK_SIZES[bits]
    y = M.dequantize_moment(*M.quantize_moment(x, cb, bits, bs), cb, x.numel(), bits, bs)
    return _rel(y.view_as(x), x)


@pytest.mark.parametrize("bits,cap,p_tol", [(8, 0.05, 0.2), (4, 0.45, 0.6)])
def test_quantized_adamw_tracks_fp32(bits, cap, p_tol):
    """After 30 steps the quantized moments are within a small multiple of the error of a single
    quantization of the fp32 moments (no drift from re-quantizing every step)."""
    shape = (64, 96)
    p0 = torch.randn(shape)
    p32, pq = p0.clone(), p0.clone()
    s32, sq = M.init_moments(p32, "adamw", 32), M.init_moments(pq, "adamw", bits)
    for step, g in enumerate(_grads(shape, 30), start=1):
        _adamw(p32, g, s32, 32, step, lr=1e-3, wd=0.01)
        _adamw(pq, g, sq, bits, step, lr=1e-3, wd=0.01)
    for name, x in zip(("exp_avg", "exp_avg_sq"), _dense_moments(sq, pq, bits)):
        err = _rel(x, s32[name])
        assert err < cap and err < 3.5 * _one_shot(s32[name], name, bits), (name, err)
    assert _rel(pq - p0, p32 - p0) < p_tol


@pytest.mark.parametrize("bits,cap,p_tol", [(8, 0.05, 0.05), (4, 0.45, 0.3)])
def test_quantized_sgd_tracks_fp32(bits, cap, p_tol):
    shape = (64, 96)
    p0 = torch.randn(shape)
    p32, pq = p0.clone(), p0.clone()
    s32, sq = M.init_moments(p32, "sgd", 32), M.init_moments(pq, "sgd", bits)
    for g in _grads(shape, 20):
        for p, st, b in ((p32, s32, 32), (pq, sq, bits)):
            M.sgd_update(p, g, st, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3, bits=b)
    (buf,) = _dense_moments(sq, pq, bits, names=("momentum_buffer",))
    ref = s32["momentum_buffer"]
    err = _rel(buf, ref)
    assert err < cap and err < 3.5 * _one_shot(ref, "momentum_buffer", bits), err
    assert _rel(pq - p0, p32 - p0) < p_tol


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_tiny_training_run_converges(bits):
    """A 2-layer MLP on a fixed teacher: 4- and 8-bit AdamW reach the fp32 loss."""
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    y = torch.tanh(x @ torch.randn(32, 8)) @ torch.randn(8, 4)
    w1 = (torch.randn(32, 256) / 32**0.5).requires_grad_()  # 8192 elements: quantized
    w2 = (torch.randn(256, 4) / 16).requires_grad_()  # 1024 elements: fp32
    states = [M.init_moments(w, "adamw", bits) for w in (w1, w2)]
    first = None
    for step in range(1, 151):
        loss = F.mse_loss(torch.relu(x @ w1) @ w2, y)
        first = first if first is not None else loss.item()
        w1.grad = w2.grad = None
        loss.backward()
        with torch.no_grad():
            for w, st in zip((w1, w2), states):
                _adamw(w, w.grad, st, bits, step, lr=1e-2, wd=0.01)
    final = F.mse_loss(torch.relu(x @ w1) @ w2, y).item()
    assert final < 0.05 * first, (bits, first, final)


# ----------------------------------------------------------------------------- zero point, odd sizes


def test_zero_gradients_do_not_blow_up(monkeypatch):
    """Entries whose gradient is exactly zero for many steps, in blocks that stay active: their
    second moment decays far below the block scale. A map with a zero would decode it to 0 and
    step by m / eps; the map without zero keeps every step below the fp32 Adam bound (~lr)."""
    shape, lr = (64, 128), 1e-3

    def max_step(bits):
        torch.manual_seed(0)
        p = torch.randn(shape)
        st = M.init_moments(p, "adamw", bits)
        worst = 0.0
        for step in range(1, 101):
            g = torch.randn(shape)
            if step > 1:
                g[:, 1::2] = 0.0  # half of every block goes silent after the first step
            before = p.clone()
            _adamw(p, g, st, bits, step, lr=lr, wd=0.0)
            worst = max(worst, (p - before).abs().max().item())
        return worst

    for bits in (32, 8, 4):
        assert max_step(bits) < 3 * lr, bits
    with_zero = lambda bits, device=None: torch.cat([torch.zeros(1), M._unsigned_cpu(bits)[1:]])  # noqa: E731
    monkeypatch.setattr(M, "unsigned_map", with_zero)
    assert max_step(4) > 100 * lr  # the zero-point problem this map avoids


@pytest.mark.parametrize("shape", [(4097,), (4099,), (3, 5, 7, 41), (64, 32, 3), (16, 8, 3, 3), (5,)])
@pytest.mark.parametrize("bits", [8, 4])
def test_odd_sizes(shape, bits):
    p0 = torch.randn(shape)
    p, p32 = p0.clone(), p0.clone()
    st, st32 = M.init_moments(p, "adamw", bits), M.init_moments(p32, "adamw", 32)
    spec = M.moment_spec(shape, bits)
    assert spec.quantized == (math.prod(shape) >= 4096)
    assert ("exp_avg_codes" in st) == spec.quantized and ("exp_avg" in st) != spec.quantized
    for step in range(1, 6):
        g = torch.randn(shape)
        _adamw(p, g, st, bits, step)
        _adamw(p32, g, st32, 32, step)
    assert p.shape == shape and torch.isfinite(p).all()
    if not spec.quantized:
        assert torch.equal(p, p32)
    else:
        assert st["exp_avg_codes"].numel() == (math.prod(shape) + 1) // 2 if bits == 4 else math.prod(shape)
        assert ((p - p32).norm() / (p32 - p0).norm()).item() < 0.15


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params(dtype):
    """bf16 / fp16 parameters: the step is computed in fp32 from the same uint8 / fp32 state and
    only the new parameter is rounded to its dtype."""
    p = torch.randn(64, 80).to(dtype)
    st = M.init_moments(p, "adamw", 4)
    assert all(t.dtype in (torch.uint8, torch.float32) for t in st.values())
    for step, g in enumerate(_grads((64, 80), 4), start=1):
        q, st_q = p.float(), {k: t.clone() for k, t in st.items()}
        _adamw(p, g.to(dtype), st, 4, step)
        _adamw(q, g.to(dtype).float(), st_q, 4, step)
        assert p.dtype == dtype and torch.equal(p, q.to(dtype))
        assert all(torch.equal(st[k], st_q[k]) for k in st)


def test_noncontiguous_param():
    base = torch.randn(96, 64)
    p, ref = base.t(), base.t().contiguous()  # a transposed view, updated in place
    st, st_ref = M.init_moments(p, "adamw", 4), M.init_moments(ref, "adamw", 4)
    for step in range(1, 4):
        g = torch.randn(64, 96)
        _adamw(p, g, st, 4, step)
        _adamw(ref, g, st_ref, 4, step)
    assert torch.equal(p, ref) and torch.equal(base.t(), ref)
    assert all(torch.equal(st[k], st_ref[k]) for k in st)


def test_state_mismatch_is_explained():
    p = torch.randn(80, 80)
    st = M.init_moments(p, "adamw", 32)
    with pytest.raises(KeyError, match="other bits"):
        _adamw(p, torch.randn(80, 80), st, 4, 1)
    st = M.init_moments(p, "adamw", 4)
    with pytest.raises(ValueError, match="do not fit"):
        _adamw(p, torch.randn(80, 80), st, 8, 1)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("base", ["adamw", "sgd"])
@pytest.mark.parametrize("bits", [32, 8, 4])
def test_checkpoint_roundtrip_continues_bit_identically(base, bits):
    shape = (72, 100)
    p = torch.randn(shape)
    state = M.init_moments(p, base, bits)

    def run(p, state, steps):
        for step in steps:
            g = torch.randn(shape, generator=torch.Generator().manual_seed(step))
            if base == "adamw":
                _adamw(p, g, state, bits, step)
            else:
                M.sgd_update(p, g, state, lr=0.05, momentum=0.9, nesterov=False, weight_decay=1e-3, bits=bits)

    run(p, state, range(1, 4))
    buf = io.BytesIO()
    torch.save({"param": p, "state": state}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    run(p, state, range(4, 8))
    run(loaded["param"], loaded["state"], range(4, 8))
    assert torch.equal(p, loaded["param"])
    assert state.keys() == loaded["state"].keys()
    assert all(torch.equal(state[k], loaded["state"][k]) for k in state)


def test_tensor_hyperparameters():
    """0-dim tensor lr / step (as some schedulers and optimizers keep them) give the same step as floats."""
    p = torch.randn(80, 80)
    q = p.clone()
    sp, sq = M.init_moments(p, "adamw", 4), M.init_moments(q, "adamw", 4)
    g = torch.randn(80, 80)
    M.adamw_update(p, g, sp, lr=1e-3, weight_decay=0.1, step=1, bits=4, **HYPER)
    lr = torch.tensor(1e-3, dtype=torch.float64)
    M.adamw_update(q, g, sq, lr=lr, weight_decay=0.1, step=torch.tensor(1.0), bits=4, **HYPER)
    assert torch.equal(p, q)


# ----------------------------------------------------------------------------- kernel vs reference

device = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="triton is not installed")


def _hyper(base, nesterov=False, wd=0.1):
    if base == "adamw":
        return {
            "w1": M._f32(0.1), "beta2": M._f32(0.999), "w2": M._f32(0.001), "eps": M._f32(1e-8),
            "inv_bc2": M._f32(1 / math.sqrt(1 - 0.999**3)), "decay": M._f32(1 - 1e-2 * wd) if wd else 1.0,
            "neg_step": M._f32(-1e-2 / (1 - 0.9**3)),
        }  # fmt: skip
    return {"momentum": M._f32(0.9), "weight_decay": M._f32(wd), "neg_lr": M._f32(-0.1), "nesterov": nesterov}


def _random_moments(base, numel, bits, block_size):
    out = []
    for name in M.moment_names(base):
        cb = M.moment_codebook(name, bits, device)
        x = torch.randn(numel, device=device) * torch.logspace(-4, 0, numel, device=device)
        x = x.abs() if name == "exp_avg_sq" else x
        out.append((*M.quantize_moment(x, cb, bits, block_size), cb))
    return out


def _assert_kernel_matches(base, numel, bits, block_size, dtype, **hkw):
    p = torch.randn(numel, device=device).to(dtype)
    g = torch.randn(numel, device=device).to(dtype)
    g[::5] = 0
    hyper = _hyper(base, **hkw)
    ref = _random_moments(base, numel, bits, block_size)
    got = [(c.clone(), a.clone(), cb) for c, a, cb in ref]
    p_ref, p_got = p.clone(), p.clone()
    M.reference_update(base, p_ref, g, ref, bits=bits, block_size=block_size, hyper=hyper)
    kernels.moment_update(base, p_got, g, got, bits=bits, block_size=block_size, hyper=hyper, backend="triton")
    exact = device == "cpu"  # the interpreter is exact; compiled kernels may contract into FMAs
    if exact:
        assert torch.equal(p_got, p_ref)
    else:
        torch.testing.assert_close(p_got, p_ref, rtol=1e-5, atol=1e-6)
    for (c1, a1, _), (c2, a2, _) in zip(got, ref):
        torch.testing.assert_close(a1, a2, rtol=0 if exact else 1e-6, atol=0)
        mismatch = (c1 != c2).float().mean().item()
        assert mismatch == 0 if exact else mismatch < 0.01


@pytest.mark.kernels
@needs_triton
@pytest.mark.parametrize("base", ["adamw", "sgd"])
@pytest.mark.parametrize(
    "numel,bits,block_size",
    [(1, 4, 8), (37, 4, 8), (64, 4, 16), (129, 4, 128), (37, 8, 8), (300, 8, 256), (6, 4, 2)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(base, numel, bits, block_size, dtype):
    _assert_kernel_matches(base, numel, bits, block_size, dtype)


@pytest.mark.kernels
@needs_triton
@pytest.mark.parametrize("base,hkw", [("adamw", {"wd": 0.0}), ("sgd", {"nesterov": True}), ("sgd", {"wd": 0.0})])
def test_kernel_variants(base, hkw):
    _assert_kernel_matches(base, 45, 4, 8, torch.float32, **hkw)
    _assert_kernel_matches(base, 45, 8, 4, torch.float16, **hkw)


@pytest.mark.kernels
@needs_triton
def test_kernel_through_public_api():
    """``backend="triton"`` on a quantized tensor (4096+ elements) and a non-contiguous one."""
    for shape, bits in (((2, 2049), 4), ((65, 64), 8)):
        base = torch.randn(shape[::-1], device=device)
        p_t, p_r = base.t(), base.t().contiguous()
        st_t, st_r = M.init_moments(p_t, "adamw", bits), M.init_moments(p_r, "adamw", bits)
        for step in range(1, 3):
            g = torch.randn(shape, device=device)
            _adamw(p_t, g, st_t, bits, step, backend="triton")
            _adamw(p_r, g, st_r, bits, step, backend="torch")
        torch.testing.assert_close(p_t, p_r, rtol=0 if device == "cpu" else 1e-5, atol=0 if device == "cpu" else 1e-6)
        for k in st_t:
            if device == "cpu":
                assert torch.equal(st_t[k], st_r[k]), k
