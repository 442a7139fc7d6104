"""The custom ops (``torch.ops.lightning_shampoo4.*``) and what they give the optimizer.

* ``torch.library.opcheck`` on every op and implementation (schema, fake tensors, AOT dispatch).
* The optimizer on the Triton backend (interpreter on the CPU): the default storage launches
  Triton kernels in steady, statistics and root steps and gives the torch path's parameters;
  same-shape blocks are batched; ``torch.compile`` sees the steady step without graph breaks.
* The package imports and runs without triton, and without omegaconf / jsonargparse / scikit-learn.
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_shampoo4 import kernels
from lightning_shampoo4.kernels import ops
from lightning_shampoo4.quant import get_codebook, quantize, quantize_symmetric
from lightning_shampoo4.quant import moments as qmoments

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="triton is not installed")
IMPLS = ["torch", "native"] + (["triton"] if kernels.triton_available() and (
    torch.cuda.is_available() or kernels.triton_interpreted()) else [])
device = "cuda" if torch.cuda.is_available() else "cpu"


def _stored(n, bits=4, block_size=40, scale_dtype=torch.bfloat16, k=2, name="linear1.5"):
    cb = get_codebook(name, bits, device)
    qs = []
    for _ in range(k):
        a = torch.randn(n, n, device=device)
        qs.append(quantize_symmetric(a + a.T, cb, bits, block_size, scale_dtype=scale_dtype))
    return (torch.stack([q.codes for q in qs]), torch.stack([q.absmax for q in qs]), torch.stack([q.diag for q in qs]),
            cb)


# ----------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck_symmetric_ops(impl):
    for n, bits, bs in ((7, 4, 3), (12, 8, 1200)):
        codes, absmax, diag, cb = _stored(n, bits, bs)
        torch.library.opcheck(ops.rebuild_symmetric, (codes, absmax, diag, cb, n, bits, bs, 0, n, impl))
        torch.library.opcheck(ops.rebuild_symmetric, (codes, absmax, diag, cb, n, bits, bs, 2, 5, impl))
        for left in (True, False):
            x = torch.randn(2, n, 5, device=device) if left else torch.randn(2, 3, n, device=device)
            torch.library.opcheck(ops.matmul_symmetric,
                                  (codes, absmax, diag, cb, x, n, bits, bs, left, torch.float32, torch.float32, impl))
        a = torch.randn(n, n, device=device)
        torch.library.opcheck(ops.quantize_symmetric, (a, cb, bits, bs, torch.bfloat16, impl))


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck_symmetric_ema(impl):
    for bits, bs in ((4, 40), (8, 7)):
        codes, absmax, diag, cb = _stored(9, bits=bits, block_size=bs, k=1)
        o = torch.randn(9, 9, device=device)
        torch.library.opcheck(ops.symmetric_ema, (codes[0], absmax[0], diag[0], cb, o @ o.T, 0.95, 0.05, 9, bits, bs,
                                                  torch.bfloat16, impl))


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck_row_block_ops(impl):
    cb = get_codebook("linear2", 4, device)
    u = torch.randn(9, 9, device=device)
    for transpose, offdiag, scale_dtype in ((True, False, torch.bfloat16), (False, True, torch.float32),
                                            (False, False, torch.bfloat16)):
        torch.library.opcheck(ops.quantize, (u, cb, 4, 4, offdiag, transpose, scale_dtype, impl))
        q = quantize(u, cb, 4, 4, offdiag=offdiag, transpose=transpose, scale_dtype=scale_dtype)
        torch.library.opcheck(ops.dequantize, (q.codes, q.absmax, q.diag, cb, [9, 9], 4, 4, transpose,
                                               torch.float32, impl))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_opcheck_moment_update(impl, base):
    p = torch.randn(300, device=device)
    names = qmoments.moment_names(base)
    spec = qmoments.moment_spec(p.numel(), 4) if p.numel() >= qmoments.MIN_QUANTIZED_NUMEL else \
        qmoments.MomentSpec(p.numel(), 4, 128)
    codes = [torch.zeros(spec.code_bytes, dtype=torch.uint8, device=device) for _ in names]
    absmax = [torch.zeros(spec.nblocks, device=device) for _ in names]
    cbs = [qmoments.moment_codebook(name, 4, device) for name in names]
    hyper = [0.1, 0.999, 0.001, 1e-8, 1.0, 1.0, -1e-3] if base == "adamw" else [0.9, 0.0, -1e-2]
    torch.library.opcheck(ops.moment_update, (base, p, torch.randn_like(p), codes, absmax, cbs, 4, 128, hyper,
                                              False, impl))


def test_eager_calls_go_straight_to_the_kernel_and_traced_calls_through_the_dispatcher(monkeypatch):
    """``ops.call`` skips the dispatcher's Python layers in eager mode on plain tensors (same
    result), and leaves dispatch modes and fake tensors to the dispatcher."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cb = get_codebook("linear2", 4, device)
    q = quantize(torch.randn(12, 7, device=device), cb, 4, 5, scale_dtype=torch.bfloat16)
    args = (q.codes, q.absmax, None, cb, [12, 7], 4, 5, False, torch.float32, "native")
    key = (id(ops.dequantize), torch.device(device).type)
    direct = collections.Counter()
    kernel = ops._KERNELS[key]
    monkeypatch.setitem(ops._KERNELS, key, lambda *a: direct.update(["calls"]) or kernel(*a))
    assert torch.equal(ops.call(ops.dequantize, *args), ops.dequantize(*args))
    assert direct["calls"] == 1

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Seen():
        assert torch.equal(ops.call(ops.dequantize, *args), ops.dequantize(*args))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = ops.call(ops.dequantize, *(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        assert tuple(fake.shape) == (12, 7)
    assert direct["calls"] == 1


def test_ops_are_registered_under_the_package_namespace():
    for name in ("rebuild_symmetric", "matmul_symmetric", "quantize_symmetric", "quantize", "dequantize",
                 "moment_update"):
        assert hasattr(torch.ops.lightning_shampoo4, name)


def test_quant_never_imports_the_kernels():
    """The kernels depend on quant, never the reverse: quant.moments reaches the fused update
    through the callable the dispatcher registers."""
    import ast

    for path in (ROOT / "lightning_shampoo4" / "quant").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
                assert not any("kernels" in n for n in names), f"{path.name} imports the kernels"
            elif isinstance(node, ast.Import):
                assert not any("kernels" in a.name for a in node.names), f"{path.name} imports the kernels"
    assert qmoments._fused_update is kernels.moment_update


# ----------------------------------------------------------------------------- the optimizer on these ops


@contextlib.contextmanager
def count_calls():
    """Count Triton launches (by kernel name) and matmul calls outside the ops; matmuls issued
    while preconditioning (``optim/preconditioning.py`` on the stack) are also counted apart,
    under ``"preconditioning"``."""
    import traceback

    from lightning_shampoo4.kernels import triton_symmetric

    launches: collections.Counter = collections.Counter()
    matmuls: collections.Counter = collections.Counter()
    cls = type(triton_symmetric._rebuild_kernel)
    original = cls.__getitem__

    def getitem(self, grid):
        launcher = original(self, grid)

        def run(*args, **kwargs):
            launches[getattr(self, "fn", self).__name__] += 1
            return launcher(*args, **kwargs)

        return run

    class Matmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("mm", "bmm", "addmm", "baddbmm", "matmul"):
                matmuls[name] += 1
                if any(f.filename.endswith(os.path.join("optim", "preconditioning.py"))
                       for f in traceback.extract_stack()):
                    matmuls["preconditioning"] += 1
            return func(*args, **(kwargs or {}))

    cls.__getitem__ = getitem
    try:
        with Matmuls():
            yield launches, matmuls
    finally:
        cls.__getitem__ = original


triton_runs = pytest.mark.skipif(not (kernels.triton_available() and (torch.cuda.is_available()
                                                                      or kernels.triton_interpreted())),
                                 reason="needs triton (CUDA or the interpreter)")


def _train(backend, steps, shapes=((70, 65), (40, 90)), counts=None, intervals=(2, 4), **kw):
    from lightning_shampoo4.optim import Shampoo4bit

    gen = torch.Generator().manual_seed(1)
    ws = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
    opt = Shampoo4bit(ws, lr=1e-2, stat_interval=intervals[0], root_interval=intervals[1], kernel_backend=backend,
                      **kw)
    for _ in range(steps):
        for w in ws:
            w.grad = torch.randn(w.shape, generator=gen).to(device)  # independent of the weights
        if counts is None:
            opt.step()
        else:
            with count_calls() as (launches, matmuls):
                opt.step()
            counts.append((dict(launches), dict(matmuls)))
    return [w.detach().clone() for w in ws]


@triton_runs
def test_default_storage_runs_triton_kernels_and_follows_the_torch_path():
    """Steps 4 (root), 5 (steady) and 6 (statistics) of the default storage launch Triton
    kernels; the parameters are the torch path's (bit for bit in the interpreter: the rebuilds
    and stores are, and the matmuls are the same torch calls)."""
    counts: list = []
    got = _train("triton", 6, counts=counts, min_quant_numel=64)
    want = _train("torch", 6, min_quant_numel=64)
    root, steady, stats = counts[3][0], counts[4][0], counts[5][0]
    assert root.get("_store_kernel") and root.get("_rebuild_kernel"), counts
    assert steady.get("_rebuild_kernel") and not steady.get("_store_kernel"), counts
    assert stats.get("_store_kernel") and stats.get("_rebuild_kernel"), counts
    for g, w in zip(got, want):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        assert ((g - w).norm() / w.norm()).item() < 1e-5
        if not torch.cuda.is_available():
            assert torch.equal(g, w)


def _steady_counts(backend, path, monkeypatch, shapes=((160, 160),) * 8):
    monkeypatch.setenv(kernels.PATH_ENV_VAR, path)
    counts: list = []
    _train(backend, 3, shapes=list(shapes), counts=counts, intervals=(2, 2))  # 2: statistics + root, 3: steady
    launches, matmuls = counts[2]
    return launches, matmuls


@triton_runs
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_same_shape_blocks_are_batched_on_every_backend(backend, monkeypatch):
    """8 blocks of 160 x 160: preconditioning a steady step takes at most 4 matmul calls and Triton
    launches together (the roots of each side rebuilt in one launch, two bmm), and so does the
    whole step."""
    launches, matmuls = _steady_counts(backend, "workspace", monkeypatch)
    assert sum(launches.values()) + matmuls.get("preconditioning", 0) <= 4, (launches, matmuls)
    assert matmuls.get("bmm") == 2 and matmuls.get("preconditioning") == 2, (launches, matmuls)
    assert sum(launches.values()) == (2 if backend == "triton" else 0), launches
    whole = sum(launches.values()) + sum(v for k, v in matmuls.items() if k != "preconditioning")
    assert whole <= 4, (launches, matmuls)  # no statistic G G^T is formed on a steady step


@triton_runs
def test_fused_path_batches_too_and_matches(monkeypatch):
    monkeypatch.setenv(kernels.PATH_ENV_VAR, "fused")
    counts: list = []
    got = _train("triton", 5, shapes=[(24, 40)] * 3, counts=counts, min_quant_numel=64)
    launches, matmuls = counts[4]
    assert launches == {"_matmul_kernel": 2} and not matmuls.get("preconditioning"), counts[4]
    want = _train("torch", 5, shapes=[(24, 40)] * 3, min_quant_numel=64)
    for g, w in zip(got, want):
        assert ((g - w).norm() / w.norm()).item() < 1e-5


def test_steady_step_compiles_without_graph_breaks():
    """``torch.compile`` sees the ops, not ctypes or Triton launchers: a steady step of the default
    storage traces in one graph (at most 3 breaks allowed), and the compiled step gives the eager
    step's parameters bit for bit."""
    import copy

    from lightning_shampoo4.optim import Shampoo4bit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 10))
    x = torch.randn(32, 64)

    def make(m):
        return Shampoo4bit(m.parameters(), lr=1e-2, stat_interval=2, root_interval=4, min_quant_numel=64)

    def backward(m, opt):
        opt.zero_grad()
        m(x).square().mean().backward()

    opt = make(model)
    for _ in range(4):
        backward(model, opt)
        opt.step()

    def twin():
        m = copy.deepcopy(model)
        o = make(m)
        o.load_state_dict(opt.state_dict())
        backward(m, o)
        return m, o

    _, o1 = twin()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(o1.step)()
    assert explained.graph_break_count <= 3, explained.break_reasons
    m2, o2 = twin()
    torch._dynamo.reset()
    torch.compile(o2.step, backend="eager")()
    backward(model, opt)
    opt.step()
    for a, b in zip(model.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- optional dependencies


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_the_package_runs_without_triton():
    """Triton is an optional extra: with its import failing the package imports, trains on the
    torch / C path, and a forced Triton backend says how to install it."""
    res = _run_python("""
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch
        torch.set_num_threads(1)
        import lightning_shampoo4
        from lightning_shampoo4 import Shampoo4bit, kernels
        assert not kernels.triton_available()
        model = torch.nn.Sequential(torch.nn.Linear(16, 80), torch.nn.Tanh(), torch.nn.Linear(80, 4))
        opt = Shampoo4bit(model.parameters(), lr=1e-2, stat_interval=1, root_interval=2, min_quant_numel=64,
                          moment_bits=4)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 16)).square().mean().backward()
            opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        try:
            kernels.resolve_backend("triton", torch.device("cpu"))
        except RuntimeError as err:
            assert "lightning-shampoo4[triton]" in str(err)
        else:
            raise AssertionError("no error")
        assert "triton" not in sys.modules or sys.modules["triton"] is None
        print("ok")
    """)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_the_optimizer_needs_no_omegaconf_jsonargparse_or_sklearn():
    """What ``benchmarks/gpu_check.py`` needs: ``import lightning_shampoo4; Shampoo4bit(...)`` with
    only torch (+ triton, lightning) installed."""
    res = _run_python("""
        import sys
        for name in ("omegaconf", "jsonargparse", "sklearn"):
            sys.modules[name] = None
        import torch
        torch.set_num_threads(1)
        import lightning_shampoo4
        from lightning_shampoo4 import Shampoo4bit
        model = torch.nn.Linear(40, 30)
        opt = Shampoo4bit(model.parameters(), lr=1e-2, stat_interval=1, root_interval=1, min_quant_numel=64)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 40)).sum().backward()
            opt.step()
        print("ok")
    """)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
