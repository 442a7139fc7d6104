"""Cost of rebuilding a stored 4-bit root next to the matmul it feeds.

Every steady step of a quantized ``Shampoo4bit`` rebuilds each stored inverse root (fp32
diagonal + 4-bit strict upper triangle) as a dense fp32 matrix before multiplying the gradient
block by it; a 32-bit root is used as it is. This script times, per element of an n x n root:

* ``rebuild``: ``quant.dequantize_symmetric`` into a reused output, the torch rebuild; split
  into ``decode`` (the triangle's codes looked up and scaled: ``_symmetric_source``) and
  ``gather`` (every element of the matrix gathered from it through the cached int32 index);
* ``kernel`` (CPU): the C kernel of ``kernels.cpu`` into the same output, as the steady
  step does on a CPU where it could be built; checked equal to the torch rebuild bit for bit;
* ``store`` / ``kernel_store`` (CPU): storing the root (a root update), torch quantizer against
  the C kernel, checked equal bit for bit;
* ``matmul``: ``G @ R`` with ``G`` of ``--rows`` rows (fp32), the product the rebuild feeds.

for the default storage's root layout (Linear-1.5, blocks of 40) and the eigenvector storage's
(Linear-2, blocks of 256), bf16 scales. CPU: best of ``--repeats`` calls in thread CPU time;
CUDA (``--device cuda``): CUDA events. The ratios rebuild / matmul and kernel / matmul are the
share of a steady step's preconditioning spent outside the matmul.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, setup_run, table, write_result

from lightning_shampoo4.kernels import QuantizedMatrix, cpu
from lightning_shampoo4.optim.validation import STORAGE_DEFAULTS, STORAGE_FALLBACK
from lightning_shampoo4.quant import dequantize_symmetric, get_codebook, quantize_symmetric
from lightning_shampoo4.quant.blockwise import _symmetric_source, _triangle_index

NAME = "rebuild"
LAYOUTS = {
    "default": (STORAGE_DEFAULTS["cholesky8"]["codebook"], STORAGE_DEFAULTS["cholesky8"]["root_block_size"]),
    "eigenvectors": (STORAGE_FALLBACK["codebook"], STORAGE_FALLBACK["root_block_size"]),
}


def _timer(device: torch.device, repeats: int) -> Callable[[Callable[[], Any]], float]:
    """Best time of ``repeats`` calls in ms (after one warm-up call)."""
    def best(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.thread_time()
                fn()
                times.append((time.thread_time() - t0) * 1e3)
        return min(times)
    return best


def measure(n: int, rows: int, layout: str, device: torch.device, repeats: int) -> dict[str, float]:
    """Times of one rebuild and one matmul of an n x n root in ``layout``, per element too."""
    codebook, block = LAYOUTS[layout]
    cb = get_codebook(codebook, 4, device)
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    w, v = torch.linalg.eigh(a @ a.T / n + 1e-3 * torch.eye(n, dtype=torch.float64))
    root_dense = ((v * w.pow(-0.25)) @ v.T).float().to(device)  # the inverse 4th root of a random SPD matrix
    q = quantize_symmetric(root_dense, cb, 4, block, scale_dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device)
    g = torch.randn(rows, n, generator=gen).to(device)
    full_at, _, _ = _triangle_index(n, block, out.device)
    src = _symmetric_source(q.codes, q.absmax, q.diag, cb, n, 4, block, out.view(-1)).clone()
    best = _timer(device, repeats)
    rec = {
        "rebuild_ms": best(lambda: dequantize_symmetric(q, cb, n, 4, block, out=out)),
        "decode_ms": best(lambda: _symmetric_source(q.codes, q.absmax, q.diag, cb, n, 4, block, out.view(-1))),
        "gather_ms": best(lambda: torch.index_select(src, 0, full_at, out=out.view(-1))),
        "matmul_ms": best(lambda: g @ out),
    }
    # the split is the rebuild: decode then gather gives the dequantized root, bit for bit
    rebuilt = torch.index_select(src, 0, full_at).view(n, n)
    if not torch.equal(rebuilt, dequantize_symmetric(q, cb, n, 4, block)):
        raise AssertionError(f"decode + gather differs from dequantize_symmetric at n={n} ({layout})")
    root = QuantizedMatrix(q.codes, q.absmax, q.diag, n, cb, 4, block, symmetric=True)
    if device.type == "cpu" and cpu.available():
        rec["kernel_ms"] = best(lambda: cpu.symmetric_rows(root, 0, n, out))
        if not torch.equal(out, rebuilt):
            raise AssertionError(f"the CPU kernel differs from dequantize_symmetric at n={n} ({layout})")
        # storing the root (at a root update): the torch quantizer against the kernel, bit for bit
        rec["store_ms"] = best(lambda: quantize_symmetric(root_dense, cb, 4, block, scale_dtype=torch.bfloat16))
        rec["kernel_store_ms"] = best(lambda: cpu.quantize_symmetric(root_dense, cb, 4, block, torch.bfloat16))
        stored = cpu.quantize_symmetric(root_dense, cb, 4, block, torch.bfloat16)
        if stored is None or not all(torch.equal(x, y) for x, y in zip(stored, q)):
            raise AssertionError(f"the CPU kernel stores differently from quantize_symmetric at n={n} ({layout})")
    for key in ("rebuild", "kernel", "matmul"):
        if f"{key}_ms" in rec:
            rec[f"{key}_ns_per_element"] = rec[f"{key}_ms"] * 1e6 / (n * n)
    rec["rebuild_over_matmul"] = rec["rebuild_ms"] / rec["matmul_ms"]
    if "kernel_ms" in rec:
        rec["kernel_over_matmul"] = rec["kernel_ms"] / rec["matmul_ms"]
    return rec


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.split("\n\n")[0], NAME)
    parser.set_defaults(threads=1)
    parser.add_argument("--orders", type=int, nargs="+", default=None, help="root orders (default 192 384 768 1152)")
    parser.add_argument("--rows", type=int, default=256, help="rows of the gradient block multiplied by the root")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 20; 3 with --quick)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    run = setup_run(args, device=str(device))
    orders = args.orders or ([64, 96] if args.quick else [192, 384, 768, 1152])
    repeats = args.repeats or (3 if args.quick else 20)
    results: dict[str, dict[str, dict[str, float]]] = {}
    rows = []
    for layout in LAYOUTS:
        results[layout] = {}
        for n in orders:
            rec = results[layout][str(n)] = measure(n, args.rows, layout, device, repeats)
            rows.append([layout, n, rec["rebuild_ms"], rec["decode_ms"], rec["gather_ms"], rec.get("kernel_ms"),
                         rec["matmul_ms"], rec["rebuild_ns_per_element"], rec.get("kernel_ns_per_element"),
                         rec["matmul_ns_per_element"], rec["rebuild_over_matmul"], rec.get("kernel_over_matmul"),
                         rec.get("store_ms"), rec.get("kernel_store_ms")])
            print(f"[rebuild] {layout} n={n}: rebuild {rec['rebuild_ms']:.3f} ms, matmul {rec['matmul_ms']:.3f} ms",
                  flush=True)
    print()
    print(table(["layout", "n", "rebuild ms", "decode ms", "gather ms", "kernel ms", f"matmul ms ({args.rows} rows)",
                 "rebuild ns/el", "kernel ns/el", "matmul ns/el", "rebuild / matmul", "kernel / matmul",
                 "store ms", "kernel store ms"], rows))
    payload = {
        "settings": {"orders": orders, "rows": args.rows, "repeats": repeats, "device": str(device),
                     "threads": args.threads, "layouts": {k: {"codebook": c, "root_block_size": b}
                                                          for k, (c, b) in LAYOUTS.items()},
                     "timing": "best of repeats; CPU: thread CPU time; CUDA: CUDA events",
                     "cpu_kernel": device.type == "cpu" and cpu.available()},
        "results": results,
    }
    path = write_result(args.out, NAME, payload, run, argv)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
