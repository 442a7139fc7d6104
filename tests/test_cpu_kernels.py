"""The CPU kernels (stored symmetric roots: rebuild and store; the row-block layout: decode):
bit-identical to the torch paths."""

from __future__ import annotations

import os
import subprocess
import warnings

import pytest
import torch

from lightning_shampoo4 import Shampoo4bit, kernels
from lightning_shampoo4.kernels import QuantizedMatrix, cpu, reference
from lightning_shampoo4.quant import dequantize, dequantize_symmetric, get_codebook, quantize, quantize_symmetric

needs_kernel = pytest.mark.skipif(not cpu.available(), reason="no C compiler to build the CPU kernel")


def _root(n: int, block: int, *, scale_dtype=torch.bfloat16, codebook="linear1.5", bits=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n, generator=gen)
    x = x + x.T
    x[torch.rand(n, n, generator=gen) < 0.05] = 0.0  # some zero blocks and exact zeros
    cb = get_codebook(codebook, bits)
    q = quantize_symmetric(x, cb, bits, block, scale_dtype=scale_dtype)
    return QuantizedMatrix(q.codes, q.absmax, q.diag, n, cb, bits, block, True), q


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 3, 16, 17, 63, 255, 256, 257, 601])
@pytest.mark.parametrize("block", [1, 3, 16, 17, 40, 256, 4096])
def test_rows_equal_the_torch_rebuild_bit_for_bit(n, block):
    for scale_dtype in (torch.float32, torch.bfloat16):
        root, q = _root(n, block, scale_dtype=scale_dtype, seed=n * block)
        ref = dequantize_symmetric(q, root.codebook, n, 4, block)
        out = torch.full((n, n), float("nan"))
        assert cpu.symmetric_rows(root, 0, n, out)
        assert torch.equal(out, ref)
        for r0, r1 in {(0, 1), (n // 3, n // 2 + 1), (max(0, n - 5), n), (n // 2, n // 2)}:
            if r1 < r0:
                continue
            panel = torch.full((r1 - r0, n), float("nan"))
            assert cpu.symmetric_rows(root, r0, r1, panel)
            assert torch.equal(panel, ref[r0:r1]), (r0, r1)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(a, b))


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 3, 16, 33, 255, 257, 600])
@pytest.mark.parametrize("bits, block", [(4, 1), (4, 16), (4, 40), (4, 256), (8, 17), (8, 1200)])
def test_quantizing_equals_the_torch_quantizer_bit_for_bit(n, bits, block):
    gen = torch.Generator().manual_seed(n * block + bits)
    x = torch.randn(n, n, generator=gen) * torch.logspace(-3, 3, n)[None, :]
    x[torch.rand(n, n, generator=gen) < 0.05] = 0.0
    x[: n // 4, : n // 4] = 0.0  # whole zero blocks
    cb = get_codebook("linear1.5", bits)
    for scale_dtype in (torch.float32, torch.bfloat16):
        ref = quantize_symmetric(x, cb, bits, block, scale_dtype=scale_dtype)
        got = cpu.quantize_symmetric(x, cb, bits, block, scale_dtype)
        assert got is not None and _same(got, ref), scale_dtype
    lower = torch.randn(n, n, generator=gen).tril()  # a transposed view, as the Cholesky factor is stored
    assert _same(cpu.quantize_symmetric(lower.mT, cb, bits, block, torch.bfloat16),
                 quantize_symmetric(lower.mT, cb, bits, block, scale_dtype=torch.bfloat16))


@needs_kernel
def test_quantizing_midpoints_and_other_codebooks_exactly():
    for name in ("linear2", "dynamic", "linear"):
        cb = get_codebook(name, 4)
        mids = (cb[:-1] + cb[1:]) / 2
        x = torch.zeros(6, 6)
        x[0, 1:] = torch.tensor([1.0, -1.0, 0.5, 0.0, -0.0])
        x[1, 2:] = mids[[0, 7, 14, 3]] * 2.0  # exactly on midpoints once normalized by a block max of 2
        x[1, 2] = 2.0
        x[2:, 2:] += torch.randn(4, 4)
        ref = quantize_symmetric(x, cb, 4, 3, scale_dtype=torch.float32)
        assert _same(cpu.quantize_symmetric(x, cb, 4, 3, torch.float32), ref), name


@needs_kernel
def test_quantizing_leaves_what_it_does_not_handle_to_torch():
    cb = get_codebook("linear1.5", 4)
    x = torch.randn(20, 20)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[3, 9] = bad
        assert cpu.quantize_symmetric(y, cb, 4, 8, torch.bfloat16) is None
    assert cpu.quantize_symmetric(torch.full((4, 4), 3.4e38), cb, 4, 8, torch.bfloat16) is None  # scale -> inf
    assert cpu.quantize_symmetric(x, cb, 4, 8, torch.float16) is None
    assert cpu.quantize_symmetric(x, cb.bfloat16(), 4, 8, torch.float32) is None
    assert cpu.quantize_symmetric(x.double(), cb, 4, 8, torch.float32) is not None
    with pytest.raises(ValueError, match="range"):  # the dispatcher's fallback reports it
        kernels.quantize_symmetric(torch.full((4, 4), 7e4), cb, 4, 8, scale_dtype=torch.float16)


@needs_kernel
def test_rows_into_a_strided_panel_and_a_linear2_codebook():
    root, q = _root(130, 64, codebook="linear2", scale_dtype=torch.float16)
    ref = dequantize_symmetric(q, root.codebook, 130, 4, 64)
    wide = torch.zeros(20, 200)
    assert cpu.symmetric_rows(root, 7, 27, wide[:, :130])
    assert torch.equal(wide[:, :130], ref[7:27])
    assert wide[:, 130:].abs().sum() == 0  # nothing written past the rows


@needs_kernel
@pytest.mark.parametrize("n", [2, 17, 300])
def test_rows_of_an_8_bit_triangle(n):
    root, q = _root(n, 1200, codebook="linear1.5", bits=8, seed=n)
    ref = dequantize_symmetric(q, root.codebook, n, 8, 1200)
    out = torch.full((n, n), float("nan"))
    assert cpu.symmetric_rows(root, 0, n, out) and torch.equal(out, ref)
    panel = torch.full((n - n // 2, n), float("nan"))
    assert cpu.symmetric_rows(root, n // 2, n, panel) and torch.equal(panel, ref[n // 2 :])


def test_rows_leave_other_roots_to_torch():
    root, _ = _root(40, 16)
    for other in (root._replace(codebook=root.codebook.bfloat16()), root._replace(symmetric=False)):
        assert not cpu.applies(other)
        assert not cpu.symmetric_rows(other, 0, 40, torch.empty(40, 40))


@needs_kernel
def test_rows_reject_bad_outputs_and_truncated_roots():
    root, _ = _root(50, 40)
    with pytest.raises(ValueError, match="output"):
        cpu.symmetric_rows(root, 0, 50, torch.empty(50, 49))
    with pytest.raises(ValueError, match="output"):
        cpu.symmetric_rows(root, 0, 50, torch.empty(50, 50, dtype=torch.float64))
    with pytest.raises(ValueError, match="output"):
        cpu.symmetric_rows(root, 10, 60, torch.empty(50, 50))
    with pytest.raises(ValueError, match="code bytes"):
        cpu.symmetric_rows(root._replace(codes=root.codes[:-1]), 0, 50, torch.empty(50, 50))
    with pytest.raises(ValueError, match="scales"):
        cpu.symmetric_rows(root._replace(absmax=root.absmax[:-1]), 0, 50, torch.empty(50, 50))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_precondition_with_the_kernel_equals_torch(dtype):
    gen = torch.Generator().manual_seed(3)
    left, _ = _root(300, 40, seed=1)  # panelled (order > 256)
    right, _ = _root(77, 40, seed=2)
    grad = torch.randn(300, 77, generator=gen)
    auto = kernels.precondition(grad, left, right, dtype=dtype, backend="auto")
    plain = kernels.precondition(grad, left, right, dtype=dtype, backend="torch")
    assert torch.equal(auto, plain)
    ref = (dequantize_symmetric(left[:3], left.codebook, 300, 4, 40).double() @ grad.double()
           @ dequantize_symmetric(right[:3], right.codebook, 77, 4, 40).double())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert (auto.double() - ref).abs().max() <= tol * ref.abs().max()
    dense = kernels.materialize(left, dtype, backend="auto")
    assert torch.equal(dense, reference.materialize(left, dtype))
    out = torch.empty(300, 300, dtype=dtype)
    assert kernels.materialize(left, dtype, out=out, backend="auto") is out and torch.equal(out, dense)


def _train(backend: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 300), torch.nn.Tanh(), torch.nn.Linear(300, 300),
                                torch.nn.Tanh(), torch.nn.Linear(300, 5))
    opt = Shampoo4bit(model.parameters(), lr=1e-2, stat_interval=2, root_interval=4, kernel_backend=backend)
    data = torch.randn(12, 64, 33, generator=torch.Generator().manual_seed(1))
    for x in data:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@needs_kernel
def test_training_with_the_kernel_is_bit_identical_to_torch(monkeypatch):
    calls = []
    real = cpu.symmetric_rows
    monkeypatch.setattr(cpu, "symmetric_rows", lambda *a: calls.append(a[1:3]) or real(*a))
    fast = _train("auto")
    assert calls, "the steady steps on the CPU rebuild their roots with the kernel"
    calls.clear()
    plain = _train("torch")
    assert not calls
    for a, b in zip(fast, plain):
        assert torch.equal(a, b)


def test_a_kernel_that_does_not_compile_falls_back_to_torch(tmp_path, monkeypatch):
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(cpu, "SOURCE", broken)
    monkeypatch.setenv(cpu.CACHE_ENV_VAR, str(tmp_path / "cache"))
    cpu._library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not cpu.available()
        if _compiler():  # a compiler was found, and failed: one warning says so
            assert [str(w.message) for w in caught if "could not be built" in str(w.message)]
        cache = tmp_path / "cache"
        assert not (cache.exists() and any(cache.iterdir()))  # the failed build left nothing behind
        root, q = _root(40, 8)
        grad = torch.randn(40, 40)
        assert torch.equal(kernels.precondition(grad, root, root, backend="auto"),
                           kernels.precondition(grad, root, root, backend="torch"))
    finally:
        cpu._library.cache_clear()


def _compiler() -> str | None:
    import shutil

    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def test_no_compiler_is_one_warning_that_names_the_slower_path(monkeypatch):
    monkeypatch.setattr(cpu.shutil, "which", lambda name: None)
    cpu._library.cache_clear()
    try:
        with pytest.warns(cpu.KernelWarning, match="no C compiler") as caught:
            assert not cpu.available()
            assert not cpu.available()  # tried once per process: no second warning
        assert len(caught) == 1
        message = str(caught[0].message)
        assert "torch ops" in message and "gcc" in message and "$CC" in message
    finally:
        cpu._library.cache_clear()


@needs_kernel
def test_the_built_kernel_is_cached_per_machine(tmp_path, monkeypatch):
    cache = tmp_path / "fresh" / "cache"
    monkeypatch.setenv(cpu.CACHE_ENV_VAR, str(cache))
    first = cpu._build(_compiler())
    assert cache.stat().st_mode & 0o777 == 0o700  # created private
    stamp = first.stat().st_mtime_ns
    assert cpu._build(_compiler()) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temporary left behind


@needs_kernel
def test_an_unwritable_cache_builds_in_a_private_temporary_directory(tmp_path, monkeypatch):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a directory")
    monkeypatch.setenv(cpu.CACHE_ENV_VAR, str(blocked / "cache"))
    with pytest.raises(PermissionError):
        cpu._build(_compiler())
    with pytest.warns(cpu.KernelWarning, match="private temporary directory"):
        with cpu._kernel_path(_compiler()) as path:
            assert path.exists() and path.parent.stat().st_mode & 0o777 == 0o700
            assert path.parent.stat().st_uid == os.geteuid()
    assert not path.parent.exists()  # removed once loaded


def _plant(path, marker) -> None:
    """A library whose load would run code: it writes ``marker`` from a constructor."""
    src = path.with_suffix(".c")
    src.write_text(f"""#include <stdio.h>
__attribute__((constructor)) static void planted(void) {{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}
void ls4_symmetric_rows(void) {{}}
long long ls4_quantize_symmetric(void) {{ return 1; }}
""")
    subprocess.run([_compiler(), "-shared", "-fPIC", "-o", str(path), str(src)], check=True)
    src.unlink()


def _another_users(path, monkeypatch) -> None:
    """Make ``path`` belong to another user: really where we may chown, else as the loader sees it."""
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    else:
        monkeypatch.setattr(cpu.os, "geteuid", lambda real=os.geteuid(): real + 1)


@needs_kernel
@pytest.mark.parametrize("owner", ["library", "directory"])
def test_a_library_of_another_user_is_never_loaded(tmp_path, monkeypatch, owner):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv(cpu.CACHE_ENV_VAR, str(cache))
    planted = cache / cpu._library_name(_compiler())
    marker = tmp_path / "planted-code-ran"
    _plant(planted, marker)
    if owner == "library" or os.geteuid() == 0:
        _another_users(planted if owner == "library" else cache, monkeypatch)
    else:  # without root, a directory of another user is one the loader does not see as ours
        monkeypatch.setattr(cpu.os, "geteuid", lambda real=os.geteuid(): real + 1)
    cpu._library.cache_clear()
    try:
        with pytest.warns(cpu.KernelWarning, match="private temporary directory"):
            lib = cpu._library()
        assert not marker.exists(), "the planted library was loaded"
        if os.geteuid() == 0 or owner == "library":
            assert lib is not None  # compiled afresh in a private place, and it works
            root, q = _root(37, 8, seed=2)
            out = torch.empty(37, 37)
            assert cpu.symmetric_rows(root, 0, 37, out)
            assert torch.equal(out, dequantize_symmetric(q, root.codebook, 37, 4, 8))
        assert planted.exists()  # nothing of the other user's is touched
    finally:
        cpu._library.cache_clear()


@needs_kernel
def test_a_cache_that_others_can_write_is_closed_and_its_files_checked(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chmod(cache, 0o777)
    monkeypatch.setenv(cpu.CACHE_ENV_VAR, str(cache))
    path = cpu._build(_compiler())
    assert cache.stat().st_mode & 0o777 == 0o700
    os.chmod(path, 0o666)  # a library others could have rewritten is not trusted
    with pytest.raises(PermissionError, match="not loaded"):
        cpu._build(_compiler())


@needs_kernel
def test_the_plain_c_path_without_avx512_is_exact_too(tmp_path, monkeypatch):
    """The kernels as compiled for a CPU without AVX-512 (the plain C loops) give the same bits."""
    monkeypatch.setattr(cpu, "FLAGS", tuple(f for f in cpu.FLAGS if not f.startswith("-march")))
    monkeypatch.setenv(cpu.CACHE_ENV_VAR, str(tmp_path))
    cpu._library.cache_clear()
    try:
        assert cpu.available()
        for n, bits, block in [(1, 4, 40), (37, 4, 40), (300, 4, 16), (129, 8, 1200), (64, 4, 3), (90, 8, 7)]:
            root, q = _root(n, block, bits=bits, seed=n)
            ref = dequantize_symmetric(q, root.codebook, n, bits, block)
            out = torch.full((n, n), float("nan"))
            assert cpu.symmetric_rows(root, 0, n, out) and torch.equal(out, ref), (n, bits, block)
            x = torch.randn(n, n)
            assert _same(cpu.quantize_symmetric(x, root.codebook, bits, block, torch.bfloat16),
                         quantize_symmetric(x, root.codebook, bits, block, scale_dtype=torch.bfloat16)), (n, bits)
            q = quantize(x, root.codebook, bits, block, scale_dtype=torch.bfloat16)
            assert torch.equal(cpu.dequantize_rows(q.codes, q.absmax, root.codebook, n, n, bits, block),
                               dequantize(q, root.codebook, (n, n), bits, block)), (n, bits)
            got = cpu.quantize_rows(x, root.codebook, bits, block, torch.bfloat16)
            assert torch.equal(got.codes, q.codes) and torch.equal(got.absmax, q.absmax), (n, bits)
            o = x @ x.T
            got = cpu.symmetric_ema(root, o, 0.9, 0.1, torch.bfloat16)
            want = quantize_symmetric(ref * 0.9 + o * 0.1, root.codebook, bits, block, scale_dtype=torch.bfloat16)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (n, bits)
    finally:
        cpu._library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape, block", [((1, 1), 64), ((7, 13), 5), ((33, 65), 16), ((300, 301), 64), ((5,), 3),
                                          ((3, 4, 17), 8), ((256, 256), 64), ((2, 40), 1)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_row_block_dequantize_equals_torch_bit_for_bit(bits, shape, block, scale_dtype):
    """The kernel that decodes the row-block layout (SOAP4bit's eigenvector matrices) gives the
    torch dequantizer's bits, odd lengths and blocks crossing nothing or everything included."""
    for name in ("linear2", "dynamic"):
        cb = get_codebook(name, bits)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) * 100 + block))
        q = quantize(x, cb, bits, block, scale_dtype=scale_dtype)
        rows = x.numel() // shape[-1]
        out = cpu.dequantize_rows(q.codes, q.absmax, cb, rows, shape[-1], bits, block)
        assert torch.equal(out.view(shape), dequantize(q, cb, shape, bits, block)), name
    assert cpu.dequantize_rows(q.codes[:0], q.absmax, cb, rows, shape[-1], bits, block) is None  # truncated codes


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape, block", [((), 4), ((0,), 4), ((1, 1), 64), ((7, 13), 5), ((5,), 3), ((3, 4, 17), 8),
                                          ((2048,), 256), ((1000,), 2048), ((2, 40), 1)])
def test_row_block_quantize_equals_torch_bit_for_bit(bits, shape, block):
    """The row-block quantizer (SOAP4bit's eigenvector matrices and moments) gives the torch
    quantizer's codes and scales: every map, fp32 and bf16 scales, odd lengths, exact midpoints."""
    from lightning_shampoo4.quant import moments
    from lightning_shampoo4.quant.codebooks import midpoints

    books = [get_codebook(name, bits) for name in ("linear2", "dynamic", "linear1.5")]
    books += [moments.moment_codebook(name, bits, "cpu") for name in ("exp_avg", "exp_avg_sq")]
    for cb in books:
        for scale_dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(block)
            x = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen) ** 4
            flat = x.view(-1)
            if flat.numel() >= 4:  # a block whose absmax is 1: a midpoint, a code value and zeros exactly
                flat[:4] = torch.tensor([1.0, float(midpoints(cb)[2]), float(cb[3]), -0.0])
            got = cpu.quantize_rows(x, cb, bits, block, scale_dtype)
            ref = quantize(x, cb, bits, block, scale_dtype=scale_dtype)
            assert torch.equal(got.codes, ref.codes) and got.absmax.dtype == ref.absmax.dtype
            assert torch.equal(got.absmax, ref.absmax)


@needs_kernel
def test_row_block_quantize_leaves_non_finite_values_to_torch():
    cb = get_codebook("linear2", 4)
    for bad in (float("nan"), float("inf")):
        assert cpu.quantize_rows(torch.tensor([1.0, bad, 2.0]), cb, 4, 2, torch.float32) is None
    assert cpu.quantize_rows(torch.tensor([3.4e38, 1.0]), cb, 4, 2, torch.bfloat16) is None  # scale overflows bf16
    assert cpu.quantize_rows(torch.ones(4), get_codebook("linear2", 4).double(), 4, 2, torch.float32) is None


@needs_kernel
@pytest.mark.parametrize("bits, codebook", [(8, "linear1.5"), (8, "dynamic"), (8, "linear"), (4, "linear1.5"),
                                            (4, "linear2")])
@pytest.mark.parametrize("n, block", [(1, 4), (2, 4), (3, 1), (17, 5), (64, 64), (255, 255), (257, 40)])
def test_symmetric_ema_equals_the_torch_path_bit_for_bit(bits, codebook, n, block):
    """S * beta + o * alpha of a stored statistic, stored again, in one pass over its codes: the
    same codes, scales and diagonal as rebuilding it, updating it and storing it with torch."""
    from lightning_shampoo4.kernels import ops

    root, q = _root(n, block, codebook=codebook, bits=bits, seed=n)
    g = torch.randn(n, 9, generator=torch.Generator().manual_seed(block))
    o = g @ g.T
    for scale_dtype in (torch.bfloat16, torch.float32):
        got = cpu.symmetric_ema(root, o, 0.95, 0.05, scale_dtype)
        dense = dequantize_symmetric(q, root.codebook, n, bits, block) * 0.95 + o * 0.05
        want = quantize_symmetric(dense, root.codebook, bits, block, scale_dtype=scale_dtype)
        assert torch.equal(got.codes, want.codes) and torch.equal(got.absmax, want.absmax)
        assert torch.equal(got.diag, want.diag)
        ref = ops.symmetric_ema(q.codes, q.absmax, q.diag, root.codebook, o, 0.95, 0.05, n, bits, block, scale_dtype,
                                "torch")
        assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert cpu.symmetric_ema(root, o[:-1, :-1], 0.95, 0.05, torch.float32) is None  # a wrong-shaped update


@needs_kernel
@pytest.mark.parametrize("codebook", ["linear1.5", "linear", "linear2", "dynamic", "exp_avg", "exp_avg_sq"])
def test_8_bit_search_tables_give_the_nearest_code_at_every_boundary(codebook):
    """The cell tables that replace the binary search for 8-bit maps (even cells for evenly spread
    maps, bit-pattern cells for the dynamic maps and the moments'): every midpoint, its float
    neighbours, every code value, zeros and tiny values land where the torch quantizer puts them."""
    from lightning_shampoo4.quant import moments
    from lightning_shampoo4.quant.codebooks import midpoints

    cb = moments.moment_codebook(codebook, 8, "cpu") if codebook.startswith("exp") else get_codebook(codebook, 8)
    mids = midpoints(cb)
    probes = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                        cb, torch.linspace(-1, 1, 4097), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8])])
    x = torch.cat([torch.ones(1), probes.clamp(-1, 1)])  # absmax 1: the probes are the normalized values
    for scale_dtype in (torch.float32, torch.bfloat16):
        got, want = cpu.quantize_rows(x, cb, 8, x.numel(), scale_dtype), quantize(x, cb, 8, x.numel(),
                                                                                  scale_dtype=scale_dtype)
        assert torch.equal(got.codes, want.codes)
    search = cpu._search_bounds(cb)
    assert 0 < search.nk <= cpu.MAX_CELL_COMPARISONS
    assert (search.shift == 0) == (codebook in ("linear1.5", "linear"))  # even cells where the codes are even


@needs_kernel
def test_kernels_write_cpu_buffers_whatever_the_default_device():
    """Under ``with torch.device("meta")`` (a default-device context) the kernels still allocate
    their outputs and work buffers on the CPU: a meta buffer would hand the C code a null pointer."""
    cb8, cb15 = get_codebook("dynamic", 8), get_codebook("linear1.5", 8)
    x = torch.randn(300)
    a = torch.randn(40, 40)
    a = a + a.T
    q = quantize_symmetric(a, cb15, 8, 40)
    root = QuantizedMatrix(q.codes, q.absmax, q.diag, 40, cb15, 8, 40, True)
    plain = (cpu.quantize_rows(x, cb8, 8, 64, torch.float32), cpu.quantize_symmetric(a, cb15, 8, 40, torch.float32),
             cpu.symmetric_ema(root, a, 0.9, 0.1, torch.float32))
    cpu._SEARCH.clear()  # the search tables are built under the context too
    with torch.device("meta"):
        got = (cpu.quantize_rows(x, cb8, 8, 64, torch.float32), cpu.quantize_symmetric(a, cb15, 8, 40, torch.float32),
               cpu.symmetric_ema(root, a, 0.9, 0.1, torch.float32))
        decoded = cpu.dequantize_rows(got[0].codes, got[0].absmax, cb8, 1, 300, 8, 64)
    for want, have in zip(plain, got):
        assert all(torch.equal(w, h) for w, h in zip(want, have) if w is not None)
    assert decoded.device.type == "cpu" and torch.equal(decoded.view(-1), dequantize(plain[0], cb8, (300,), 8, 64))


@needs_kernel
def test_rows_split_over_threads_equal_one_thread():
    root, q = _root(1000, 40, seed=5)
    ref = dequantize_symmetric(q, root.codebook, 1000, 4, 40)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cpu.PARALLEL_FROM_THREADS)
        assert cpu._pieces(1000, 1000) == cpu.PARALLEL_FROM_THREADS
        out = torch.full((1000, 1000), float("nan"))
        assert cpu.symmetric_rows(root, 0, 1000, out) and torch.equal(out, ref)
        panel = torch.full((350, 1000), float("nan"))
        assert cpu.symmetric_rows(root, 333, 683, panel) and torch.equal(panel, ref[333:683])
    finally:
        torch.set_num_threads(threads)
