"""Triton kernels against the torch reference.

On a machine without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
set by conftest.py before anything imports Triton); with CUDA they run compiled. Shapes are
tiny on purpose: the interpreter is slow.
"""

import pytest
import torch

from lightning_shampoo4 import kernels
from lightning_shampoo4.kernels import QuantizedMatrix, reference
from lightning_shampoo4.quant import dequantize, get_codebook, midpoints, quantize, quantize_symmetric

pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(not kernels.triton_available(), reason="triton is not installed"),
]

device = "cuda" if torch.cuda.is_available() else "cpu"
CODEBOOKS = ("linear2", "dynamic", "linear")

# (shape, bits, block_size, offdiag, transpose): odd sizes, partial blocks, rows whose
# packed pairs straddle row boundaries, 1-D / 0-D / N-D, diag-real and transposed reads.
QUANT_CASES = [
    ((1, 1), 4, 64, False, False),
    ((), 4, 64, False, False),
    ((7,), 4, 64, False, False),
    ((7,), 8, 3, False, False),
    ((3, 5), 4, 2, False, False),
    ((3, 5), 8, 4, False, True),
    ((2, 3, 5), 4, 4, False, False),
    ((65, 65), 4, 64, True, False),
    ((65, 65), 4, 64, True, True),
    ((65, 65), 8, 64, False, False),
    ((33, 70), 4, 64, False, True),
    ((33, 70), 8, 16, False, True),
    ((9, 9), 4, 5, True, False),
    ((20, 300), 8, 256, False, False),
]


def _case_id(case):
    shape, bits, bs, offdiag, transpose = case
    name = f"{'x'.join(map(str, shape)) or 'scalar'}-{bits}b-bs{bs}"
    return name + ("-diag" if offdiag else "") + ("-T" if transpose else "")


def _assert_same_quantized(got, want):
    assert got.codes.dtype == torch.uint8 and got.codes.shape == want.codes.shape
    assert torch.equal(got.codes, want.codes), f"{(got.codes != want.codes).sum().item()} code bytes differ"
    assert got.absmax.dtype == torch.float32 and got.absmax.shape == want.absmax.shape
    torch.testing.assert_close(got.absmax, want.absmax, rtol=0, atol=0, equal_nan=True)
    if want.diag is None:
        assert got.diag is None
    else:
        torch.testing.assert_close(got.diag, want.diag, rtol=0, atol=0)


def _check_roundtrip(x, cb, bits, bs, offdiag, transpose):
    """Triton quantize == reference quantize, Triton dequantize == reference dequantize."""
    got = kernels.quantize(x, cb, bits, bs, offdiag=offdiag, transpose=transpose, backend="triton")
    want = quantize(x, cb, bits, bs, offdiag=offdiag, transpose=transpose)
    _assert_same_quantized(got, want)
    for dtype in (torch.float32, torch.bfloat16):
        out = kernels.dequantize(want, cb, x.shape, bits, bs, transpose=transpose, dtype=dtype, backend="triton")
        ref = dequantize(want, cb, x.shape, bits, bs, transpose=transpose, dtype=dtype)
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", QUANT_CASES, ids=_case_id)
@pytest.mark.parametrize("name", CODEBOOKS)
def test_quantize_dequantize_match_reference(case, name):
    shape, bits, bs, offdiag, transpose = case
    cb = get_codebook(name, bits, device)
    x = torch.randn(shape, device=device) * 3
    _check_roundtrip(x, cb, bits, bs, offdiag, transpose)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_low_precision_inputs(dtype, bits):
    cb = get_codebook("linear2", bits, device)
    x = torch.randn(31, 45, device=device).to(dtype)
    _check_roundtrip(x, cb, bits, 16, False, False)
    _check_roundtrip(x[:, :31], cb, bits, 16, True, True)


@pytest.mark.parametrize("bits", [4, 8])
def test_many_programs_with_odd_rows(monkeypatch, bits):
    """Tiny tiles: many programs whose ranges start and end inside rows, and 4-bit pairs that
    straddle row boundaries (odd column count) at program boundaries."""
    from lightning_shampoo4.kernels import triton_quant

    monkeypatch.setattr(triton_quant, "_tile_elems", lambda: 64)
    cb = get_codebook("linear2", bits, device)
    x = torch.randn(15, 31, device=device)
    _check_roundtrip(x, cb, bits, 8, False, False)
    _check_roundtrip(x, cb, bits, 8, False, True)
    _check_roundtrip(x[:, :15], cb, bits, 5, True, False)


def test_non_contiguous_input():
    cb = get_codebook("linear2", 4, device)
    base = torch.randn(40, 90, device=device)
    _check_roundtrip(base[3:36, ::2], cb, 4, 16, False, False)  # strided columns
    _check_roundtrip(base[:37, 5:42], cb, 4, 8, True, True)  # square slice, transposed read
    _check_roundtrip(base.t()[:45, :33], cb, 4, 64, False, False)  # column-major input


@pytest.mark.parametrize("name", CODEBOOKS)
@pytest.mark.parametrize("bits", [4, 8])
def test_ties_at_midpoints_round_down(name, bits):
    """Values exactly on a decision boundary take the lower index (bucketize right=False)."""
    cb = get_codebook(name, bits, device)
    mids = midpoints(cb)
    # One block per row: the boundaries, their negatives, the codebook itself and 1.0 (absmax).
    row = torch.cat([mids, -mids, cb, torch.ones(1, device=device)])
    x = torch.stack([row, row * 0.5, -row]).contiguous()
    _check_roundtrip(x, cb, bits, x.shape[1], False, False)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter: inf / inf, inf * 0
def test_zero_blocks_and_non_finite_values():
    cb = get_codebook("linear2", 4, device)
    x = torch.randn(6, 20, device=device)
    x[0] = 0.0  # all-zero row: zero blocks
    x[1, :8] = 0.0  # one zero block
    x[2, 3] = float("nan")  # NaN absmax
    x[3, 5] = float("inf")  # inf absmax, inf / inf = NaN
    x[4, 17] = -float("inf")
    x[5, 2] = -0.0
    _check_roundtrip(x, cb, 4, 8, False, False)
    _check_roundtrip(x[:, :6], cb, 4, 4, True, False)


def test_diag_real_with_a_codebook_without_zero():
    """'linear' has no exact 0: the zeroed diagonal decodes to a non-zero value before the
    diagonal is written back, which the kernels must overwrite, not add to."""
    cb = get_codebook("linear", 4, device)
    x = torch.randn(13, 13, device=device)
    _check_roundtrip(x, cb, 4, 4, True, False)
    q = quantize(x, cb, 4, 4, offdiag=True)
    out = kernels.dequantize(q, cb, x.shape, 4, 4, backend="triton")
    torch.testing.assert_close(out.diagonal(), x.diagonal(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_dequantize_other_output_dtypes(dtype):
    cb = get_codebook("dynamic", 4, device)
    x = torch.randn(17, 23, device=device)
    q = quantize(x, cb, 4, 8)
    out = kernels.dequantize(q, cb, x.shape, 4, 8, dtype=dtype, backend="triton")
    ref = dequantize(q, cb, x.shape, 4, 8, dtype=dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_empty_tensors():
    cb = get_codebook("linear2", 4, device)
    for shape in [(0,), (3, 0), (0, 5)]:
        x = torch.randn(shape, device=device)
        _assert_same_quantized(kernels.quantize(x, cb, 4, 64, backend="triton"), quantize(x, cb, 4, 64))
        q = quantize(x, cb, 4, 64)
        assert kernels.dequantize(q, cb, shape, 4, 64, backend="triton").shape == shape


def test_bad_arguments_are_named():
    cb = get_codebook("linear2", 4, device)
    x = torch.randn(4, 6, device=device)
    with pytest.raises(ValueError, match="bits"):
        kernels.quantize(x, cb, 3, 64, backend="triton")
    with pytest.raises(ValueError, match="offdiag"):
        kernels.quantize(x, cb, 4, 64, offdiag=True, backend="triton")
    with pytest.raises(ValueError, match="codebook"):
        kernels.quantize(x, get_codebook("linear2", 8, device), 4, 64, backend="triton")
    q = quantize(x, cb, 4, 64)
    with pytest.raises(ValueError, match="absmax"):
        kernels.dequantize(q, cb, (6, 4), 4, 64, backend="triton")


# ----------------------------------------------------------------------------- preconditioning
# The roots every storage hands out: stored symmetric (fp32 diagonal + quantized strict upper
# triangle, blocks per triangle row, 4-bit codes packed across row ends), bf16 or fp32 scales;
# and the 8-bit Cholesky factor of ``cholesky8`` in the same layout.


def _quantized_root(n, name="linear1.5", bits=4, block_size=40, scale_dtype=torch.bfloat16):
    a = torch.randn(n, n, device=device)
    a = (a + a.T) / n**0.5 + torch.eye(n, device=device)
    cb = get_codebook(name, bits, device)
    q = quantize_symmetric(a, cb, bits, block_size, scale_dtype=scale_dtype)
    return QuantizedMatrix(q.codes, q.absmax, q.diag, n, cb, bits, block_size, symmetric=True)


def _dense_root(n):
    a = torch.randn(n, n, device=device)
    return (a + a.T) / n**0.5


def _rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _emulated(grad, left, right, dtype):
    """What ``dtype`` products with exact accumulation give: operands and the intermediate
    ``left @ grad`` rounded to ``dtype``, everything else in float64."""

    def rounded(t):
        return t.to(dtype).double()

    lm = rounded(reference.materialize(left))
    rm = rounded(reference.materialize(right))
    return rounded(lm @ rounded(grad)) @ rm


@pytest.fixture(params=kernels.PRECONDITION_PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv(kernels.PATH_ENV_VAR, request.param)
    return request.param


def _check_precondition(grad, left, right, dtype, path):
    out = kernels.precondition(grad, left, right, dtype=dtype, backend="triton")
    ref = reference.precondition(grad, left, right, dtype=dtype)
    assert out.dtype == torch.float32 and out.shape == grad.shape
    if path == "workspace" and not torch.cuda.is_available():
        # the rebuild is bit for bit the reference's and the matmuls are the same torch calls
        assert torch.equal(out, ref)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    else:
        assert _rel_err(out, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
        quantized = isinstance(left, QuantizedMatrix) or isinstance(right, QuantizedMatrix)
        if path == "fused" and quantized and grad.numel() >= 256:
            # the products really are taken in ``dtype`` (fp32 products would be ~3e-3 off for bf16)
            assert _rel_err(out, _emulated(grad, left, right, dtype)) < (5e-4 if dtype == torch.bfloat16 else 1e-4)
    return out


PRECOND_CASES = [
    # (m, n, left, right): "q4" 4-bit linear1.5 root in blocks of 40 with bf16 scales (the
    # default), "q4f" fp32 scales, "c8" the 8-bit Cholesky layout (blocks of 1200: one per
    # triangle row), "q8" 8-bit dynamic blocks of 7, "d" dense fp32.
    (67, 40, "q4", "q4"),
    (67, 40, "q4", "d"),
    (67, 40, "d", "c8"),
    (16, 129, "q4f", "q8"),
    (33, 17, "d", "q4f"),
    (5, 3, "q4", "q4"),
    (1, 7, "q4", "c8"),
    (12, 9, "d", "d"),
]


def _root(kind, n):
    if kind == "q4":
        return _quantized_root(n)
    if kind == "q4f":
        return _quantized_root(n, "linear2", 4, 64, torch.float32)
    if kind == "c8":
        return _quantized_root(n, "linear1.5", 8, 1200)
    if kind == "q8":
        return _quantized_root(n, "dynamic", 8, 7, torch.float32)
    return _dense_root(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", PRECOND_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}-{c[3]}")
def test_precondition_matches_reference(case, dtype, path):
    m, n, lk, rk = case
    grad = torch.randn(m, n, device=device)
    _check_precondition(grad, _root(lk, m), _root(rk, n), dtype, path)


def test_precondition_fp16_and_bf16_gradient(path):
    grad = torch.randn(40, 24, device=device)
    left, right = _quantized_root(40), _quantized_root(24, "dynamic", 8, 32)
    _check_precondition(grad, left, right, torch.float16, path)
    out = _check_precondition(grad.bfloat16(), left, right, torch.bfloat16, path)
    exact = reference.precondition(grad.bfloat16().double(), left, right, dtype=torch.float64)
    assert _rel_err(out, exact) < 1e-2


def test_precondition_strided_gradient_block(path):
    """The optimizer passes views of the merged gradient (blocks of a larger matrix)."""
    g = torch.randn(50, 90, device=device)
    block = g[3:40, 10:75]
    _check_precondition(block, _quantized_root(37), _quantized_root(65), torch.float32, path)
    _check_precondition(block, _quantized_root(37), _dense_root(65), torch.bfloat16, path)
    _check_precondition(g.t()[5:70, 2:47], _quantized_root(65), _quantized_root(45), torch.float32, path)


def test_precondition_batch_matches_one_by_one(path):
    """Same-shape blocks in one batched call per side: each item as the reference's bmm gives it."""
    k, m, n = 3, 21, 34
    grads = [torch.randn(m, n, device=device) for _ in range(k)]
    for lk, rk in (("q4", "q4"), ("c8", "d"), ("d", "q4f")):
        lefts, rights = [_root(lk, m) for _ in range(k)], [_root(rk, n) for _ in range(k)]
        for dtype in (torch.float32, torch.bfloat16):
            out = kernels.precondition_batch(grads, lefts, rights, dtype=dtype, backend="triton")
            want = torch.bmm(torch.bmm(torch.stack([reference.materialize(x, dtype) for x in lefts]),
                                       torch.stack(grads).to(dtype)),
                             torch.stack([reference.materialize(x, dtype) for x in rights])).float()
            assert out.shape == (k, m, n) and out.dtype == torch.float32
            if path == "workspace" and not torch.cuda.is_available():
                assert torch.equal(out, want)
            else:
                assert _rel_err(out, want) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_precondition_identity_roots_return_the_gradient(path):
    n, m = 20, 11
    cb = get_codebook("linear1.5", 4, device)
    roots = []
    for k in (n, m):
        q = quantize_symmetric(torch.eye(k, device=device), cb, 4, 40, scale_dtype=torch.bfloat16)
        roots.append(QuantizedMatrix(q.codes, q.absmax, q.diag, k, cb, 4, 40, symmetric=True))
    grad = torch.randn(n, m, device=device)
    out = kernels.precondition(grad, *roots, backend="triton")
    torch.testing.assert_close(out, grad, rtol=0, atol=0)


def test_precondition_bad_shapes_are_named(path):
    grad = torch.randn(8, 6, device=device)
    with pytest.raises(ValueError, match="left root"):
        kernels.precondition(grad, _quantized_root(7), _dense_root(6), backend="triton")
    with pytest.raises(ValueError, match="right root"):
        kernels.precondition(grad, _dense_root(8), _dense_root(5), backend="triton")


# ----------------------------------------------------------------------------- symmetric store / rebuild

SYMMETRIC_CASES = [
    # (n, bits, block_size, scale dtype, codebook): order 1 and 2, odd orders (4-bit code bytes
    # across row ends), blocks longer than every row (the Cholesky factor's 1200), tiny blocks
    (1, 4, 40, torch.bfloat16, "linear1.5"),
    (2, 4, 40, torch.bfloat16, "linear1.5"),
    (7, 4, 3, torch.float32, "linear2"),
    (37, 4, 40, torch.bfloat16, "linear1.5"),
    (50, 8, 1200, torch.bfloat16, "linear1.5"),
    (33, 8, 5, torch.float32, "dynamic"),
    (64, 4, 64, torch.bfloat16, "dynamic"),
]


@pytest.mark.parametrize("case", SYMMETRIC_CASES, ids=lambda c: f"n{c[0]}-{c[1]}b-bs{c[2]}-{str(c[3])[6:]}")
def test_symmetric_store_and_rebuild_match_reference_bit_for_bit(case):
    from lightning_shampoo4.quant import dequantize_symmetric

    n, bits, bs, scale_dtype, name = case
    cb = get_codebook(name, bits, device)
    a = torch.randn(n, n, device=device) * 3
    a = a + a.T
    want = quantize_symmetric(a, cb, bits, bs, scale_dtype=scale_dtype)
    got = kernels.quantize_symmetric(a, cb, bits, bs, scale_dtype=scale_dtype, backend="triton")
    assert torch.equal(got.codes, want.codes) and torch.equal(got.diag, want.diag)
    assert got.absmax.dtype == scale_dtype and torch.equal(got.absmax, want.absmax)
    root = QuantizedMatrix(want.codes, want.absmax, want.diag, n, cb, bits, bs, symmetric=True)
    dense = dequantize_symmetric(want, cb, n, bits, bs)
    assert torch.equal(kernels.materialize(root, backend="triton"), dense)
    assert torch.equal(kernels.materialize(root, torch.bfloat16, backend="triton"), dense.bfloat16())


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_kernels_with_many_small_programs(monkeypatch, bits):
    """Tiles much smaller than the matrix: program boundaries inside triangle rows, code bytes
    packed by several programs, rows rebuilt by several programs, several roots batched."""
    from lightning_shampoo4.kernels import triton_symmetric
    from lightning_shampoo4.quant import dequantize_symmetric

    monkeypatch.setattr(triton_symmetric, "_tile_elems", lambda: 64)
    n, bs = 45, 6
    cb = get_codebook("linear1.5", bits, device)
    qs = []
    for _ in range(3):
        a = torch.randn(n, n, device=device)
        want = quantize_symmetric(a + a.T, cb, bits, bs, scale_dtype=torch.bfloat16)
        got = kernels.quantize_symmetric(a + a.T, cb, bits, bs, scale_dtype=torch.bfloat16, backend="triton")
        assert torch.equal(got.codes, want.codes) and torch.equal(got.absmax, want.absmax)
        qs.append(want)
    out = triton_symmetric.rebuild(torch.stack([q.codes for q in qs]), torch.stack([q.absmax for q in qs]),
                                   torch.stack([q.diag for q in qs]), cb, n, bits, bs, 3, 40)
    for q, o in zip(qs, out):
        assert torch.equal(o, dequantize_symmetric(q, cb, n, bits, bs)[3:40])


def test_symmetric_store_of_bf16_input_zero_blocks_and_nan():
    n = 9
    cb = get_codebook("linear1.5", 4, device)
    a = torch.randn(n, n, device=device)
    a[2, 3:] = 0.0  # a zero block stays zero
    a[5, 7] = float("nan")  # a NaN takes the last code, its block's scale is NaN
    for x in (a, a.bfloat16()):
        want = quantize_symmetric(x, cb, 4, 4, scale_dtype=torch.bfloat16)
        got = kernels.quantize_symmetric(x, cb, 4, 4, scale_dtype=torch.bfloat16, backend="triton")
        assert torch.equal(got.codes, want.codes)
        torch.testing.assert_close(got.absmax, want.absmax, rtol=0, atol=0, equal_nan=True)


def test_eigenvectors_with_bf16_scales_match_reference():
    """SOAP4bit and the eigenvector storage keep U^T row-blocked with bf16 scales."""
    cb = get_codebook("linear2", 4, device)
    for n, bs in ((33, 64), (70, 16)):
        u = torch.linalg.qr(torch.randn(n, n, device=device))[0]
        want = quantize(u, cb, 4, bs, transpose=True, scale_dtype=torch.bfloat16)
        got = kernels.quantize(u, cb, 4, bs, transpose=True, scale_dtype=torch.bfloat16, backend="triton")
        assert torch.equal(got.codes, want.codes) and got.absmax.dtype == torch.bfloat16
        assert torch.equal(got.absmax, want.absmax)
        out = kernels.dequantize(want, cb, (n, n), 4, bs, transpose=True, backend="triton")
        assert torch.equal(out, dequantize(want, cb, (n, n), 4, bs, transpose=True))


# ----------------------------------------------------------------------------- dispatch


def test_auto_picks_triton_only_for_cuda(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert kernels.resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    assert kernels.resolve_backend("torch", torch.device("cuda", 0)) == "torch"
    with pytest.raises(ValueError, match="kernel_backend"):
        kernels.resolve_backend("cuda", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter behaviour")
def test_forced_triton_on_cpu_uses_the_interpreter(monkeypatch):
    assert kernels.triton_interpreted()
    assert kernels.resolve_backend("triton", torch.device("cpu")) == "triton"
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "triton"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter behaviour")
def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from lightning_shampoo4.kernels import triton_quant

    monkeypatch.setattr(triton_quant, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="CUDA"):
        kernels.quantize(torch.randn(4, 4), get_codebook("linear2", 4), backend="triton")


# ----------------------------------------------------------------------------- optimizer


def test_optimizer_trajectory_is_the_same_with_triton_kernels():
    """Shampoo4bit through the dispatcher on the two backends: the Triton run really launches
    Triton kernels (counted), the torch run none; gradients that do not depend on the weights
    keep the statistics identical, so the two differ at most by fp32 rounding."""
    from lightning_shampoo4.kernels import triton_symmetric
    from lightning_shampoo4.optim import Shampoo4bit

    cls = type(triton_symmetric._rebuild_kernel)
    original = cls.__getitem__
    launches = []

    def counting(self, grid):
        launches.append(getattr(self, "fn", self).__name__)
        return original(self, grid)

    def run(backend):
        launches.clear()
        gen = torch.Generator().manual_seed(1)
        w = torch.nn.Parameter(torch.zeros(70, 65, device=device))
        opt = Shampoo4bit(
            [w], lr=1e-2, base="sgd", momentum=0.9, bits=4, moment_bits=4, min_quant_numel=64,
            stat_interval=1, root_interval=2, kernel_backend=backend,
        )  # fmt: skip
        for _ in range(3):
            w.grad = torch.randn(70, 65, generator=gen).to(device)
            opt.step()
        return w.detach(), list(launches)

    cls.__getitem__ = counting
    try:
        (got, on_triton), (want, on_torch) = run("triton"), run("torch")
    finally:
        cls.__getitem__ = original
    assert {"_store_kernel", "_rebuild_kernel", "_moment_kernel"} <= set(on_triton), on_triton
    assert not on_torch
    assert torch.isfinite(got).all() and got.abs().sum() > 0
    assert _rel_err(got, want) < 1e-5


def test_triton_failure_falls_back_once_with_a_warning(monkeypatch):
    """Under "auto", a Triton kernel that fails to compile or launch is reported once and the
    torch reference takes over; a forced "triton" backend raises instead."""
    import warnings

    import lightning_shampoo4.kernels as k
    from lightning_shampoo4.kernels import reference, triton_quant
    from lightning_shampoo4.quant import get_codebook

    def broken(*args, **kwargs):
        raise RuntimeError("PTX compile failed")

    monkeypatch.setattr(k, "_impl", lambda backend, device: "triton")
    monkeypatch.setattr(k, "triton_interpreted", lambda: True)
    monkeypatch.setattr(triton_quant, "quantize", broken)
    monkeypatch.setattr(k, "_BROKEN", set())
    monkeypatch.delenv(k.ENV_VAR, raising=False)
    x = torch.randn(8, 70)
    cb = get_codebook("linear2", 4)
    want = reference.quantize(x, cb, 4, 64)
    with pytest.warns(RuntimeWarning, match="quantize"):
        got = k.quantize(x, cb, 4, 64, backend="auto")
    assert torch.equal(got.codes, want.codes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert torch.equal(k.quantize(x, cb, 4, 64, backend="auto").codes, want.codes)
    with pytest.raises(RuntimeError, match="PTX"):
        k.quantize(x, cb, 4, 64, backend="triton")


@pytest.mark.parametrize("m, n", [(300, 40), (7, 513), (257, 258)])
def test_precondition_with_panelled_symmetric_roots(m, n, monkeypatch):
    """Large stored symmetric roots (here: above order 256) are applied a panel of rows at a time,
    never whole; the product is the float64 product of the rebuilt roots (to fp32 rounding),
    and the CPU kernel's panels give it bit for bit."""
    from lightning_shampoo4.kernels import cpu
    from lightning_shampoo4.quant import dequantize_symmetric, quantize_symmetric

    monkeypatch.setattr(reference, "PANEL_ORDER", 256)

    cb = get_codebook()

    def root(k):
        a = torch.randn(k, k)
        q = quantize_symmetric(a + a.T, cb, 4, 256, scale_dtype=torch.bfloat16)
        return QuantizedMatrix(q.codes, q.absmax, q.diag, k, cb, 4, 256, symmetric=True), dequantize_symmetric(
            q, cb, k, 4, 256)

    (left, dl), (right, dr) = root(m), root(n)
    g = torch.randn(m, n)
    assert reference._panelled(left) or reference._panelled(right)
    got = reference.precondition(g, left, right)
    want = dl.double() @ g.double() @ dr.double()
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
    if cpu.available():  # the C kernel's panels through the rebuild op
        assert torch.equal(reference.precondition(g, left, right, rebuild=kernels._rebuilder("native")), got)
        assert torch.equal(kernels.precondition(g, left, right, backend="auto"), got)
