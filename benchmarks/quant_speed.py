"""Speed and working memory of the torch quantizer, and storage designs for the second-order state.

Part 1, speed and temporaries (CPU, ``--threads`` default 1). The current
``lightning_shampoo4.quant`` quantize / dequantize against a frozen copy of the original
implementation (zero-padded fp32 copy, int64 bucketize, int64 codebook gather and
repeat_interleave'd scales), on n x n fp32 matrices: 4-bit Linear-2 block 64 diag-real (factor
and root), 4-bit transposed (eigenvectors) and 8-bit block 256. Time: best and median of
``--repeats`` calls in CPU time of the calling thread (wall times are in the JSON too; on a
shared machine a 10 ms preemption can land in any call longer than a few ms). Temporaries: the
peak bytes of tensors created during one call and alive at once, minus the bytes of what it
returns, counted by a TorchDispatchMode that follows every storage until it is freed; divided
by n^2 as bytes per element.

Part 2, design data (float64 references). For A = U diag(lam) U^T with U a random orthogonal
matrix (QR of a seeded Gaussian) and lam log-uniform over [1e-4, 1] ("loguniform") or the
stand-in of ``quant_error.py`` (1 and 1e-3, half each, "spec"), plus the char-LM factors of ``quant_error.py`` when
``results/lm_preconditioner.npz`` exists ("lm-L", "lm-R": root of the factor damped by 1e-6 of
its largest eigenvalue), the root R = A^-1/4 is stored in several ways and
NRE = ||R~ - R||_F / ||R||_F reported with the bytes per n^2:

* root designs: today's full matrix diag-real; the symmetric layout (fp32 diagonal, strict upper
  triangle, blocks inside triangle rows) with fp32 / bf16 / fp16 scales and block 64 / 128; and
  the triangle with blocks running across the flattened triangle (the layout not chosen).
* eigenvector designs: U^T 4-bit at block 64 / 128 with fp32 / fp16 / bf16 scales; NRE of
  V diag(lam^-1/4) V^T with V the dequantized U after 0 and 1 Björck steps V <- 1.5 V - 0.5 V V^T V.
* combined per-factor designs (eigen mode: U, fp32 eigenvalues and the root): the root rebuilt
  from V (1 Björck step) and stored with the root design, NRE against the exact root, and the
  total bytes per n^2 against the 0.8 n^2 target (32-bit Shampoo keeps 8 n^2 per factor).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, base_parser, setup_run, table, write_result

from lightning_shampoo4.quant import (
    Quantized,
    dequantize,
    dequantize_symmetric,
    get_codebook,
    quantize,
    quantize_symmetric,
)

NAME = "quant_speed"
PRECOND_FILE = "lm_preconditioner.npz"
EPS = 1e-6
TARGET = 0.8  # bytes per n^2 per factor: 10x below 32-bit Shampoo's 8 n^2


# -- the original implementation, frozen -------------------------------------------------------
def _old_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    return (1, 1) if len(shape) == 0 else (math.prod(shape[:-1]), shape[-1])


def old_quantize(x, codebook, bits=4, block_size=64, *, offdiag=False, transpose=False) -> Quantized:
    """The quantizer as it was before the chunked rewrite (same outputs, bit for bit)."""
    x = x.detach().float()
    if transpose:
        x = x.t()
    diag = None
    if offdiag:
        diag = x.diagonal().clone()
        x = x.clone()
        x.diagonal().zero_()
    rows, cols = _old_rows(tuple(x.shape))
    nblocks = -(-cols // block_size)
    padded = torch.zeros(rows, nblocks * block_size, dtype=torch.float32)
    padded[:, :cols] = x.reshape(rows, cols)
    blocks = padded.view(rows, nblocks, block_size)
    absmax = blocks.abs().amax(dim=-1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalized = blocks / safe.unsqueeze(-1)
    mids = (codebook[:-1] + codebook[1:]) / 2
    idx = torch.bucketize(normalized, mids, right=False).to(torch.uint8)
    idx = idx.view(rows, nblocks * block_size)[:, :cols].reshape(-1)
    if bits == 4:
        if idx.numel() % 2:
            idx = torch.cat([idx, idx.new_zeros(1)])
        pairs = idx.view(-1, 2)
        codes = pairs[:, 0] | (pairs[:, 1] << 4)
    else:
        codes = idx.contiguous()
    return Quantized(codes, absmax, diag)


def old_dequantize(q, codebook, shape, bits=4, block_size=64, *, transpose=False, dtype=torch.float32):
    """The dequantizer as it was before the rewrite."""
    codes, absmax, diag = q
    shape = tuple(shape)
    stored = (shape[1], shape[0]) if transpose else shape
    rows, cols = _old_rows(stored)
    numel = rows * cols
    if bits == 4:
        idx = torch.stack([codes & 0x0F, codes >> 4], dim=1).reshape(-1)[:numel]
    else:
        idx = codes[:numel]
    values = codebook[idx.long()].view(rows, cols)
    scale = absmax.reshape(rows, -1).repeat_interleave(block_size, dim=-1)[:, :cols]
    out = (values * scale).view(stored)
    if diag is not None:
        out.diagonal().copy_(diag)
    if transpose:
        out = out.t()
    return out.to(dtype).contiguous()


# -- measurement helpers -----------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created inside the block and alive at the same time."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.seen and key not in inputs:  # views and out= are not new
                    self.seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out


def temp_bytes(fn: Callable[[], Any]) -> int:
    """Peak temporary bytes of one call of fn: peak live bytes minus what it returns and created."""
    fn()  # warm caches
    with LiveBytes() as track:
        result = fn()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)}
    return track.peak - sum(nb for key, nb in storages.items() if key in track.seen)


def timings(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Best and median milliseconds over ``repeats`` calls (after one warm-up call): the calling
    thread's CPU time, which a busy shared machine disturbs far less than wall time, and wall time."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.thread_time()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {
        "best_ms": min(cpu) * 1e3,
        "median_ms": statistics.median(cpu) * 1e3,
        "wall_best_ms": min(wall) * 1e3,
        "wall_median_ms": statistics.median(wall) * 1e3,
    }


def speed_cases(n: int) -> dict[str, dict[str, Any]]:
    """The operations timed at order n: (old, new) callables over the same inputs."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, n, generator=g)
    cb4, cb8 = get_codebook("linear2", 4), get_codebook("linear2", 8)
    q_diag = quantize(x, cb4, 4, 64, offdiag=True)
    q_t = quantize(x, cb4, 4, 64, transpose=True)
    q8 = quantize(x, cb8, 8, 256)
    work = torch.empty(n, n)
    return {
        "quantize 4-bit diag-real": dict(
            old=lambda: old_quantize(x, cb4, 4, 64, offdiag=True), new=lambda: quantize(x, cb4, 4, 64, offdiag=True)
        ),
        "quantize 4-bit transposed": dict(
            old=lambda: old_quantize(x, cb4, 4, 64, transpose=True), new=lambda: quantize(x, cb4, 4, 64, transpose=True)
        ),
        "quantize 8-bit block 256": dict(old=lambda: old_quantize(x, cb8, 8, 256), new=lambda: quantize(x, cb8, 8, 256)),
        "dequantize 4-bit diag-real": dict(
            old=lambda: old_dequantize(q_diag, cb4, (n, n), 4, 64), new=lambda: dequantize(q_diag, cb4, (n, n), 4, 64)
        ),
        "dequantize 4-bit diag-real, out=": dict(
            old=lambda: old_dequantize(q_diag, cb4, (n, n), 4, 64),
            new=lambda: dequantize(q_diag, cb4, (n, n), 4, 64, out=work),
        ),
        "dequantize 4-bit transposed": dict(
            old=lambda: old_dequantize(q_t, cb4, (n, n), 4, 64, transpose=True),
            new=lambda: dequantize(q_t, cb4, (n, n), 4, 64, transpose=True),
        ),
        "dequantize 8-bit block 256": dict(
            old=lambda: old_dequantize(q8, cb8, (n, n), 8, 256), new=lambda: dequantize(q8, cb8, (n, n), 8, 256)
        ),
    }


def check_identical(n: int) -> bool:
    """The new functions give the old bits on the benchmark's inputs (a guard, not the test)."""
    g = torch.Generator().manual_seed(n + 1)
    x = torch.randn(n, n, generator=g)
    cb = get_codebook()
    for kw in (dict(offdiag=True), dict(transpose=True)):
        a, b = old_quantize(x, cb, 4, 64, **kw), quantize(x, cb, 4, 64, **kw)
        if not (torch.equal(a.codes, b.codes) and torch.equal(a.absmax, b.absmax)):
            return False
        t = kw.get("transpose", False)
        if not torch.equal(old_dequantize(a, cb, (n, n), 4, 64, transpose=t), dequantize(a, cb, (n, n), 4, 64, transpose=t)):
            return False
    return True


def run_speed(orders: list[int], repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in orders:
        rec: dict[str, Any] = {"identical": check_identical(n), "ops": {}}
        for op, fns in speed_cases(n).items():
            r: dict[str, Any] = {}
            for impl in ("old", "new"):
                r[impl] = timings(fns[impl], repeats)
                r[impl]["temp_bytes"] = temp_bytes(fns[impl])
                r[impl]["temp_bytes_per_element"] = r[impl]["temp_bytes"] / (n * n)
            r["speedup_best"] = r["old"]["best_ms"] / r["new"]["best_ms"]
            r["speedup_median"] = r["old"]["median_ms"] / r["new"]["median_ms"]
            rec["ops"][op] = r
            print(
                f"[quant_speed] n={n} {op}: old {r['old']['best_ms']:.2f} ms, new {r['new']['best_ms']:.2f} ms "
                f"({r['speedup_best']:.1f}x); temporaries {r['old']['temp_bytes_per_element']:.2f} -> "
                f"{r['new']['temp_bytes_per_element']:.2f} B/element",
                flush=True,
            )
        out[str(n)] = rec
    return out


# -- part 2: storage designs -------------------------------------------------------------------
def nbytes(q: Quantized) -> int:
    return sum(t.numel() * t.element_size() for t in q if t is not None)


def nre(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def bjorck(v: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        v = 1.5 * v - 0.5 * v @ (v.mT @ v)
    return v


def design_matrices(orders: list[int], with_lm: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (U, lam) in float64."""
    mats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for n in orders:
        g = torch.Generator().manual_seed(n)
        u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        mats[f"loguniform n={n}"] = (u, 10.0 ** (-4.0 * torch.rand(n, generator=g, dtype=torch.float64)))
        spec = torch.cat([torch.ones(n // 2, dtype=torch.float64), torch.full((n - n // 2,), 1e-3, dtype=torch.float64)])
        mats[f"spec n={n}"] = (u, spec)
    path = RESULTS_DIR / PRECOND_FILE
    if with_lm and path.exists():
        import numpy as np

        with np.load(path) as z:
            for side in ("L", "R"):
                a = torch.from_numpy(z[f"{side}_factor"]).double()
                lam, u = torch.linalg.eigh((a + a.mT) / 2)
                lam = lam.clamp(min=0) + EPS * lam.max()
                mats[f"lm-{side} n={a.shape[0]}"] = (u, lam)
    return mats


def root_designs(cb: torch.Tensor) -> dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, int]]]:
    """name -> (fp32 root -> (dequantized float64 root, bytes))."""

    def full(bs: int) -> Callable:
        def f(r: torch.Tensor) -> tuple[torch.Tensor, int]:
            q = quantize(r, cb, 4, bs, offdiag=True)
            return dequantize(q, cb, r.shape, 4, bs).double(), nbytes(q)

        return f

    def tri(bs: int, sd: torch.dtype) -> Callable:
        def f(r: torch.Tensor) -> tuple[torch.Tensor, int]:
            q = quantize_symmetric(r, cb, 4, bs, scale_dtype=sd)
            return dequantize_symmetric(q, cb, r.shape[0], 4, bs).double(), nbytes(q)

        return f

    def tri_flat(bs: int) -> Callable:
        def f(r: torch.Tensor) -> tuple[torch.Tensor, int]:
            n = r.shape[0]
            iu = torch.triu_indices(n, n, 1)
            q = quantize(r[iu[0], iu[1]], cb, 4, bs)
            y = torch.diag(r.diagonal()).double()
            vals = dequantize(q, cb, (iu.shape[1],), 4, bs).double()
            y[iu[0], iu[1]] = vals
            y[iu[1], iu[0]] = vals
            return y, nbytes(q) + 4 * n

        return f

    return {
        "(a) full, diag-real, block 64, fp32 scales": full(64),
        "(b) triangle, block 64, fp32 scales": tri(64, torch.float32),
        "(c) triangle, block 64, bf16 scales": tri(64, torch.bfloat16),
        "(c) triangle, block 64, fp16 scales": tri(64, torch.float16),
        "(d) triangle, block 128, fp32 scales": tri(128, torch.float32),
        "(d) triangle, block 128, fp16 scales": tri(128, torch.float16),
        "triangle, blocks across rows, block 64, fp32": tri_flat(64),
    }


U_DESIGNS = [(64, torch.float32), (64, torch.float16), (64, torch.bfloat16), (128, torch.float32), (128, torch.float16)]
SCALE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# per-factor combinations (root design, U block, U scales) for the totals table
COMBOS = [
    ("(a) full, diag-real, block 64, fp32 scales", 64, torch.float32),
    ("(b) triangle, block 64, fp32 scales", 64, torch.float32),
    ("(b) triangle, block 64, fp32 scales", 128, torch.float32),
    ("(b) triangle, block 64, fp32 scales", 64, torch.float16),
    ("(c) triangle, block 64, bf16 scales", 64, torch.bfloat16),
    ("(c) triangle, block 64, fp16 scales", 64, torch.float16),
    ("(c) triangle, block 64, fp16 scales", 128, torch.float16),
    ("(d) triangle, block 128, fp32 scales", 64, torch.float16),
    ("(d) triangle, block 128, fp16 scales", 64, torch.float16),
    ("(d) triangle, block 128, fp32 scales", 128, torch.float32),
    ("(d) triangle, block 128, fp16 scales", 128, torch.float16),
]


def u_name(bs: int, sd: torch.dtype) -> str:
    return f"U^T block {bs}, {SCALE_NAMES[sd]} scales"


def run_design(orders: list[int], with_lm: bool) -> dict[str, Any]:
    cb = get_codebook("linear2", 4)
    designs = root_designs(cb)
    out: dict[str, Any] = {}
    for name, (u, lam) in design_matrices(orders, with_lm).items():
        t0 = time.perf_counter()
        n = u.shape[0]
        s = lam**-0.25
        root = (u * s) @ u.mT
        rec: dict[str, Any] = {"order": n, "root": {}, "eigvecs": {}, "combined": {}}
        for dname, f in designs.items():
            y, b = f(root.float())
            rec["root"][dname] = {"nre": nre(y, root), "bytes_per_n2": b / n**2}
        rebuilt: dict[str, torch.Tensor] = {}
        for bs, sd in U_DESIGNS:
            q = quantize(u.float(), cb, 4, bs, transpose=True, scale_dtype=sd)
            v = dequantize(q, cb, u.shape, 4, bs, transpose=True).double()
            r = {"bytes_per_n2": nbytes(q) / n**2}
            for steps in (0, 1):
                vb = bjorck(v, steps)
                approx = (vb * s) @ vb.mT
                r[f"nre_bjorck{steps}"] = nre(approx, root)
                if steps == 1:
                    rebuilt[u_name(bs, sd)] = approx
            rec["eigvecs"][u_name(bs, sd)] = r
        for dname, bs, sd in COMBOS:
            uname = u_name(bs, sd)
            y, b = designs[dname](rebuilt[uname].float())
            total = rec["root"][dname]["bytes_per_n2"] + rec["eigvecs"][uname]["bytes_per_n2"] + 4 * n / n**2
            rec["combined"][f"{dname} + {uname}"] = {"nre": nre(y, root), "bytes_per_n2": total}
        out[name] = rec
        print(f"[quant_speed] design data for {name} in {time.perf_counter() - t0:.1f}s", flush=True)
    return out


# -- tables --------------------------------------------------------------------------------------
def speed_table(speed: dict[str, Any]) -> str:
    rows = []
    for n, rec in speed.items():
        for op, r in rec["ops"].items():
            rows.append([
                int(n), op, r["old"]["best_ms"], r["new"]["best_ms"], r["speedup_best"], r["speedup_median"],
                r["old"]["temp_bytes_per_element"], r["new"]["temp_bytes_per_element"], r["new"]["temp_bytes"] / 2**10,
            ])
    return table(
        ["n", "operation", "old CPU ms", "new CPU ms", "speedup (best)", "speedup (median)", "old temp B/elem",
         "new temp B/elem", "new temp KiB"],
        rows, digits=2,
    )


def design_tables(design: dict[str, Any]) -> str:
    """Root, eigenvector and per-factor tables: bytes per n^2 per order, NRE per matrix."""
    names = list(design)
    by_order: dict[int, str] = {}
    for m in names:
        by_order.setdefault(design[m]["order"], m)  # bytes depend only on the order
    by_order = dict(sorted(by_order.items()))
    parts = []
    for key, label in (("root", "root A^-1/4 storage"), ("combined", "per factor (root + U + eigenvalues)")):
        rows = []
        for d in design[names[0]][key]:
            rows.append([d] + [design[m][key][d]["bytes_per_n2"] for m in by_order.values()]
                        + [design[m][key][d]["nre"] for m in names])
        headers = [label] + [f"B/n^2 n={o}" for o in by_order] + [f"NRE {m}" for m in names]
        parts.append(table(headers, rows, digits=4))
    rows = []
    for d in design[names[0]]["eigvecs"]:
        row = [d] + [design[m]["eigvecs"][d]["bytes_per_n2"] for m in by_order.values()]
        for m in names:
            row += [design[m]["eigvecs"][d]["nre_bjorck0"], design[m]["eigvecs"][d]["nre_bjorck1"]]
        rows.append(row)
    headers = ["eigenvectors (NRE of the root)"] + [f"B/n^2 n={o}" for o in by_order]
    for m in names:
        headers += [f"{m}, 0 Björck", f"{m}, 1 Björck"]
    parts.append(table(headers, rows, digits=4))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.split("\n\n")[0], NAME)
    parser.set_defaults(threads=1)
    parser.add_argument("--orders", type=int, nargs="+", default=None, help="speed orders (default 256 512 1200)")
    parser.add_argument("--design-orders", type=int, nargs="+", default=None, help="design orders (default 256 1200)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per operation (default 15)")
    parser.add_argument("--skip-design", action="store_true", help="only part 1")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    run = setup_run(args)
    orders = args.orders or ([64, 96] if args.quick else [256, 512, 1200])
    design_orders = args.design_orders or ([64] if args.quick else [256, 1200])
    repeats = args.repeats or (2 if args.quick else 15)

    speed = run_speed(orders, repeats)
    print("\n" + speed_table(speed) + "\n", flush=True)
    payload: dict[str, Any] = {
        "settings": {"orders": orders, "repeats": repeats, "codebook": "linear2", "threads": torch.get_num_threads()},
        "speed": speed,
    }
    if not args.skip_design:
        design = run_design(design_orders, with_lm=not args.quick)
        print("\n" + design_tables(design) + "\n", flush=True)
        payload["design"] = design
        payload["settings"]["design_orders"] = design_orders
        payload["settings"]["target_bytes_per_n2"] = TARGET
    path = write_result(args.out, NAME, payload, run, argv)
    print(f"[quant_speed] wrote {path}")
    return payload


if __name__ == "__main__":
    main()
