"""One command that checks and times the GPU path on a CUDA machine (under 8 minutes on one GPU).

    PYTHONPATH=. python benchmarks/gpu_check.py [--out DIR]

Needs only torch, triton and lightning (and this repository on ``PYTHONPATH``); no network.
Everything is written under ``DIR`` (default ``benchmarks/results/``): ``DIR/gpu_check.json``,
and a README-ready markdown table is printed (and saved as ``DIR/gpu_check.md``).

What it does on CUDA:

1. **kernels**: every Triton kernel against its torch reference on CUDA tensors, on awkward
   shapes (order 1 and 2, odd orders whose 4-bit code bytes straddle triangle rows, blocks longer
   than every row, a 1-D tensor, a large order, bf16 inputs and scales): the symmetric store and
   rebuild (bit for bit), the fused decode-in-matmul (fp32 and bf16 products), row-block
   quantize / dequantize of eigenvector matrices, the fused 4- and 8-bit moment updates.
2. **training**: a short run of a small MLP per storage (default 8-bit Cholesky factor, 4-bit
   Cholesky with error feedback, eigenvectors, naive, 32-bit) and SOAP4bit when it imports:
   loss before / after, finite parameters.
3. **step time**: ``optimizer.step()`` of 4-bit Shampoo (default storage) vs 32-bit Shampoo vs
   4-bit SOAP vs 32-bit SOAP vs AdamW vs Muon (``torch.optim.Muon`` when present, AdamW for the
   rest), timed with CUDA events: *steady* (median of steps with no statistics, root or
   eigenbasis update) and *amortized* (mean of all steps, Shampoo's statistics every 10 steps
   and roots every 50, SOAP's eigenbases every 10); peak memory from
   ``torch.cuda.max_memory_allocated`` and the optimizer state's bytes.
4. **preconditioning paths**: the Triton backend's ``workspace`` path (rebuild, then cuBLAS) vs
   the ``fused`` path (roots decoded inside the Triton matmul) on batched and lone blocks, fp32
   and bf16 products; which one the dispatcher should take by default is recorded.
5. **DDP** (2+ GPUs): two processes over nccl, the parameters identical on both ranks after a
   few Shampoo4bit steps, with their step time (the dry run runs the same worker over gloo).

Without CUDA it says so and does a dry run of its own logic (tiny sizes on the CPU, the Triton
kernels in Triton's interpreter when triton is installed; timings meaningless) and exits 0; the
dry run writes ``DIR/gpu_check_dry_run.json`` and never the real result file.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
BUDGET_S = 8 * 60


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- sizes


class Sizes:
    """Problem sizes of a real (CUDA) run or of the dry run."""

    def __init__(self, dry: bool):
        self.dry = dry
        self.orders = [1, 2, 7, 37] + ([] if dry else [301, 2049])  # each size compiles its own tiles: few
        self.matmul_orders = [(7, 5), (37, 64)] + ([] if dry else [(513, 300), (1200, 1200)])
        self.vector = 1001 if dry else (1 << 24) + 3
        self.moment_numel = [4097] if dry else [4097, 1 << 22]
        self.train_width, self.train_steps = (24, 6) if dry else (256, 60)
        self.train_intervals = (2, 4) if dry else (5, 10)  # statistics / root updates
        self.time_width, self.time_layers, self.time_steps, self.time_warmup = (32, 2, 6, 2) if dry else (1024, 8, 100, 10)
        self.path_cases = [(3, 24, 40)] if dry else [(8, 1024, 1024), (8, 384, 1536), (1, 1200, 1200), (1, 2048, 512)]
        self.timing_iters = 1 if dry else 20


# ----------------------------------------------------------------------------- timing


class Timer:
    """Milliseconds per call: CUDA events on a GPU, ``perf_counter`` in the dry run."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def once(self, fn: Callable[[], Any]) -> float:
        import torch

        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def median(self, fn: Callable[[], Any], iters: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        return statistics.median(self.once(fn) for _ in range(max(1, iters)))


# ----------------------------------------------------------------------------- 1. kernels


def _compare(got, want, exact: bool, tol: float = 0.0) -> dict:
    import torch

    got, want = got.double(), want.double()
    both_nan = torch.isnan(got) & torch.isnan(want)
    diff = torch.where(both_nan, torch.zeros_like(got), (got - want).abs())
    err = diff.max().item() if diff.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    rel = err / scale if scale > 0 else err
    ok = err == 0.0 if exact else rel <= tol
    return {"max_abs_err": err, "rel_err": rel, "exact": err == 0.0, "ok": bool(ok)}


def check_kernels(device, sizes: Sizes, backend: str) -> list[dict]:
    """Every Triton kernel against its torch reference; one row per case."""
    import torch

    from lightning_shampoo4 import kernels
    from lightning_shampoo4.kernels import QuantizedMatrix
    from lightning_shampoo4.quant import (dequantize, dequantize_symmetric, get_codebook, quantize,
                                          quantize_symmetric)
    from lightning_shampoo4.quant import moments as qm

    rows: list[dict] = []

    def record(kernel: str, case: str, fn: Callable[[], dict]) -> None:
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as err:  # noqa: BLE001 - a failing case is a result, not the end of the check
            res = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
        res.update(kernel=kernel, case=case, seconds=round(time.perf_counter() - t0, 3))
        rows.append(res)

    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    # symmetric store + rebuild: the default root (4-bit Linear-1.5, blocks of 40, bf16 scales), the
    # 8-bit Cholesky factor (one block per row), fp32 scales with tiny blocks
    formats = [("root 4b bs40 bf16", 4, 40, torch.bfloat16, "linear1.5"),
               ("factor 8b bs1200 bf16", 8, 1200, torch.bfloat16, "linear1.5"),
               ("4b bs3 fp32", 4, 3, torch.float32, "linear2")]
    for n in sizes.orders:
        for label, bits, bs, scale_dtype, cb_name in formats:
            if bs == 3 and n > 37:
                continue
            cb = get_codebook(cb_name, bits, device)
            for in_dtype in (torch.float32, torch.bfloat16) if n == 37 else (torch.float32,):
                a = randn(n, n, dtype=in_dtype)
                a = a + a.T

                def store(a=a, cb=cb, bits=bits, bs=bs, scale_dtype=scale_dtype):
                    want = quantize_symmetric(a, cb, bits, bs, scale_dtype=scale_dtype)
                    got = kernels.quantize_symmetric(a, cb, bits, bs, scale_dtype=scale_dtype, backend=backend)
                    same = (torch.equal(got.codes, want.codes) and torch.equal(got.diag, want.diag)
                            and got.absmax.dtype == want.absmax.dtype and torch.equal(got.absmax, want.absmax))
                    return {"exact": same, "ok": same, "codes_differing": int((got.codes != want.codes).sum())}

                def rebuild(a=a, cb=cb, bits=bits, bs=bs, scale_dtype=scale_dtype, n=n):
                    q = quantize_symmetric(a, cb, bits, bs, scale_dtype=scale_dtype)
                    root = QuantizedMatrix(q.codes, q.absmax, q.diag, n, cb, bits, bs, symmetric=True)
                    return _compare(kernels.materialize(root, backend=backend),
                                    dequantize_symmetric(q, cb, n, bits, bs), exact=True)

                case = f"n={n} {label} in {str(in_dtype)[6:]}"
                record("store symmetric", case, store)
                record("rebuild symmetric", case, rebuild)

    # fused decode-in-matmul, both sides, fp32 and bf16 products, batched
    for n, other in sizes.matmul_orders:
        cb = get_codebook("linear1.5", 4, device)
        qs = [quantize_symmetric((lambda x: x + x.T)(randn(n, n)), cb, 4, 40, scale_dtype=torch.bfloat16)
              for _ in range(2)]
        roots = [QuantizedMatrix(q.codes, q.absmax, q.diag, n, cb, 4, 40, symmetric=True) for q in qs]
        dense = torch.stack([dequantize_symmetric(q, cb, n, 4, 40) for q in qs])
        for dtype in (torch.float32, torch.bfloat16):
            for left in (True, False):
                def fused(roots=roots, dense=dense, dtype=dtype, left=left, n=n, other=other):
                    from lightning_shampoo4.kernels import ops

                    x = randn(2, n, other) if left else randn(2, other, n)
                    codes = torch.stack([r.codes for r in roots])
                    absmax = torch.stack([r.absmax for r in roots])
                    diag = torch.stack([r.diag for r in roots])
                    impl = "triton" if backend == "triton" else "torch"
                    got = ops.matmul_symmetric(codes, absmax, diag, cb, x, n, 4, 40, left, dtype, torch.float32, impl)
                    d, xx = dense.to(dtype).double(), x.to(dtype).double()
                    want = d @ xx if left else xx @ d
                    return _compare(got, want, exact=False, tol=1e-5 if dtype == torch.float32 else 2e-2)

                record("fused matmul", f"n={n} x{other} {'left' if left else 'right'} {str(dtype)[6:]}", fused)

    # row-block layout: eigenvector matrices (U^T, bf16 scales), 1-D tensors, order 1, diag-real
    cases = [((1, 1), 4, 64, False, True, torch.bfloat16), ((33, 33), 4, 64, False, True, torch.bfloat16),
             ((301, 301), 4, 64, False, True, torch.bfloat16), ((65, 65), 8, 256, True, False, torch.float32),
             ((sizes.vector,), 4, 64, False, False, torch.float32), ((7, 3, 5), 8, 4, False, False, torch.bfloat16)]
    for shape, bits, bs, offdiag, transpose, scale_dtype in cases:
        cb = get_codebook("linear2", bits, device)

        def rowblock(shape=shape, bits=bits, bs=bs, offdiag=offdiag, transpose=transpose, scale_dtype=scale_dtype,
                     cb=cb):
            x = randn(*shape)
            want = quantize(x, cb, bits, bs, offdiag=offdiag, transpose=transpose, scale_dtype=scale_dtype)
            got = kernels.quantize(x, cb, bits, bs, offdiag=offdiag, transpose=transpose, scale_dtype=scale_dtype,
                                   backend=backend)
            same_q = torch.equal(got.codes, want.codes) and torch.equal(got.absmax, want.absmax)
            out = kernels.dequantize(want, cb, shape, bits, bs, transpose=transpose, backend=backend)
            res = _compare(out, dequantize(want, cb, shape, bits, bs, transpose=transpose), exact=True)
            res["quantize_exact"] = same_q
            res["ok"] = res["ok"] and same_q
            return res

        record("quantize+dequantize rows", f"{'x'.join(map(str, shape))} {bits}b bs{bs}"
               f"{' diag' if offdiag else ''}{' T' if transpose else ''} {str(scale_dtype)[6:]}", rowblock)

    # fused moment updates (codes exact; parameters to a few ulps: a GPU may contract mul + add)
    for numel in sizes.moment_numel:
        for base, bits, pdtype in (("adamw", 4, torch.float32), ("adamw", 8, torch.bfloat16), ("sgd", 4, torch.float32)):
            def moment(numel=numel, base=base, bits=bits, pdtype=pdtype):
                p0 = randn(numel, dtype=pdtype)
                grad = randn(numel, dtype=pdtype)
                kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3) if base == "adamw" \
                    else dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01)
                update = qm.adamw_update if base == "adamw" else qm.sgd_update
                results = []
                for bk in (backend, "torch"):
                    p = p0.clone()
                    state = qm.init_moments(p, base, bits, momentum=kw.get("momentum"))
                    for _ in range(2):
                        update(p, grad, state, bits=bits, backend=bk, **kw)
                    results.append((p, state))
                (pg, sg), (pw, sw) = results
                res = _compare(pg.float(), pw.float(), exact=False, tol=1e-5)
                res["codes_differing"] = sum(int((sg[k] != sw[k]).sum()) for k in sg if k.endswith("_codes"))
                return res

            record("moment update", f"{base} {bits}b {numel} {str(pdtype)[6:]}", moment)
    return rows


# ----------------------------------------------------------------------------- 2. training


def _storages() -> dict[str, dict]:
    return {
        "default (8-bit Cholesky factor, 4-bit root)": {},
        "cholesky, 4-bit factor + error feedback": {"storage": "cholesky", "statistic_bits": 4},
        "eigenvectors (the paper)": {"storage": "eigenvectors"},
        "naive (quantized statistic)": {"storage": "naive"},
        "32-bit Shampoo": {"bits": 32},
    }


def _mlp(width: int, layers: int, device, out: int = 10):
    import torch

    mods: list = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*mods, torch.nn.Linear(width, out)).to(device)


def train_runs(device, sizes: Sizes) -> list[dict]:
    import torch

    from lightning_shampoo4 import Shampoo4bit

    # min_quant_numel=64: every matrix of the dry run's tiny model is stored quantized too
    t1, t2 = sizes.train_intervals
    makers: dict[str, Callable] = {name: (lambda ps, kw=kw: Shampoo4bit(ps, lr=1e-3, stat_interval=t1, root_interval=t2,
                                                                         min_quant_numel=64, **kw))
                                   for name, kw in _storages().items()}
    try:
        from lightning_shampoo4.optim.soap import SOAP4bit

        makers["SOAP4bit"] = lambda ps: SOAP4bit(ps, lr=1e-3)
    except Exception as err:  # noqa: BLE001 - not there yet, or broken: recorded
        makers["SOAP4bit"] = err
    rows = []
    w = sizes.train_width
    gen = torch.Generator(device="cpu").manual_seed(0)
    teacher = torch.randn(w, 10, generator=gen)
    data = [torch.randn(64, w, generator=gen) for _ in range(8)]
    batches = [(x.to(device), (x @ teacher).to(device)) for x in data]
    for name, make in makers.items():
        if isinstance(make, Exception):
            rows.append({"optimizer": name, "ok": False, "error": f"not importable: {make!r}"[:300]})
            continue
        torch.manual_seed(0)
        model = _mlp(w, 2, device)
        t0 = time.perf_counter()
        try:
            opt = make(model.parameters())
            losses = []
            for step in range(sizes.train_steps):
                x, y = batches[step % len(batches)]
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            rows.append({"optimizer": name, "first_loss": losses[0], "last_loss": losses[-1], "finite": finite,
                         "ok": finite and losses[-1] < losses[0], "seconds": round(time.perf_counter() - t0, 2)})
        except Exception as err:  # noqa: BLE001
            rows.append({"optimizer": name, "ok": False, "error": traceback.format_exc(limit=3)[-800:],
                         "seconds": round(time.perf_counter() - t0, 2)})
    return rows


# ----------------------------------------------------------------------------- 3. step time + memory


def _state_bytes(opt) -> int:
    import torch

    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def step_times(device, sizes: Sizes, timer: Timer) -> list[dict]:
    import torch

    from lightning_shampoo4 import Shampoo4bit
    from lightning_shampoo4.optim.soap import SOAP4bit

    t1, t2 = 10, 50

    def muon(params):
        muon_cls = getattr(torch.optim, "Muon", None)
        if muon_cls is None:
            return None
        matrices = [p for p in params if p.dim() == 2]
        rest = [p for p in params if p.dim() != 2]
        return [muon_cls(matrices, lr=0.02), torch.optim.AdamW(rest, lr=1e-3)]

    makers = {
        "Shampoo 4-bit (default)": lambda ps: [Shampoo4bit(ps, lr=1e-3, stat_interval=t1, root_interval=t2)],
        "Shampoo 32-bit": lambda ps: [Shampoo4bit(ps, lr=1e-3, bits=32, stat_interval=t1, root_interval=t2)],
        "SOAP 4-bit (default)": lambda ps: [SOAP4bit(ps, lr=1e-3, precondition_frequency=t1)],
        "SOAP 32-bit": lambda ps: [SOAP4bit(ps, lr=1e-3, bits=32, precondition_frequency=t1)],
        "AdamW": lambda ps: [torch.optim.AdamW(ps, lr=1e-3)],
        "Muon (+AdamW)": muon,
    }

    def updates_at(name: str, step: int) -> bool:
        """Whether ``step`` (1-based) updates a preconditioner: Shampoo's statistics every ``t1`` steps;
        SOAP's eigenbasis refresh every ``t1`` Adam steps (its first step only sets up the bases)."""
        if name.startswith("SOAP"):
            return step > 1 and (step - 1) % t1 == 0
        return "Shampoo" in name and step % t1 == 0
    rows = []
    w, layers = sizes.time_width, sizes.time_layers
    for name, make in makers.items():
        torch.manual_seed(0)
        model = _mlp(w, layers, device)
        x = torch.randn(256, w, device=device)
        params = list(model.parameters())
        if timer.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated() if timer.cuda else 0
        opts = make(params)
        if opts is None:
            rows.append({"optimizer": name, "skipped": "torch.optim.Muon is not in this torch"})
            continue
        times, updates = [], []
        for step in range(1, sizes.time_steps + sizes.time_warmup + 1):
            for o in opts:
                o.zero_grad(set_to_none=True)
            model(x).square().mean().backward()

            def run():
                for o in opts:
                    o.step()

            ms = timer.once(run)
            if step > sizes.time_warmup:
                times.append(ms)
                updates.append(updates_at(name, step))
        steady = [t for t, u in zip(times, updates) if not u] or times
        rows.append({
            "optimizer": name,
            "model": f"MLP {layers} x Linear({w}, {w}) + head, batch 256",
            "steady_ms": statistics.median(steady),
            "amortized_ms": sum(times) / len(times),
            "steps": len(times),
            "intervals": ({"stat": t1, "root": t2} if "Shampoo" in name
                          else {"refresh": t1} if name.startswith("SOAP") else None),
            # everything the run allocated beyond the model and its input: gradients, activations, state,
            # the optimizer's temporaries
            "peak_mib": (torch.cuda.max_memory_allocated() - base_mem) / 2**20 if timer.cuda else None,
            "state_mib": sum(_state_bytes(o) for o in opts) / 2**20,
        })
        del opts, model
    return rows


# ----------------------------------------------------------------------------- 4. workspace vs fused


def precondition_paths(device, sizes: Sizes, timer: Timer, backend: str) -> dict:
    import torch

    from lightning_shampoo4 import kernels
    from lightning_shampoo4.kernels import QuantizedMatrix
    from lightning_shampoo4.quant import get_codebook, quantize_symmetric

    cb = get_codebook("linear1.5", 4, device)

    def root(n):
        a = torch.randn(n, n, device=device)
        q = quantize_symmetric((a + a.T) / (2 * n) ** 0.5, cb, 4, 40, scale_dtype=torch.bfloat16)
        return QuantizedMatrix(q.codes, q.absmax, q.diag, n, cb, 4, 40, symmetric=True)

    rows = []
    old = os.environ.get(kernels.PATH_ENV_VAR)
    try:
        for k, m, n in sizes.path_cases:
            grads = [torch.randn(m, n, device=device) for _ in range(k)]
            lefts, rights = [root(m) for _ in range(k)], [root(n) for _ in range(k)]
            for dtype in (torch.float32, torch.bfloat16):
                res: dict[str, Any] = {"blocks": k, "shape": [m, n], "dtype": str(dtype)[6:]}
                outs = {}
                for path in kernels.PRECONDITION_PATHS:
                    os.environ[kernels.PATH_ENV_VAR] = path

                    def call():
                        if k == 1:
                            return kernels.precondition(grads[0], lefts[0], rights[0], dtype=dtype, backend=backend)[None]
                        return kernels.precondition_batch(grads, lefts, rights, dtype=dtype, backend=backend)

                    outs[path] = call()
                    res[f"{path}_ms"] = timer.median(call, sizes.timing_iters)
                a, b = outs["fused"].double(), outs["workspace"].double()
                res["rel_diff"] = ((a - b).norm() / b.norm()).item()
                res["faster"] = min(kernels.PRECONDITION_PATHS, key=lambda p: res[f"{p}_ms"])
                rows.append(res)
    finally:
        if old is None:
            os.environ.pop(kernels.PATH_ENV_VAR, None)
        else:
            os.environ[kernels.PATH_ENV_VAR] = old
    wins = {p: sum(r["faster"] == p for r in rows) for p in kernels.PRECONDITION_PATHS}
    total = {p: sum(r[f"{p}_ms"] for r in rows) for p in kernels.PRECONDITION_PATHS}
    choice = min(total, key=total.get)
    return {"rows": rows, "wins": wins, "total_ms": total, "recommended_default": choice,
            "current_default": old or "workspace"}


# ----------------------------------------------------------------------------- 5. DDP


def _ddp_worker(rank: int, world: int, port: int, out_file: str, steps: int, backend: str, width: int) -> None:
    import torch
    import torch.distributed as dist

    from lightning_shampoo4 import Shampoo4bit

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = backend == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    # a bounded wait: a rank that fails makes the other's next collective fail instead of hang
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=_dt.timedelta(minutes=2))
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(_mlp(width, 4, device), device_ids=[rank] if cuda else None)
        opt = Shampoo4bit(model.parameters(), lr=1e-3, stat_interval=2, root_interval=4, min_quant_numel=64)
        gen = torch.Generator().manual_seed(rank)  # each rank its own data
        timer = Timer(cuda)
        times = []
        for _ in range(steps):
            x = torch.randn(128, width, generator=gen).to(device)
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            times.append(timer.once(opt.step))
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            same = all(torch.equal(g, gathered[0]) for g in gathered)
            Path(out_file).write_text(json.dumps({"world": world, "backend": backend, "params_identical": same,
                                                  "median_step_ms": statistics.median(times),
                                                  "finite": bool(torch.isfinite(flat).all())}))
        dist.barrier()  # neither rank tears its connections down while the other still uses them
    finally:
        dist.destroy_process_group()


def ddp_check(out_dir: Path, cuda: bool) -> dict:
    """Two ranks of DDP: nccl on 2+ GPUs; the dry run runs the same worker over gloo on the CPU."""
    import socket

    import torch
    import torch.multiprocessing as mp

    if cuda and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU: DDP needs 2+"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_file = out_dir / "gpu_check_ddp.json"
    backend, steps, width = ("nccl", 20, 512) if cuda else ("gloo", 5, 24)
    teardown = None
    try:
        try:
            mp.spawn(_ddp_worker, args=(2, port, str(out_file), steps, backend, width), nprocs=2, join=True)
        except Exception as err:  # noqa: BLE001
            if not out_file.exists():
                raise
            # the ranks compared their parameters and wrote the result, then one failed on its way out
            # (a collective library's teardown): the result stands, the failure is recorded beside it
            teardown = f"{type(err).__name__}: {err}"[:300]
        res = json.loads(out_file.read_text())
    finally:
        out_file.unlink(missing_ok=True)  # the scratch file never stays in the output folder
    res["ok"] = bool(res["params_identical"] and res["finite"])
    if teardown:
        res["teardown_error"] = teardown
    return res


# ----------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    lines = [f"GPU check on {result['device']} (torch {result['torch']}, triton {result['triton']}), "
             f"{result['run']['date']}, {result['run']['seconds']:.0f} s" + (" - DRY RUN, timings meaningless"
                                                                         if result["dry_run"] else ""), ""]
    ks = result["kernels"]
    bad = [r for r in ks if not r.get("ok")]
    lines += [f"Kernels against the torch reference: {len(ks) - len(bad)} / {len(ks)} cases pass"
              + ("" if not bad else " (failing: " + "; ".join(f"{r['kernel']} {r['case']}" for r in bad[:8]) + ")"), ""]
    lines += ["| optimizer | steady step (ms) | amortized step (ms) | peak memory above the model (MiB) | state (MiB) |",
              "|---|---:|---:|---:|---:|"]
    for r in result["step_time"]:
        if "skipped" in r:
            lines.append(f"| {r['optimizer']} | - | - | - | - |")
            continue
        peak = f"{r['peak_mib']:.1f}" if r["peak_mib"] is not None else "-"
        lines.append(f"| {r['optimizer']} | {r['steady_ms']:.2f} | {r['amortized_ms']:.2f} | {peak} | "
                     f"{r['state_mib']:.1f} |")
    model = next((r["model"] for r in result["step_time"] if "model" in r), "")
    lines += ["", f"Model: {model}; Shampoo statistics every 10 steps, roots every 50; SOAP eigenbases every 10.",
              ""]
    lines += ["| blocks | shape | products | workspace (ms) | fused (ms) | faster |", "|---:|---|---|---:|---:|---|"]
    for r in result["precondition_paths"]["rows"]:
        lines.append(f"| {r['blocks']} | {r['shape'][0]} x {r['shape'][1]} | {r['dtype']} | {r['workspace_ms']:.3f} | "
                     f"{r['fused_ms']:.3f} | {r['faster']} |")
    lines += ["", f"Preconditioning path to take by default: {result['precondition_paths']['recommended_default']}.", ""]
    lines += ["| storage | first loss | last loss | ok |", "|---|---:|---:|---|"]
    for r in result["training"]:
        if "error" in r:
            lines.append(f"| {r['optimizer']} | - | - | error |")
        else:
            lines.append(f"| {r['optimizer']} | {r['first_loss']:.4f} | {r['last_loss']:.4f} | {r['ok']} |")
    ddp = result["ddp"]
    lines += ["", "DDP: " + (ddp.get("skipped") or ddp.get("error") or f"{ddp['world']} ranks over {ddp['backend']}, "
                             f"parameters identical: {ddp['params_identical']}, step {ddp['median_step_ms']:.2f} ms")]
    return "\n".join(lines)


def _section(result: dict, name: str, fn: Callable[[], Any]) -> None:
    t0 = time.perf_counter()
    print(f"[gpu_check] {name} ...", flush=True)
    try:
        result[name] = fn()
    except Exception:  # noqa: BLE001 - keep the other sections
        result[name] = {"error": traceback.format_exc(limit=5)[-2000:]}
        print(result[name]["error"], file=sys.stderr)
    result["section_seconds"][name] = round(time.perf_counter() - t0, 1)
    print(f"[gpu_check] {name}: {result['section_seconds'][name]} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for everything this writes")
    parser.add_argument("--dry-run", action="store_true", help="the CPU dry run even where CUDA is present")
    args = parser.parse_args(argv)
    cuda = _cuda_available() and not args.dry_run
    if not cuda:
        print("[gpu_check] no CUDA device: dry run of this script's logic on the CPU (tiny sizes; the Triton "
              "kernels in Triton's interpreter when triton is installed); its timings mean nothing", flush=True)
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined
    import torch

    from lightning_shampoo4 import kernels

    if not cuda:
        torch.set_num_threads(1)  # tiny sizes: threads only contend (a loaded machine made eigh 100x slower)
    started = time.perf_counter()
    device = torch.device("cuda" if cuda else "cpu")
    backend = "triton" if kernels.triton_available() and (cuda or kernels.triton_interpreted()) else "torch"
    sizes, timer = Sizes(dry=not cuda), Timer(cuda)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    result: dict[str, Any] = {
        "dry_run": not cuda,
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__, "triton": triton_version, "backend": backend,
        "python": platform.python_version(),
        "section_seconds": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    _section(result, "kernels", lambda: check_kernels(device, sizes, backend))
    _section(result, "training", lambda: train_runs(device, sizes))
    _section(result, "step_time", lambda: step_times(device, sizes, timer))
    _section(result, "precondition_paths", lambda: precondition_paths(device, sizes, timer, backend))
    _section(result, "ddp", lambda: ddp_check(args.out, cuda))
    seconds = time.perf_counter() - started
    result["run"] = {"argv": sys.argv if argv is None else ["gpu_check.py", *argv],
                     "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "seconds": seconds, "within_budget": seconds < BUDGET_S}
    failed = [name for name in ("kernels", "training", "step_time", "precondition_paths", "ddp")
              if isinstance(result[name], dict) and "error" in result[name]]
    result["failed_sections"] = failed
    name = "gpu_check" if cuda else "gpu_check_dry_run"
    try:
        table = markdown(result)
    except Exception:  # noqa: BLE001
        table = "(no table: a section failed)\n" + traceback.format_exc(limit=3)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / f"{name}.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\n[gpu_check] wrote {args.out / f'{name}.json'} in {seconds:.0f} s")
    if not cuda:
        print("[gpu_check] no CUDA: dry run done, exiting 0")
        return 0
    bad_kernels = [r for r in result["kernels"] if not r.get("ok")] if isinstance(result["kernels"], list) else [1]
    return 1 if failed or bad_kernels else 0


if __name__ == "__main__":
    sys.exit(main())
