"""The quantizer: codebooks, round-trip error bounds, packing, diag-real, transpose."""

import math
import sys
from pathlib import Path

import pytest
import torch

from lightning_shampoo4.quant import (
    blockwise,
    dequantize,
    dequantize_symmetric,
    get_codebook,
    pack4,
    packed_numel,
    quantize,
    quantize_symmetric,
    symmetric_panels,
    unpack4,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from quant_speed import old_dequantize, old_quantize, temp_bytes  # noqa: E402

LINEAR2_4 = [-1, -0.7511, -0.5378, -0.3600, -0.2178, -0.1111, -0.0400, 0, 0.0044, 0.0400, 0.1111,
             0.2178, 0.3600, 0.5378, 0.7511, 1]
DYNAMIC_4 = [-0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325, -0.0055, 0, 0.0055, 0.0325, 0.0775,
             0.2125, 0.4375, 0.6625, 0.8875, 1]
# sign(d) |d|^1.5 on linspace(-1, 1, 16) with -1/15 moved to 0, written out by hand
LINEAR15_4 = [-1, -(13 / 15) ** 1.5, -(11 / 15) ** 1.5, -(9 / 15) ** 1.5, -(7 / 15) ** 1.5, -(5 / 15) ** 1.5,
              -(3 / 15) ** 1.5, 0, (1 / 15) ** 1.5, (3 / 15) ** 1.5, (5 / 15) ** 1.5, (7 / 15) ** 1.5,
              (9 / 15) ** 1.5, (11 / 15) ** 1.5, (13 / 15) ** 1.5, 1]
SHAPES = [(1,), (7,), (1, 1), (3, 5), (64, 64), (65, 65), (33, 70), (4, 3, 130)]


def test_4bit_codebooks_match_spec():
    assert get_codebook("linear2", 4).tolist() == pytest.approx(LINEAR2_4, abs=5e-5)
    assert get_codebook("dynamic", 4).tolist() == pytest.approx(DYNAMIC_4, abs=5e-5)
    assert get_codebook("linear1.5", 4).tolist() == pytest.approx(LINEAR15_4, abs=1e-6)
    assert get_codebook("linear", 4).tolist() == pytest.approx(torch.linspace(-1, 1, 16).tolist())


@pytest.mark.parametrize("name", ["linear2", "linear1.5", "dynamic", "linear"])
def test_8bit_codebooks_are_sorted_and_span_unit_interval(name):
    cb = get_codebook(name, 8)
    assert cb.numel() == 256 and cb.dtype == torch.float32
    assert torch.all(cb[1:] > cb[:-1])
    assert cb.max().item() == 1.0 and cb.min().item() >= -1.0
    if name != "linear":
        assert 0.0 in cb.tolist()


def test_bad_codebook_arguments():
    with pytest.raises(ValueError, match="codebook"):
        get_codebook("nf4", 4)
    with pytest.raises(ValueError, match="bits"):
        get_codebook("linear2", 3)


def _max_halfgap(cb):
    return ((cb[1:] - cb[:-1]) / 2).max().item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", ["linear2", "dynamic", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_within_worst_case_error(shape, bits, name, dtype):
    cb = get_codebook(name, bits)
    x = torch.randn(shape).to(dtype)
    q = quantize(x, cb, bits, block_size=64)
    y = dequantize(q, cb, x.shape, bits, block_size=64)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert q.codes.dtype == torch.uint8
    rows, cols = (1, shape[0]) if len(shape) == 1 else (x.numel() // shape[-1], shape[-1])
    assert q.absmax.shape == (rows, -(-cols // 64))
    xf = x.float().reshape(rows, cols)
    absmax_per_elem = q.absmax.repeat_interleave(64, dim=1)[:, :cols]
    err = (y.reshape(rows, cols) - xf).abs()
    # the codebook's worst case, plus the part of [-1, 1] it does not cover ("linear" has no exact zero)
    bound = (_max_halfgap(cb) + (1 - cb.abs().max().item())) * absmax_per_elem
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-7)
    # the block maximum is always represented exactly (codebooks contain 1)
    assert torch.allclose(y.reshape(rows, cols).abs().amax(), xf.abs().amax()) or name == "dynamic"


def test_blocks_stay_inside_rows():
    """A row of large values must not change the scale of the next row's block."""
    x = torch.zeros(3, 10)
    x[0] = 100.0
    x[1] = torch.linspace(-1, 1, 10)
    q = quantize(x, get_codebook(), 4, block_size=64)
    assert q.absmax[:, 0].tolist() == [100.0, 1.0, 0.0]
    y = dequantize(q, get_codebook(), x.shape, 4, block_size=64)
    assert torch.equal(y[2], torch.zeros(10))


@pytest.mark.parametrize("numel", [1, 2, 7, 64, 65, 4225])
def test_pack_unpack_odd_sizes(numel):
    idx = torch.randint(0, 16, (numel,), dtype=torch.uint8)
    packed = pack4(idx)
    assert packed.numel() == (numel + 1) // 2
    assert torch.equal(unpack4(packed, numel), idx)
    assert int(packed[0] & 0xF) == int(idx[0])  # element 0 in the low nibble
    if numel > 1:
        assert int(packed[0] >> 4) == int(idx[1])


def test_odd_order_packs_flat_across_rows():
    """65 x 65: rows share bytes (element 65 is the high nibble of byte 32); no row padding."""
    x = torch.randn(65, 65)
    q = quantize(x, get_codebook(), 4, 64)
    assert q.codes.numel() == (65 * 65 + 1) // 2
    y = dequantize(q, get_codebook(), x.shape, 4, 64)
    q2 = quantize(y, get_codebook(), 4, 64)
    assert torch.equal(q.codes, q2.codes)  # dequantized values re-quantize to the same codes


@pytest.mark.parametrize("n", [5, 64, 65, 130])
@pytest.mark.parametrize("bits", [4, 8])
def test_diag_real_keeps_diagonal_exact(n, bits):
    a = torch.randn(n, n)
    a = a @ a.T + 50 * torch.eye(n)  # a dominant diagonal would swamp the off-diagonal absmax
    cb = get_codebook("linear2", bits)
    q = quantize(a, cb, bits, 64, offdiag=True)
    assert q.diag.dtype == torch.float32 and torch.equal(q.diag, a.diagonal())
    b = dequantize(q, cb, a.shape, bits, 64)
    assert torch.equal(b.diagonal(), a.diagonal())
    off = a - torch.diag(a.diagonal())
    plain = dequantize(quantize(a, cb, bits, 64), cb, a.shape, bits, 64)
    assert (b - a).norm() < (plain - a).norm()  # the diagonal no longer sets the scale
    assert (b - a).abs().max() <= off.abs().max() * 0.5


def test_transpose_quantizes_the_transpose():
    u = torch.randn(33, 70)
    cb = get_codebook()
    qt = quantize(u, cb, 4, 64, transpose=True)
    ref = quantize(u.T.contiguous(), cb, 4, 64)
    assert torch.equal(qt.codes, ref.codes) and torch.equal(qt.absmax, ref.absmax)
    back = dequantize(qt, cb, u.shape, 4, 64, transpose=True)
    assert back.shape == u.shape
    assert torch.allclose(back, dequantize(ref, cb, (70, 33), 4, 64).T)


def test_zero_tensor_and_nearest_rounding():
    cb = get_codebook()
    q = quantize(torch.zeros(10), cb, 4, 64)
    assert torch.equal(dequantize(q, cb, (10,), 4, 64), torch.zeros(10))
    # values just either side of a midpoint go to the nearer code
    x = torch.tensor([1.0, 0.0 + 0.0021, 0.0 + 0.0023, -0.2])
    y = dequantize(quantize(x, cb, 4, 64), cb, (4,), 4, 64)
    assert y.tolist() == pytest.approx([1.0, 0.0, 0.0044, -0.2178], abs=1e-4)


def test_bad_quantize_arguments():
    cb = get_codebook()
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(4), cb, 3)
    with pytest.raises(ValueError, match="block_size"):
        quantize(torch.randn(4), cb, 4, 0)
    with pytest.raises(ValueError, match="square"):
        quantize(torch.randn(3, 4), cb, 4, offdiag=True)
    with pytest.raises(ValueError, match="codebook needs 256"):
        quantize(torch.randn(3), cb, 8)


# -- the fast implementation against a frozen copy of the original one ------------------------
# The original reference (``benchmarks/quant_speed.py``, which also times it), kept verbatim in
# algorithm: a zero-padded fp32 copy, an int64 bucketize, codebook[idx.long()] and
# repeat_interleave'd scales. The current code must give the same bits for every input.
_INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _same_bits(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    if a.dtype in _INT_OF:
        a, b = a.contiguous().view(_INT_OF[a.dtype]), b.contiguous().view(_INT_OF[b.dtype])
    assert torch.equal(a, b), f"{what}: {(a != b).sum().item()} of {a.numel()} differ"


def _awkward(shape, dtype, gen):
    """Random values over many magnitudes, with zero blocks, -0.0, subnormals and huge entries."""
    x = torch.randn(shape, generator=gen) * 10.0 ** torch.randint(-6, 7, shape, generator=gen)
    flat = x.view(-1)
    if flat.numel() >= 4:
        flat[: max(1, flat.numel() // 7)] = 0.0  # zero blocks at the start of the first rows
        flat[flat.numel() // 3] = -0.0
        flat[flat.numel() // 2] = torch.finfo(dtype).max / 4  # huge, still finite
        flat[-1] = torch.finfo(torch.float32).tiny / 8 if dtype == torch.float32 else 0.0
    return x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)


def _assert_matches_old(x, cb, bits, bs, offdiag=False, transpose=False, what=""):
    want = old_quantize(x, cb, bits, bs, offdiag=offdiag, transpose=transpose)
    got = quantize(x, cb, bits, bs, offdiag=offdiag, transpose=transpose)
    _same_bits(got.codes, want.codes, f"{what} codes")
    _same_bits(got.absmax, want.absmax, f"{what} absmax")
    assert (got.diag is None) == (want.diag is None)
    if want.diag is not None:
        _same_bits(got.diag, want.diag, f"{what} diag")
    for dtype in (torch.float32, torch.bfloat16):
        ref = old_dequantize(want, cb, x.shape, bits, bs, transpose=transpose, dtype=dtype)
        out = dequantize(want, cb, x.shape, bits, bs, transpose=transpose, dtype=dtype)
        assert out.is_contiguous()
        _same_bits(out, ref, f"{what} dequantize {dtype}")


# (shape, offdiag, transpose): 0-D, 1-D, 1 x 1, short and odd rows, odd orders, N-D, transposed
EQUAL_CASES = [
    ((), False, False),
    ((1,), False, False),
    ((7,), False, False),
    ((1, 1), False, False),
    ((1, 1), True, False),
    ((3, 200), False, False),
    ((64, 64), False, False),
    ((65, 65), True, False),
    ((65, 65), False, True),
    ((33, 70), False, True),
    ((9, 9), True, True),
    ((4, 3, 130), False, False),
]


@pytest.mark.parametrize("chunk", [None, 37], ids=["chunk-default", "chunk-37"])
@pytest.mark.parametrize("case", EQUAL_CASES, ids=lambda c: "x".join(map(str, c[0])) + "-d" * c[1] + "-T" * c[2])
@pytest.mark.parametrize("bits", [4, 8])
def test_bit_identical_to_original(case, bits, chunk, monkeypatch):
    """Every codebook, block size and input dtype; a tiny chunk also exercises the long-row
    path (runs of blocks inside one row) and chunks that start on a high nibble."""
    if chunk is not None:
        monkeypatch.setattr(blockwise, "_CHUNK", chunk)
    shape, offdiag, transpose = case
    gen = torch.Generator().manual_seed(hash((shape, bits)) % 2**31)
    for name in ("linear2", "dynamic", "linear"):
        cb = get_codebook(name, bits)
        for bs in (1, 7, 64, 128, 256):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                x = _awkward(shape, dtype, gen)
                _assert_matches_old(x, cb, bits, bs, offdiag, transpose, f"{name}/{bs}/{dtype}")


@pytest.mark.parametrize(
    "shape, bits, name, bs, dtype, offdiag, transpose",
    [
        ((1200, 1200), 4, "linear2", 64, torch.float32, True, False),
        ((1200, 1200), 4, "linear2", 128, torch.bfloat16, False, True),
        ((1200, 1200), 8, "dynamic", 256, torch.float16, False, False),
        ((1200, 1200), 8, "linear2", 7, torch.float32, True, False),
        ((3, 70001), 4, "dynamic", 64, torch.float32, False, False),  # rows longer than a chunk
    ],
)
def test_bit_identical_to_original_large(shape, bits, name, bs, dtype, offdiag, transpose):
    gen = torch.Generator().manual_seed(1)
    x = _awkward(shape, dtype, gen)
    _assert_matches_old(x, get_codebook(name, bits), bits, bs, offdiag, transpose)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", ["linear2", "dynamic", "linear"])
def test_ties_nan_and_inf_match_original(bits, name):
    """Values exactly on a midpoint go to the lower index; NaN / inf blocks as before."""
    cb = get_codebook(name, bits)
    mids = (cb[:-1] + cb[1:]) / 2
    ties = torch.cat([torch.ones(1), mids, -mids.flip(0)])  # block absmax 1: normalized == midpoint
    q = quantize(ties, cb, bits, ties.numel())
    idx = unpack4(q.codes, ties.numel()) if bits == 4 else q.codes
    assert idx[1 : mids.numel() + 1].tolist() == list(range(mids.numel()))
    _assert_matches_old(ties, cb, bits, ties.numel())
    _assert_matches_old(ties, cb, bits, 5)
    odd = torch.randn(6, 40)
    odd[0, 3] = float("nan")
    odd[1, 0] = float("inf")
    odd[2, 39] = -float("inf")
    odd[3, :20] = float("nan")
    for bs in (1, 8, 64):
        _assert_matches_old(odd, cb, bits, bs)


def test_dequantize_into_out():
    cb = get_codebook()
    u = torch.randn(70, 33)
    q = quantize(u, cb, 4, 64, transpose=True)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full((70, 33), float("nan"), dtype=dtype)
        got = dequantize(q, cb, u.shape, 4, 64, transpose=True, dtype=dtype, out=out)
        assert got is out
        _same_bits(out, dequantize(q, cb, u.shape, 4, 64, transpose=True, dtype=dtype), "out")
    a = torch.randn(65, 65)
    qa = quantize(a, cb, 4, 64, offdiag=True)
    work = torch.empty(65, 65)
    for _ in range(2):  # a reused workspace
        _same_bits(dequantize(qa, cb, a.shape, 4, 64, out=work), old_dequantize(qa, cb, a.shape, 4, 64), "reuse")
    with pytest.raises(ValueError, match="out must be"):
        dequantize(qa, cb, a.shape, 4, 64, out=torch.empty(65, 64))
    with pytest.raises(ValueError, match="out must be"):
        dequantize(qa, cb, a.shape, 4, 64, out=torch.empty(65, 65, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous"):
        dequantize(qa, cb, a.shape, 4, 64, out=torch.empty(65, 65).t())


def test_temporaries_are_bounded():
    """Working memory is a few chunks, not a multiple of the matrix (the original: ~17 B/element)."""
    n = 600
    cb = get_codebook()
    x = torch.randn(n, n)
    q = quantize(x, cb, 4, 64, offdiag=True)
    bound = 4 * n * n  # bytes: a few chunks of ~13 B per element, not a copy of the matrix
    assert temp_bytes(lambda: quantize(x, cb, 4, 64, offdiag=True)) <= bound
    xb = x.bfloat16()
    assert temp_bytes(lambda: quantize(xb, cb, 4, 64, transpose=True)) <= bound
    # dequantizing (every step) trades memory for fewer calls: one chunk up to 2**20 elements,
    # its buffers below 7 bytes per element (the dense output itself is 4)
    assert temp_bytes(lambda: dequantize(q, cb, (n, n), 4, 64)) <= 7 * n * n
    assert temp_bytes(lambda: old_quantize(x, cb, 4, 64, offdiag=True)) > 10 * n * n


# -- symmetric storage: fp32 diagonal, quantized strict upper triangle ---------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 64, 65, 130, 257])
@pytest.mark.parametrize("bits, name, bs", [(4, "linear2", 64), (4, "dynamic", 7), (8, "linear2", 128), (4, "linear", 1)])
def test_symmetric_matches_row_by_row_quantization(n, bits, name, bs, monkeypatch):
    monkeypatch.setattr(blockwise, "_CHUNK", 300)  # several chunks even for small orders
    cb = get_codebook(name, bits)
    a = torch.randn(n, n, dtype=torch.float64)
    a = a + a.T
    q = quantize_symmetric(a, cb, bits, bs)
    tri = n * (n - 1) // 2
    assert q.codes.numel() == packed_numel(tri, bits) and q.codes.dtype == torch.uint8
    assert q.absmax.shape == (sum(-(-(n - 1 - i) // bs) for i in range(n - 1)),)
    _same_bits(q.diag, a.diagonal().float(), "diag")
    y = dequantize_symmetric(q, cb, n, bits, bs)
    assert y.shape == (n, n) and y.dtype == torch.float32
    assert torch.equal(y, y.T)
    _same_bits(y.diagonal(), a.diagonal().float(), "diagonal")
    # each triangle row is stored exactly as quantizing that row alone
    idx = unpack4(q.codes, tri) if bits == 4 else q.codes
    start = block = 0
    for i in range(n - 1):
        row = a[i, i + 1 :]
        ref = quantize(row, cb, bits, bs)
        ref_idx = unpack4(ref.codes, row.numel()) if bits == 4 else ref.codes
        assert torch.equal(idx[start : start + row.numel()], ref_idx)
        _same_bits(q.absmax[block : block + ref.absmax.numel()], ref.absmax.view(-1), f"row {i} absmax")
        _same_bits(y[i, i + 1 :], dequantize(ref, cb, row.shape, bits, bs), f"row {i} values")
        start += row.numel()
        block += ref.absmax.numel()


def test_symmetric_bf16_out_and_scale_dtypes():
    cb = get_codebook()
    n = 97
    a = torch.randn(n, n)
    a = a @ a.T
    q = quantize_symmetric(a, cb, 4, 64)
    out = torch.empty(n, n, dtype=torch.bfloat16)
    assert dequantize_symmetric(q, cb, n, 4, 64, dtype=torch.bfloat16, out=out) is out
    _same_bits(out, dequantize_symmetric(q, cb, n, 4, 64).bfloat16(), "bf16")
    exact = dequantize_symmetric(q, cb, n, 4, 64)
    for sd in (torch.float16, torch.bfloat16):
        qs = quantize_symmetric(a, cb, 4, 64, scale_dtype=sd)
        assert qs.absmax.dtype == sd
        # rounded to nearest (unbiased): a rounded-up scale inflated every block maximum a little,
        # which compounds in a state that is re-quantized from itself (tests/test_cholesky.py)
        assert torch.equal(qs.absmax, q.absmax.to(sd))
        y = dequantize_symmetric(qs, cb, n, 4, 64)
        assert torch.equal(y, y.T)
        assert (y - a).norm() < 1.1 * (exact - a).norm()
    # a block maximum above its rounded-down scale gets the top code: decoded as the scale
    x = torch.zeros(3, 3)
    x[0, 1] = x[1, 0] = 1.0 + 2.0**-9 + 2.0**-12  # rounds down to 1.0 in bf16
    x[0, 2] = x[2, 0] = 0.25
    qs = quantize_symmetric(x, cb, 4, 64, scale_dtype=torch.bfloat16)
    assert float(qs.absmax[0]) == 1.0
    assert float(dequantize_symmetric(qs, cb, 3, 4, 64)[0, 1]) == 1.0
    with pytest.raises(ValueError, match="square"):
        quantize_symmetric(torch.randn(3, 4), cb)
    with pytest.raises(ValueError, match="range"):
        quantize_symmetric(torch.full((3, 3), 1e6), cb, scale_dtype=torch.float16)


def test_scale_dtype_on_plain_quantize():
    cb = get_codebook()
    u = torch.linalg.qr(torch.randn(100, 100))[0]
    q32 = quantize(u, cb, 4, 64, transpose=True)
    q16 = quantize(u, cb, 4, 64, transpose=True, scale_dtype=torch.float16)
    assert q16.absmax.dtype == torch.float16 and torch.equal(q16.absmax, q32.absmax.half())  # nearest
    y32 = dequantize(q32, cb, u.shape, 4, 64, transpose=True)
    y16 = dequantize(q16, cb, u.shape, 4, 64, transpose=True)
    assert (y16 - u).norm() < 1.05 * (y32 - u).norm()
    with pytest.raises(ValueError, match="scale_dtype"):
        quantize(u, cb, 4, 64, scale_dtype=torch.int8)


@pytest.mark.parametrize("n, bs, scale_dtype, bits", [(2, 1, torch.float32, 4), (3, 1, torch.float32, 4),
                                                      (65, 7, torch.bfloat16, 4), (300, 256, torch.bfloat16, 4),
                                                      (129, 64, torch.float16, 4), (66, 5, torch.bfloat16, 8)])
def test_symmetric_one_pass_equals_chunked(n, bs, scale_dtype, bits, monkeypatch):
    """Roots up to the one-pass size are rebuilt in a few calls; the result is the chunked one, bit for bit."""
    cb = get_codebook("linear2", bits)
    a = torch.randn(n, n)
    q = quantize_symmetric(a + a.T, cb, bits, bs, scale_dtype=scale_dtype)
    one_pass = dequantize_symmetric(q, cb, n, bits, bs)
    assert torch.equal(one_pass, one_pass.T)
    monkeypatch.setattr(blockwise, "_SYMMETRIC_ONE_PASS", 0)
    monkeypatch.setattr(blockwise, "_CHUNK", 300)
    _same_bits(one_pass, dequantize_symmetric(q, cb, n, bits, bs), "symmetric")


@pytest.mark.parametrize("n, bits, rows", [(3, 4, 2), (257, 4, 256), (400, 4, 128), (401, 8, 100)])
def test_symmetric_panels_are_the_rows_of_the_rebuilt_matrix(n, bits, rows):
    """Panels (rebuilt a few rows at a time, decoded in chunks for n > 362) stack to the whole
    rebuilt matrix, bit for bit, and that matrix is the one an element-by-element walk of the
    stored layout gives (fp32 products, as stored values are fp32 code value x scale)."""
    cb = get_codebook("linear2", bits)
    a = torch.randn(n, n, dtype=torch.float64)
    q = quantize_symmetric((a + a.T).float(), cb, bits, 64, scale_dtype=torch.bfloat16)
    whole = dequantize_symmetric(q, cb, n, bits, 64)
    panels = [(r0, r1, p.clone()) for r0, r1, p in symmetric_panels(q, cb, n, bits, 64, rows=rows)]
    assert [r0 for r0, _, _ in panels] == list(range(0, n, rows)) and panels[-1][1] == n
    _same_bits(torch.cat([p for _, _, p in panels]), whole, "panels")
    # float64 reference: element (i, j) of the upper triangle times its block's scale
    codes = (unpack4(q.codes, n * (n - 1) // 2) if bits == 4 else q.codes).long()
    tri = cb[codes]
    k = 0
    ref = torch.zeros(n, n)
    scales = q.absmax.float()
    b = 0
    for i in range(n - 1):
        width = n - 1 - i
        per = torch.arange(width) // 64
        ref[i, i + 1 :] = tri[k : k + width] * scales[b + per]
        k, b = k + width, b + int(per[-1]) + 1
    ref = ref + ref.T + torch.diag(q.diag)
    assert torch.equal(whole, ref)


@pytest.mark.parametrize("n, bits, bs, scale_dtype, dtype, transposed", [
    (2, 4, 1, torch.float32, torch.float32, False), (65, 4, 7, torch.bfloat16, torch.float32, True),
    (400, 4, 256, torch.bfloat16, torch.float32, False), (129, 8, 64, torch.float16, torch.bfloat16, True),
    (363, 4, 64, torch.float32, torch.float32, False)])
def test_quantize_symmetric_one_pass_equals_row_chunked(n, bits, bs, scale_dtype, dtype, transposed, monkeypatch):
    """The gather-based store (two sync-free passes over the triangle) gives the codes and scales
    of the row-chunked one, bit for bit, whatever the input's layout and dtype; zero blocks too."""
    cb = get_codebook("linear2", bits)
    a = torch.randn(n, n) * torch.logspace(-3, 3, n)[:, None]
    a[: n // 3, n // 2 :] = 0  # whole zero blocks
    x = (a + a.T).to(dtype)
    x = x.T.contiguous().T if transposed else x
    one = quantize_symmetric(x, cb, bits, bs, scale_dtype=scale_dtype)
    monkeypatch.setattr(blockwise, "_SYMMETRIC_ONE_PASS", 0)
    chunked = quantize_symmetric(x, cb, bits, bs, scale_dtype=scale_dtype)
    assert torch.equal(one.codes, chunked.codes)
    _same_bits(one.absmax.float(), chunked.absmax.float(), "absmax")
    _same_bits(one.diag, chunked.diag, "diag")


def test_a_large_root_is_applied_without_a_dense_copy():
    """grad @ root with a stored root above ``PANEL_ORDER`` works a panel of rows at a time: with
    the CPU kernel its temporaries stay below one dense fp32 copy of the root (rebuilding the root
    whole needs that copy); the torch rebuild gives the same product."""
    from lightning_shampoo4 import kernels
    from lightning_shampoo4.kernels import QuantizedMatrix, cpu, reference

    n, m = reference.PANEL_ORDER + 52, 16
    cb = get_codebook()
    a = torch.randn(n, n)
    q = quantize_symmetric(a + a.T, cb, 4, 256, scale_dtype=torch.bfloat16)
    root = QuantizedMatrix(q.codes, q.absmax, q.diag, n, cb, 4, 256, symmetric=True)
    g, eye = torch.randn(m, n), torch.eye(m)
    dense = dequantize_symmetric(q, cb, n, 4, 256)
    assert torch.allclose(reference.precondition(g, eye, root), g @ dense, rtol=1e-4, atol=1e-4)
    if cpu.available():  # the dispatcher: the C kernel's panels through the rebuild op
        assert torch.equal(kernels.precondition(g, eye, root, backend="auto"), reference.precondition(g, eye, root))
        assert temp_bytes(lambda: kernels.precondition(g, eye, root, backend="auto")) < 4 * n * n
    assert temp_bytes(lambda: g @ dequantize_symmetric(q, cb, n, 4, 256)) > 4 * n * n


@pytest.mark.parametrize("name", ["exp_avg", "exp_avg_sq"])
def test_keyed_cells_index_like_bucketize(name):
    """The 8-bit dynamic maps take the bit-pattern cells instead of a search: the same index as
    torch.bucketize for every value, midpoints and their neighbours, +-0, +-inf, NaN of either sign."""
    from lightning_shampoo4.quant import blockwise as B
    from lightning_shampoo4.quant import moments as qm

    cb = qm.moment_codebook(name, 8, "cpu")
    tables = B._tables_for(cb, torch.device("cpu"))
    assert tables.cells == 0 and tables.shift > 0
    gen = torch.Generator().manual_seed(3)
    mids = tables.mids
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(math.inf)), torch.nextafter(mids, torch.tensor(-math.inf))])
    mags = torch.rand(20000, generator=gen) * 10.0 ** torch.randint(-12, 1, (20000,), generator=gen).float()
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.5, -1.5, math.inf, -math.inf, math.nan, -math.nan,
                            torch.finfo(torch.float32).tiny / 8, -torch.finfo(torch.float32).tiny / 8])
    v = torch.cat([near, mags, -mags, special]).contiguous()
    ws = B._work(v.numel(), v.device)
    ws.f1[: v.numel()].copy_(v)
    got = torch.empty(v.numel(), dtype=torch.uint8)
    B._indices(ws.f1[: v.numel()], tables, got, ws)
    want = torch.bucketize(v, mids, out_int32=True)
    assert torch.equal(got.int(), want), f"{(got.int() != want).sum()} of {v.numel()} differ"
