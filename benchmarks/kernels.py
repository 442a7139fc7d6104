"""Benchmark the Triton kernels (needs a CUDA GPU).

What it measures, on one CUDA device:

* copy bandwidth: ``torch.clone`` of a 256 MiB fp32 tensor, (bytes read + written) / time,
  the practical roofline;
* quantize and dequantize bandwidth of the Triton kernels (4-bit block 64 and 8-bit block 256,
  plain and transposed, fp32 and bf16 output): (bytes of values, codes and absmax, each read or
  written once) / time, as a percentage of the copy bandwidth, with the torch reference for
  comparison, plus the latency at the size of one 1200 x 1200 factor;
* fused preconditioning ``D(L) @ G @ D(R)`` (stored symmetric 4-bit roots with bf16 scales,
  decoded inside the Triton matmul) against the Triton rebuild + ``torch.matmul`` (cuBLAS),
  and against dense fp32 roots (32-bit Shampoo, cuBLAS only), for fp32 and bf16 products, on
  the Shampoo blocks of ViT-Small (384 x 384, 384 x 1536, 1536 x 384) and ResNet34
  (512 x 4608 and 256 x 2304, blocked with max_order 1200 like the optimizer).

Targets (reported, not asserted): dequantize >= 60 % of copy bandwidth; fused
preconditioning no slower than dequantize + cuBLAS.

    python benchmarks/kernels.py                  # table + benchmarks/results/kernels.json
    python benchmarks/kernels.py --iters 200 --out some/dir

Timing: ``torch.cuda.Event`` around ``--iters`` back-to-back calls after ``--warmup`` calls,
median of ``--repeats``. fp32 matmuls run without TF32 (torch's default), like the kernels.
The JSON names the GPU (``torch.cuda.get_device_name``) and the machine.
Without CUDA the script says so and exits 0. ``--quick`` instead runs every code path once on
tiny shapes (in Triton's interpreter on a CPU) to check the script itself; its timings mean
nothing and it writes no result file.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, setup_run, write_result  # noqa: E402

NAME = "kernels"

# Shampoo blocks (rows, cols) of one parameter, before max_order blocking.
MODELS = {
    "vit_small": [
        ("attn.proj 384x384", 384, 384),
        ("mlp.fc2 384x1536", 384, 1536),
        ("mlp.fc1 1536x384", 1536, 384),
    ],
    "resnet34": [
        ("layer4 conv 512x4608", 512, 4608),
        ("layer3 conv 256x2304", 256, 2304),
    ],
}
QUICK_MODELS = {"quick": [("tiny 40x70", 40, 70), ("blocked 24x50", 24, 50)]}


def split(n: int, max_order: int) -> list[tuple[int, int]]:
    """(start, stop) of the max_order blocks of a dimension: 3072 -> 1200, 1200, 672."""
    return [(s, min(s + max_order, n)) for s in range(0, n, max_order)]


class Timer:
    """Milliseconds per call: CUDA events on a GPU, perf_counter elsewhere (--quick runs)."""

    def __init__(self, device: torch.device, warmup: int, iters: int, repeats: int):
        self.device, self.warmup, self.iters, self.repeats = device, warmup, iters, repeats

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        times = []
        for _ in range(self.repeats):
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(self.iters):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / self.iters)
            else:
                t0 = time.perf_counter()
                for _ in range(self.iters):
                    fn()
                times.append((time.perf_counter() - t0) * 1e3 / self.iters)
        return statistics.median(times)


def _gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def bench_bandwidth(timer: Timer, device: torch.device, side: int, factor: int) -> tuple[dict, list[dict]]:
    """Copy, quantize and dequantize bandwidth on a ``side x side`` fp32 matrix."""
    from lightning_shampoo4.kernels import reference, triton_quant
    from lightning_shampoo4.quant import get_codebook

    x = torch.randn(side, side, device=device)
    numel = x.numel()
    ms = timer(lambda: x.clone())
    copy = {"op": "copy (torch.clone)", "shape": [side, side], "bytes": 8 * numel, "ms": ms}
    copy["GB/s"] = _gbps(8 * numel, ms)
    rows = []

    def add(op, shape, nbytes, fn, bits, backend="triton"):
        t = timer(fn)
        gbps = _gbps(nbytes, t)
        rows.append(
            {
                "op": op,
                "backend": backend,
                "bits": bits,
                "shape": list(shape),
                "bytes": int(nbytes),
                "ms": t,
                "GB/s": gbps,
                "pct_of_copy": 100.0 * gbps / copy["GB/s"],
            }
        )

    for bits, bs in ((4, 64), (8, 256)):
        cb = get_codebook("linear2", bits, device)
        codes_bytes = (numel + 1) // 2 if bits == 4 else numel
        absmax_bytes = 4 * side * -(-side // bs)
        q = triton_quant.quantize(x, cb, bits, bs)
        qt = triton_quant.quantize(x, cb, bits, bs, transpose=True)
        qbytes = 4 * numel + codes_bytes + absmax_bytes
        add(f"quantize {bits}-bit", x.shape, qbytes, lambda: triton_quant.quantize(x, cb, bits, bs), bits)
        add(
            f"quantize {bits}-bit transposed",
            x.shape,
            qbytes,
            lambda: triton_quant.quantize(x, cb, bits, bs, transpose=True),
            bits,
        )
        for out_dtype, width in ((torch.float32, 4), (torch.bfloat16, 2)):
            name = "fp32" if out_dtype == torch.float32 else "bf16"
            dbytes = codes_bytes + absmax_bytes + width * numel
            add(
                f"dequantize {bits}-bit -> {name}",
                x.shape,
                dbytes,
                lambda: triton_quant.dequantize(q, cb, x.shape, bits, bs, dtype=out_dtype),
                bits,
            )
        dbytes = codes_bytes + absmax_bytes + 4 * numel
        add(
            f"dequantize {bits}-bit transposed -> fp32",
            x.shape,
            dbytes,
            lambda: triton_quant.dequantize(qt, cb, x.shape, bits, bs, transpose=True),
            bits,
        )
        if bits == 4:
            add(f"quantize {bits}-bit", x.shape, qbytes, lambda: reference.quantize(x, cb, bits, bs), bits, "torch")
            add(
                f"dequantize {bits}-bit -> fp32",
                x.shape,
                dbytes,
                lambda: reference.dequantize(q, cb, x.shape, bits, bs),
                bits,
                "torch",
            )

    # Latency at the size of one Shampoo factor (launch-bound; what the optimizer sees).
    cb = get_codebook("linear2", 4, device)
    f = torch.randn(factor, factor, device=device)
    qf = triton_quant.quantize(f, cb, 4, 64, offdiag=True)
    fbytes_codes = (f.numel() + 1) // 2 + 4 * factor * -(-factor // 64)
    add(
        "quantize 4-bit U^T (factor)",
        f.shape,
        4 * f.numel() + fbytes_codes,
        lambda: triton_quant.quantize(f, cb, 4, 64, transpose=True),
        4,
    )
    add(
        "dequantize 4-bit diag-real (factor)",
        f.shape,
        fbytes_codes + 4 * f.numel(),
        lambda: triton_quant.dequantize(qf, cb, f.shape, 4, 64),
        4,
    )
    add(
        "dequantize 4-bit diag-real (factor)",
        f.shape,
        fbytes_codes + 4 * f.numel(),
        lambda: reference.dequantize(qf, cb, f.shape, 4, 64),
        4,
        "torch",
    )
    return copy, rows


def _quantized_root(n: int, device: torch.device, bits: int = 4, block_size: int = 40):
    """A stored symmetric root of order n as the optimizer keeps it (4-bit triangle, bf16 scales,
    Linear-1.5 map; a ``QuantizedMatrix``) and its dense fp32 form."""
    from lightning_shampoo4.kernels import QuantizedMatrix, reference, triton_symmetric
    from lightning_shampoo4.quant import get_codebook

    a = torch.randn(n, n, device=device)
    a = (a + a.T) / (2 * n) ** 0.5 + torch.eye(n, device=device)
    cb = get_codebook("linear1.5", bits, device)
    codes, absmax, diag = triton_symmetric.quantize_symmetric(a, cb, bits, block_size, torch.bfloat16)
    root = QuantizedMatrix(codes, absmax, diag, n, cb, bits, block_size, symmetric=True)
    return root, reference.materialize(root)


def _dequantize_root(root, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``dtype`` root, rebuilt by the Triton kernel (the workspace path)."""
    from lightning_shampoo4.kernels import triton_symmetric

    n = root.order
    dense = triton_symmetric.rebuild(root.codes[None], root.absmax[None], root.diag[None], root.codebook, n, root.bits,
                                     root.block_size)[0]
    return dense.to(dtype)


def _fused(g: torch.Tensor, left, right, dtype: torch.dtype) -> torch.Tensor:
    """``D(L) @ g @ D(R)`` with both roots decoded inside the Triton matmuls (the fused path)."""
    from lightning_shampoo4.kernels import triton_symmetric

    x = triton_symmetric.matmul(left.codes[None], left.absmax[None], left.diag[None], left.codebook, g[None],
                                left.order, left.bits, left.block_size, left=True, dtype=dtype, out_dtype=dtype)
    return triton_symmetric.matmul(right.codes[None], right.absmax[None], right.diag[None], right.codebook, x,
                                   right.order, right.bits, right.block_size, left=False, dtype=dtype)[0]


def bench_precondition(timer: Timer, device: torch.device, models: dict, max_order: int) -> list[dict]:
    """Per parameter: all its max_order blocks preconditioned, fused vs rebuild + cuBLAS."""
    rows = []
    for model, params in models.items():
        for name, m, n in params:
            g = torch.randn(m, n, device=device)
            tiles = []
            roots: dict[int, tuple] = {}
            for r0, r1 in split(m, max_order):
                for c0, c1 in split(n, max_order):
                    for order in (r1 - r0, c1 - c0):
                        if order not in roots:
                            roots[order] = _quantized_root(order, device)
                    tiles.append((g[r0:r1, c0:c1], roots[r1 - r0], roots[c1 - c0]))
            shapes = sorted({(t[0].shape[0], t[0].shape[1]) for t in tiles})

            for dtype in (torch.float32, torch.bfloat16):

                def fused():
                    return [_fused(gt, lq, rq, dtype) for gt, (lq, _), (rq, _) in tiles]

                def unfused():
                    outs = []
                    for gt, (lq, _), (rq, _) in tiles:
                        ld = _dequantize_root(lq, dtype)
                        rd = _dequantize_root(rq, dtype)
                        outs.append((ld @ gt.to(dtype) @ rd).float())
                    return outs

                def dense():
                    return [(ld.to(dtype) @ gt.to(dtype) @ rd.to(dtype)).float() for gt, (_, ld), (_, rd) in tiles]

                err = max(
                    ((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in zip(fused(), unfused())
                )
                t_fused, t_unfused, t_dense = timer(fused), timer(unfused), timer(dense)
                rows.append(
                    {
                        "model": model,
                        "param": name,
                        "shape": [m, n],
                        "tiles": [list(s) for s in shapes],
                        "n_tiles": len(tiles),
                        "dtype": str(dtype).replace("torch.", ""),
                        "fused_ms": t_fused,
                        "dequant_cublas_ms": t_unfused,
                        "dense_fp32_roots_cublas_ms": t_dense,
                        "speedup_vs_dequant_cublas": t_unfused / t_fused,
                        "fused_not_slower": t_fused <= t_unfused,
                        "rel_err_fused_vs_dequant_cublas": err,
                    }
                )
    return rows


def print_tables(copy: dict, bandwidth: list[dict], precondition: list[dict], device_name: str) -> None:
    print(f"device: {device_name}")
    print(f"copy: {copy['GB/s']:.1f} GB/s ({copy['ms'] * 1e3:.1f} us for {copy['bytes'] / 2**20:.0f} MiB moved)")
    print()
    print(f"{'op':<40} {'backend':<7} {'shape':>11} {'time us':>10} {'GB/s':>9} {'% copy':>7}")
    for r in bandwidth:
        shape = "x".join(map(str, r["shape"]))
        print(
            f"{r['op']:<40} {r['backend']:<7} {shape:>11} {r['ms'] * 1e3:>10.1f} {r['GB/s']:>9.1f} "
            f"{r['pct_of_copy']:>6.1f}%"
        )
    print()
    print(
        f"{'model':<10} {'param':<22} {'dtype':<9} {'tiles':>5} {'fused us':>9} {'deq+cuBLAS us':>14} "
        f"{'dense us':>9} {'speedup':>8} {'rel err':>8}"
    )
    for r in precondition:
        print(
            f"{r['model']:<10} {r['param']:<22} {r['dtype']:<9} {r['n_tiles']:>5} {r['fused_ms'] * 1e3:>9.1f} "
            f"{r['dequant_cublas_ms'] * 1e3:>14.1f} {r['dense_fp32_roots_cublas_ms'] * 1e3:>9.1f} "
            f"{r['speedup_vs_dequant_cublas']:>7.2f}x {r['rel_err_fused_vs_dequant_cublas']:>8.1e}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0], NAME)
    parser.add_argument("--warmup", type=int, default=10, help="calls before timing")
    parser.add_argument("--iters", type=int, default=50, help="timed calls per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="repeats; the median is reported")
    parser.add_argument("--size", type=int, default=8192, help="side of the bandwidth matrix (8192: 256 MiB fp32)")
    parser.add_argument("--max-order", type=int, default=1200, help="Shampoo max_order blocking")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("benchmarks/kernels.py needs a CUDA GPU (Triton kernels); none is available here, nothing was measured.")
        return 0
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported
    try:
        import triton
    except ImportError:
        print("benchmarks/kernels.py needs triton: pip install triton")
        return 0

    device = torch.device("cuda" if cuda else "cpu")
    run = setup_run(args, device)
    if args.quick:
        timer = Timer(device, warmup=1, iters=1, repeats=1)
        side, factor, models, max_order = 96, 70, QUICK_MODELS, 32
    else:
        timer = Timer(device, args.warmup, args.iters, args.repeats)
        side, factor, models, max_order = args.size, 1200, MODELS, args.max_order
    device_name = run["machine"]["device_name"] + ("" if cuda else " (Triton interpreter)")

    torch.manual_seed(0)
    copy, bandwidth = bench_bandwidth(timer, device, side, factor)
    precondition = bench_precondition(timer, device, models, max_order)
    print_tables(copy, bandwidth, precondition, device_name)

    dequant = [r for r in bandwidth if r["op"] == "dequantize 4-bit -> fp32" and r["backend"] == "triton"]
    targets = {
        "dequantize_4bit_fp32_pct_of_copy": dequant[0]["pct_of_copy"],
        "dequantize_at_least_60pct_of_copy": dequant[0]["pct_of_copy"] >= 60.0,
        "fused_not_slower_than_dequant_cublas": all(r["fused_not_slower"] for r in precondition),
        "fused_slower_cases": [
            f"{r['model']}/{r['param']}/{r['dtype']}" for r in precondition if not r["fused_not_slower"]
        ],
    }
    print()
    print(
        f"target dequantize >= 60% of copy: {targets['dequantize_4bit_fp32_pct_of_copy']:.1f}% "
        f"({'met' if targets['dequantize_at_least_60pct_of_copy'] else 'missed'})"
    )
    print(
        "target fused no slower than dequantize + cuBLAS: "
        + ("met" if targets["fused_not_slower_than_dequant_cublas"] else f"missed for {targets['fused_slower_cases']}")
    )
    if args.quick:
        print("--quick: a check of this script, the timings mean nothing; no result file written")
        return 0

    payload = {
        "device": device_name,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
        "settings": {
            "warmup": timer.warmup,
            "iters": timer.iters,
            "repeats": timer.repeats,
            "timing": "torch.cuda.Event around iters back-to-back calls, median of repeats",
            "bandwidth_side": side,
            "factor_order": factor,
            "max_order": max_order,
            "roots": "diag-real 4-bit linear2, block 64",
            "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        },
        "copy": copy,
        "bandwidth": bandwidth,
        "precondition": precondition,
        "targets": targets,
    }
    path = write_result(args.out, NAME, payload, run, argv)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
