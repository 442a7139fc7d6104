"""The quantizer: codebooks, round-trip error bounds, packing, diag-real, transpose."""

import pytest
import torch

from lightning_shampoo4.quant import dequantize, get_codebook, pack4, quantize, unpack4

LINEAR2_4 = [-1, -0.7511, -0.5378, -0.3600, -0.2178, -0.1111, -0.0400, 0, 0.0044, 0.0400, 0.1111,
             0.2178, 0.3600, 0.5378, 0.7511, 1]
DYNAMIC_4 = [-0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325, -0.0055, 0, 0.0055, 0.0325, 0.0775,
             0.2125, 0.4375, 0.6625, 0.8875, 1]
SHAPES = [(1,), (7,), (1, 1), (3, 5), (64, 64), (65, 65), (33, 70), (4, 3, 130)]


def test_4bit_codebooks_match_spec():
    assert get_codebook("linear2", 4).tolist() == pytest.approx(LINEAR2_4, abs=5e-5)
    assert get_codebook("dynamic", 4).tolist() == pytest.approx(DYNAMIC_4, abs=5e-5)
    assert get_codebook("linear", 4).tolist() == pytest.approx(torch.linspace(-1, 1, 16).tolist())


@pytest.mark.parametrize("name", ["linear2", "dynamic", "linear"])
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
