"""Shampoo4bit: equivalences with torch's optimizers and a float64 reference, checkpoints,
failure handling, argument checking and memory accounting."""

import copy
import io

import pytest
import torch
from torch import nn

from lightning_shampoo4 import Shampoo4bit
from lightning_shampoo4.optim import COUNTERS
from lightning_shampoo4 import linalg as linalg_mod


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 70), nn.Tanh(), nn.Linear(70, 5))


def _data(seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def _train(model, opt, steps, seed=1):
    x, y = _data(seed)
    losses = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        losses.append(opt.step(closure).item())
    return losses


# -- equivalence with the base optimizers ---------------------------------------------------


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_equals_adamw_before_first_root(wd):
    a, b = _model(), _model()
    ours = Shampoo4bit(a.parameters(), lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=wd,
                       stat_interval=2, root_interval=1000)
    ref = torch.optim.AdamW(b.parameters(), lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=wd)
    _train(a, ours, 12)
    _train(b, ref, 12)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("nesterov", [False, True])
def test_equals_sgd_momentum_before_first_root(nesterov):
    a, b = _model(), _model()
    ours = Shampoo4bit(a.parameters(), base="sgd", lr=0.05, momentum=0.9, nesterov=nesterov,
                       weight_decay=5e-4, root_interval=1000, stat_interval=1)
    ref = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=5e-4)
    _train(a, ours, 12)
    _train(b, ref, 12)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# -- 32-bit Shampoo against an independent float64 implementation (docs/algorithms.md) ------


class _Float64Shampoo:
    """The Shampoo update of docs/algorithms.md written directly, in float64: EMA factors, exact eigh roots with
    relative damping, grafting, AdamW. Tensors are whole (no blocking needed at these sizes)."""

    def __init__(self, params, lr, beta, eps, t1, t2, betas=(0.9, 0.999), adam_eps=1e-8):
        self.params = list(params)
        self.lr, self.beta, self.eps, self.t1, self.t2 = lr, beta, eps, t1, t2
        self.betas, self.adam_eps = betas, adam_eps
        self.step_count = 0
        self.state = {}
        for p in self.params:
            s = {"m": torch.zeros_like(p, dtype=torch.float64), "v": torch.zeros_like(p, dtype=torch.float64)}
            if p.dim() >= 2:
                m, n = p.shape[0], p[0].numel()
                s.update(L=eps * torch.eye(m, dtype=torch.float64), R=eps * torch.eye(n, dtype=torch.float64),
                         Lr=torch.eye(m, dtype=torch.float64), Rr=torch.eye(n, dtype=torch.float64))
            self.state[p] = s

    def _root(self, a):
        w, v = torch.linalg.eigh(a)
        w = w.clamp(min=0)
        return (v * (w + self.eps * w.max()) ** -0.25) @ v.T

    @torch.no_grad()
    def step(self, grads):
        self.step_count += 1
        t = self.step_count
        for p, g in zip(self.params, grads):
            s = self.state[p]
            g = g.double()
            if p.dim() >= 2:
                g2 = g.reshape(p.shape[0], -1)
                if t % self.t1 == 0:
                    s["L"] = self.beta * s["L"] + (1 - self.beta) * g2 @ g2.T
                    s["R"] = self.beta * s["R"] + (1 - self.beta) * g2.T @ g2
                if t % self.t2 == 0:
                    s["Lr"], s["Rr"] = self._root(s["L"]), self._root(s["R"])
                h = s["Lr"] @ g2 @ s["Rr"]
                g = (h * g2.norm() / (h.norm() + 1e-12)).reshape(p.shape)
            b1, b2 = self.betas
            s["m"] = b1 * s["m"] + (1 - b1) * g
            s["v"] = b2 * s["v"] + (1 - b2) * g * g
            mhat = s["m"] / (1 - b1**t)
            vhat = s["v"] / (1 - b2**t)
            p.sub_((self.lr * mhat / (vhat.sqrt() + self.adam_eps)).to(p.dtype))


def test_32bit_matches_float64_reference_through_three_root_updates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    ref_model = copy.deepcopy(model).double()
    kw = dict(lr=1e-2, beta=0.9, eps=1e-3, t1=1, t2=2)
    opt = Shampoo4bit(model.parameters(), bits=32, lr=kw["lr"], shampoo_beta=kw["beta"], matrix_eps=kw["eps"],
                      stat_interval=kw["t1"], root_interval=kw["t2"])
    ref = _Float64Shampoo(ref_model.parameters(), **kw)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    for _ in range(7):  # roots at steps 2, 4, 6
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ref_model.zero_grad()
        nn.functional.cross_entropy(ref_model(x.double()), y).backward()
        ref.step([p.grad for p in ref_model.parameters()])
    assert opt.counters["root_updates"] == 3 * 2 * 2  # 3 updates x 2 matrices x 2 sides
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.double(), q, rtol=1e-4, atol=1e-5)
    # and the preconditioner really acted: the run differs from plain AdamW on the same data
    torch.manual_seed(0)
    adam_model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    adam = torch.optim.AdamW(adam_model.parameters(), lr=kw["lr"], weight_decay=0.0)
    for _ in range(7):
        adam.zero_grad()
        nn.functional.cross_entropy(adam_model(x), y).backward()
        adam.step()
    assert not torch.allclose(adam_model[0].weight, model[0].weight, atol=1e-4)


def test_preconditioning_changes_the_update():
    a, b = _model(), _model()
    _train(a, Shampoo4bit(a.parameters(), lr=1e-2, stat_interval=1, root_interval=2), 4)
    _train(b, torch.optim.AdamW(b.parameters(), lr=1e-2), 4)
    assert not torch.allclose(a[2].weight, b[2].weight, atol=1e-4)


@pytest.mark.parametrize("variant", [dict(bits=4), dict(bits=8, block_size=256), dict(bits=32),
                                     dict(bits=4, storage="naive"), dict(bits=4, codebook="dynamic"),
                                     dict(bits=4, base="sgd", lr=0.05)])
def test_every_variant_reduces_the_loss(variant):
    model = _model()
    opt = Shampoo4bit(model.parameters(), **({"lr": 3e-3} | variant), stat_interval=1, root_interval=3,
                      min_quant_numel=64)
    losses = _train(model, opt, 30)
    assert losses[-1] < 0.5 * losses[0]
    assert opt.counters["root_updates"] > 0 and opt.counters["failed_updates"] == 0


# -- state layout, blocking, memory ---------------------------------------------------------


def test_state_layout_and_blocking():
    w = nn.Parameter(torch.randn(130, 3, 1, 50))  # squeezed -> 130 x 150, blocks of 100
    bias = nn.Parameter(torch.randn(130))
    opt = Shampoo4bit([w, bias], max_order=100, storage="eigenvectors")
    opt.init_state()
    st = opt.state[w]
    # rows 130 -> 100 + 30, cols 150 -> 100 + 50: four tiles
    assert sorted({k.split(".")[0] for k in st if k[0].isdigit()}) == ["0", "1", "2", "3"]
    assert st["0.L.eigvecs_codes"].dtype == torch.uint8 and st["0.L.eigvecs_codes"].numel() == 100 * 100 // 2
    assert st["3.R.eigvals"].shape == (50,)
    assert "3.L.eigvecs" in st and st["3.L.eigvecs"].dtype == torch.float32  # 30 x 30 < 4096: fp32
    assert not any(k[0].isdigit() for k in opt.state[bias])  # 1-D: base update only


@pytest.mark.parametrize("n", [64, 384, 768, 1200])
def test_4bit_second_order_state_is_about_ten_times_smaller(n):
    p4, p32 = nn.Parameter(torch.zeros(n, n)), nn.Parameter(torch.zeros(n, n))
    o4 = Shampoo4bit([p4], max_order=1200, storage="eigenvectors")
    o32 = Shampoo4bit([p32], bits=32, max_order=1200)
    o4.init_state()
    o32.init_state()
    r4, r32 = o4.memory_report(), o32.memory_report()
    # per factor: U^T codes (n^2 / 2) + bf16 scales per 64 + fp32 eigenvalues; the root's strict
    # upper triangle (n (n - 1) / 4 bytes) + bf16 scales per 256 per triangle row + fp32 diagonal
    tri = n * (n - 1) // 2
    per_factor = (n * n // 2 + 2 * n * -(-n // 64) + 4 * n
                  + (tri + 1) // 2 + 2 * sum(-(-(n - 1 - i) // 256) for i in range(n - 1)) + 4 * n)
    assert r4["second_order"] == 2 * per_factor
    assert r32["second_order"] == 2 * 8 * n * n
    expected = {64: 8.57, 384: 9.90, 768: 10.04, 1200: 10.09}[n]
    assert r32["second_order"] / r4["second_order"] == pytest.approx(expected, abs=0.01)
    assert r4["moments"] == 2 * 4 * n * n and r4["total"] == sum(r4[k] for k in
                                                               ("moments", "eigenvectors", "eigenvalues", "factors",
                                                                "roots", "scales", "other"))


# -- step semantics and checkpoints ---------------------------------------------------------


def test_step_calls_closure_once_with_grad_enabled():
    model = _model()
    opt = Shampoo4bit(model.parameters())
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        loss = model(_data()[0]).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True] and isinstance(loss, torch.Tensor)
    assert opt.step() is None  # no closure: gradients already there


def _state_equal(s1, s2):
    assert s1.keys() == s2.keys()
    for k in s1:
        v1, v2 = s1[k], s2[k]
        if isinstance(v1, torch.Tensor):
            assert v1.dtype == v2.dtype and torch.equal(v1, v2), k
        else:
            assert v1 == v2, k


@pytest.mark.parametrize("variant", [dict(bits=4), dict(bits=32), dict(bits=4, storage="naive")])
def test_resume_is_bit_identical(variant):
    kw = dict(lr=3e-3, stat_interval=1, root_interval=2, min_quant_numel=64) | variant
    full = _model()
    opt_full = Shampoo4bit(full.parameters(), **kw)
    losses_full = _train(full, opt_full, 10)

    first = _model()
    opt_first = Shampoo4bit(first.parameters(), **kw)
    losses_a = _train(first, opt_first, 5)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt_first.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = _model(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt_resumed = Shampoo4bit(resumed.parameters(), **kw)
    opt_resumed.load_state_dict(ckpt["opt"])
    losses_b = _train(resumed, opt_resumed, 5)

    assert losses_a + losses_b == losses_full
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(full.parameters(), resumed.parameters()):
        _state_equal(opt_full.state[p], opt_resumed.state[q])
    for k in COUNTERS:  # the event counts carry over; the timers are wall-clock and do not match
        assert opt_resumed.counters[k] == opt_full.counters[k], k


@pytest.mark.parametrize("n, ratio, vs_eigen", [(64, 8.55, 1.0031), (384, 9.98, 0.9917), (768, 10.15, 0.9896),
                                                (1200, 10.21, 0.9881)])
def test_default_storage_is_the_8bit_cholesky_factor_at_about_the_eigenvector_bytes(n, ratio, vs_eigen):
    p4, pe, p32 = (nn.Parameter(torch.zeros(n, n)) for _ in range(3))
    o4 = Shampoo4bit([p4], max_order=1200)
    oe = Shampoo4bit([pe], max_order=1200, storage="eigenvectors")
    o32 = Shampoo4bit([p32], bits=32, max_order=1200)
    for o in (o4, oe, o32):
        o.init_state()
    g = o4.param_groups[0]
    assert (g["storage"], g["statistic_bits"], g["error_feedback"]) == ("cholesky", 8, False)
    assert (g["codebook"], g["block_size"], g["root_block_size"]) == ("linear1.5", 1200, 40)
    assert "0.L.chol_codes" in o4.state[p4]
    ge = oe.param_groups[0]
    assert (ge["codebook"], ge["block_size"], ge["root_block_size"]) == ("linear2", 64, 256)
    r4, re, r32 = (o.memory_report()["second_order"] for o in (o4, oe, o32))
    # fewer bytes than the eigenvector storage from order 96 on; 0.3 % more at order 64
    assert r32 / r4 == pytest.approx(ratio, abs=0.01) and r4 / re == pytest.approx(vs_eigen, abs=1e-4)


def test_load_keeps_codes_uint8_and_eigenvalues_fp32_for_bf16_params():
    src = nn.Linear(80, 80)
    opt = Shampoo4bit(src.parameters(), stat_interval=1, root_interval=1, storage="eigenvectors")
    src(torch.randn(4, 80)).sum().backward()
    opt.step()
    dst = nn.Linear(80, 80).to(torch.bfloat16)
    opt2 = Shampoo4bit(dst.parameters(), storage="eigenvectors")
    opt2.load_state_dict(opt.state_dict())
    st = opt2.state[dst.weight]
    assert st["0.L.eigvecs_codes"].dtype == torch.uint8
    assert st["0.L.root_codes"].dtype == torch.uint8
    assert st["0.L.eigvals"].dtype == torch.float32
    assert torch.equal(st["0.L.eigvals"], opt.state[src.weight]["0.L.eigvals"])


def test_bf16_parameters_train():
    model = _model().to(torch.bfloat16)
    opt = Shampoo4bit(model.parameters(), lr=3e-3, stat_interval=1, root_interval=2, min_quant_numel=64)
    x, y = _data()
    for _ in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.bfloat16()).float(), y).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.state[model[2].weight]["exp_avg"].dtype == torch.bfloat16
    st = opt.state[model[2].weight]
    assert st["0.L.chol_diag"].dtype == st["0.L.root_diag"].dtype == torch.float32  # the default: an 8-bit Cholesky factor


# -- failures ---------------------------------------------------------------------------------


def test_non_finite_gradient_never_enters_the_statistics():
    model = _model()
    opt = Shampoo4bit(model.parameters(), lr=1e-2, stat_interval=1, root_interval=2, min_quant_numel=64)
    _train(model, opt, 3)
    w = model[2].weight
    before_state = copy.deepcopy(opt.state[w])
    before_w = w.detach().clone()
    other_before = model[4].weight.detach().clone()
    x, y = _data()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    w.grad[0, 0] = float("nan")
    opt.step()  # step 4 would be a statistics and a root update
    _state_equal(before_state, opt.state[w])
    assert torch.equal(w, before_w)
    # the whole step is skipped: no parameter moves and AdamW's step counts stay in sync;
    # the interval clock counts the call
    assert opt.counters["skipped_nonfinite"] == 1 and opt.counters["steps"] == 4
    assert torch.equal(model[4].weight, other_before)
    assert {float(opt.state[p]["step"]) for p in model.parameters()} == {3.0}
    w.grad.fill_(float("inf"))
    opt.step()  # a steady step: skipped on the device, without a host sync
    assert opt.counters["skipped_nonfinite"] == 2
    _state_equal(before_state, opt.state[w])
    w.grad.zero_()
    opt.step()
    assert opt.counters["steps"] == 6 and float(opt.state[w]["step"]) == 4.0


def test_failed_decomposition_retries_then_keeps_previous_root(monkeypatch):
    model = _model()
    opt = Shampoo4bit(model.parameters(), lr=1e-2, stat_interval=1, root_interval=2, min_quant_numel=64)
    _train(model, opt, 2)  # one root update done
    w = model[2].weight
    real = linalg_mod.eigen_inverse_root

    def nan_in_fp32(eigvals, eigvecs, p, eps):
        out = real(eigvals, eigvecs, p, eps)
        return out * float("nan") if out.dtype == torch.float32 else out

    monkeypatch.setattr(linalg_mod, "eigen_inverse_root", nan_in_fp32)
    _train(model, opt, 2)  # root update at step 4: fp32 fails, float64 succeeds
    assert opt.counters["retried_updates"] > 0 and opt.counters["failed_updates"] == 0

    monkeypatch.setattr(linalg_mod, "eigen_inverse_root", lambda *a: real(*a) * float("nan"))
    roots = {k: v.clone() for k, v in opt.state[w].items() if ".root" in k}
    _train(model, opt, 2)  # step 6: both fail, the previous root is kept
    assert opt.counters["failed_updates"] == 2 * 3  # 3 matrices, 2 sides
    for k, v in roots.items():
        assert torch.equal(opt.state[w][k], v)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
        (dict(base="adam"), "base"),
        (dict(bits=2), "bits"),
        (dict(quantize="factors"), "quantize"),
        (dict(storage="factors"), "storage"),
        (dict(statistic_bits=2), "statistic_bits"),
        (dict(bits=4, statistic_bits=32), "statistic_bits"),
        (dict(storage="eigenvectors", error_feedback=True), "error_feedback"),
        (dict(codebook="nf4"), "codebook"),
        (dict(block_size=0), "block_size"),
        (dict(max_order=0), "max_order"),
        (dict(shampoo_beta=1.0), "shampoo_beta"),
        (dict(matrix_eps=0.0), "matrix_eps"),
        (dict(stat_interval=0), "stat_interval"),
        (dict(stat_interval=3, root_interval=10), "multiple of stat_interval"),
        (dict(bjorck_steps=(1,)), "bjorck_steps"),
        (dict(root_method="newton"), "root_method"),
        (dict(kernel_backend="cuda"), "kernel_backend"),
        (dict(precondition_dtype="float64"), "precondition_dtype"),
        (dict(momentum=1.5), "momentum"),
    ],
)
def test_bad_arguments_name_the_argument_and_choices(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Shampoo4bit(nn.Linear(2, 2).parameters(), **kwargs)


def test_bad_group_override_is_rejected():
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="bits"):
        Shampoo4bit([{"params": [m.weight], "bits": 5}, {"params": [m.bias]}])
    opt = Shampoo4bit(m.parameters())
    opt.param_groups[0]["root_interval"] = 7
    m(torch.randn(1, 2)).sum().backward()
    with pytest.raises(ValueError, match="root_interval"):
        opt.step()


def test_precondition_false_gives_a_group_no_shampoo_state():
    m = nn.Sequential(nn.Embedding(300, 70), nn.Linear(70, 70))
    opt = Shampoo4bit([{"params": m[0].parameters(), "precondition": False}, {"params": m[1].parameters()}])
    opt.init_state()
    assert set(opt.state[m[0].weight]) == {"step", "exp_avg", "exp_avg_sq"}
    assert "0.L.chol_codes" in opt.state[m[1].weight]


def test_per_group_overrides_apply():
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    opt = Shampoo4bit([{"params": m[0].parameters(), "bits": 32}, {"params": m[1].parameters()}],
                      min_quant_numel=0)
    opt.init_state()
    assert "0.L.factor" in opt.state[m[0].weight]
    assert "0.L.chol_codes" in opt.state[m[1].weight]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_preconditioning_matches_each_block_alone(dtype):
    """Same-shape blocks run as one bmm; each result equals that block preconditioned alone."""
    from lightning_shampoo4.kernels import QuantizedMatrix, reference
    from lightning_shampoo4.optim import preconditioning
    from lightning_shampoo4.quant import get_codebook, quantize, quantize_symmetric

    cb = get_codebook("linear2", 4)

    def root(n, kind):
        a = torch.randn(n, n)
        a = a @ a.T / n
        if kind == "dense":
            return a
        if kind == "sym":
            q = quantize_symmetric(a, cb, 4, 256, scale_dtype=torch.bfloat16)
            return QuantizedMatrix(q.codes, q.absmax, q.diag, n, cb, 4, 256, symmetric=True)
        q = quantize(a, cb, 4, 64, offdiag=True)
        return QuantizedMatrix(q.codes, q.absmax, q.diag, n, cb, 4, 64)

    jobs = []
    for m, n, kinds in [(65, 33, ("sym", "dense")), (65, 33, ("sym", "dense")), (64, 64, ("full", "full")),
                        (64, 64, ("full", "full")), (64, 64, ("full", "full")), (1, 7, ("dense", "dense")),
                        (7, 1, ("dense", "sym")), (7, 1, ("dense", "sym"))]:
        jobs.append(preconditioning.Job(torch.randn(m, n), root(m, kinds[0]), root(n, kinds[1]), dtype, "torch"))
    got = preconditioning.run(jobs)
    for job, out in zip(jobs, got):
        want = reference.precondition(job.grad, job.left, job.right, dtype=dtype)
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, want, **tol)


# -- quantized moments inside Shampoo4bit ----------------------------------------------------


@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_quantized_moments_train_resume_bit_identically_and_skip_non_finite(base):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 5))  # 6144 >= 4096: quantized

    kw = dict(lr=3e-3 if base == "adamw" else 0.05, base=base, moment_bits=4, stat_interval=1, root_interval=2)
    x, y = torch.randn(32, 64), torch.randint(0, 5, (32,))

    def train(m, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

    full = model()
    opt_full = Shampoo4bit(full.parameters(), **kw)
    train(full, opt_full, 6)
    st = opt_full.state[full[0].weight]
    moment_keys = {k for k in st if k.startswith(("exp_avg", "momentum_buffer"))}
    assert moment_keys and all(k.endswith(("_codes", "_absmax")) for k in moment_keys)
    assert all(st[k].dtype == torch.uint8 for k in moment_keys if k.endswith("_codes"))

    half = model()
    opt_half = Shampoo4bit(half.parameters(), **kw)
    train(half, opt_half, 3)
    buf = io.BytesIO()
    torch.save(opt_half.state_dict(), buf)
    buf.seek(0)
    opt_resumed = Shampoo4bit(half.parameters(), **kw)
    opt_resumed.load_state_dict(torch.load(buf, weights_only=True))
    train(half, opt_resumed, 3)
    for p, q in zip(full.parameters(), half.parameters()):
        assert torch.equal(p, q)

    before = copy.deepcopy(opt_resumed.state[half[0].weight])
    w = half[0].weight.detach().clone()
    opt_resumed.zero_grad()
    nn.functional.cross_entropy(half(x), y).backward()
    half[0].weight.grad[0, 0] = float("nan")
    opt_resumed.step()
    _state_equal(before, opt_resumed.state[half[0].weight])
    assert torch.equal(w, half[0].weight) and opt_resumed.counters["skipped_nonfinite"] == 1


def test_moment_bits_is_checked_and_frozen_once_state_exists():
    m = nn.Linear(80, 80)
    with pytest.raises(ValueError, match="moment_bits"):
        Shampoo4bit(m.parameters(), moment_bits=2)
    opt = Shampoo4bit(m.parameters(), moment_bits=4)
    m(torch.randn(2, 80)).sum().backward()
    opt.step()
    opt.param_groups[0]["moment_bits"] = 8
    with pytest.raises(ValueError, match="moment_bits 4 -> 8"):
        opt.step()


def test_a_checkpoint_resumes_with_the_storage_it_was_saved_with():
    """An eigenvector-method checkpoint (the default before 0.2.0) resumed by an optimizer built
    with today's default continues as the eigenvector method, bit for bit."""
    model = _model()
    opt = Shampoo4bit(model.parameters(), storage="eigenvectors", stat_interval=1, root_interval=2,
                      min_quant_numel=64)
    _train(model, opt, 3)
    saved_params, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3, seed=2)
    resumed = _model()
    resumed.load_state_dict(saved_params)
    opt2 = Shampoo4bit(resumed.parameters(), stat_interval=1, root_interval=2, min_quant_numel=64)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["storage"] == "eigenvectors"
    _train(resumed, opt2, 3, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert any(k.endswith("eigvecs_codes") for k in opt2.state[resumed[0].weight])


def test_each_group_takes_its_own_modes_storage_settings_unless_given():
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    opt = Shampoo4bit([{"params": m[0].parameters()},
                       {"params": m[1].parameters(), "storage": "eigenvectors"},
                       {"params": m[2].parameters(), "codebook": "linear2", "root_block_size": 64}])
    settings = [(g["codebook"], g["block_size"], g["root_block_size"]) for g in opt.param_groups]
    assert settings == [("linear1.5", 1200, 40), ("linear2", 64, 256), ("linear2", 1200, 64)]
    assert opt.defaults["codebook"] is None  # resolved per group, not once for all
    with pytest.raises(ValueError, match="codebook"):
        Shampoo4bit(m.parameters(), codebook="nf4")
    with pytest.raises(ValueError, match="root_block_size"):
        Shampoo4bit(m.parameters(), root_block_size=0)
