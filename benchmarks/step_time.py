"""Step time of Shampoo4bit in two parts: the amortized training step of 32-bit, naive 4-bit,
4-bit and 8-bit Shampoo against the first-order baseline (``train``), and the optimizer step alone,
fed identical recorded gradients, against AdamW and Distributed Shampoo (``optstep``).

``--parts`` picks them (default both). ``train`` writes ``<out>/step_time.json``; ``optstep`` writes
``<out>/step_time_optstep.json``.

Part ``train``
==============

Method
------
* Every optimizer trains its own copy of the same model (identical initial weights) on the same
  random CIFAR-sized batches. The optimizers take turns step by step, so load changes on a
  shared machine hit all of them alike.
* Warm-up: ``root_interval`` steps (ends with the first inverse-root update; until then Shampoo
  is its base optimizer). Measured: the next ``--cycles`` x ``root_interval`` steps, which hold
  exactly ``root_interval / stat_interval`` statistics updates (PU) and one root update (PIRU)
  per cycle - the amortized steady state.
* Phases: forward + backward (``zero_grad`` + ``loss.backward()``) - the same work for every
  optimizer, so the totals use the median over all optimizers' measured forward + backward
  times (each optimizer's own figure is kept in the JSON); optimizer step. Inside the
  step: PU and PIRU from ``Shampoo4bit.counters["time_stats_s"]`` / ``["time_roots_s"]``;
  preconditioning by timing every ``lightning_shampoo4.kernels.precondition`` and
  ``precondition_batch`` call (the root rebuilds and the matmuls of lone and batched blocks;
  the module functions are wrapped for the run, with a CUDA
  synchronize on a GPU); "other" = the rest of the step (base AdamW / SGD update, grafting, the
  gradient reshape, bookkeeping).
* The measured intervals are scaled down (default T1 / T2 = 10 / 50) so that a run finishes on
  a CPU; the amortized time at the paper's T1 / T2 = 100 / 500 is computed from the measured
  per-step costs and the measured cost of one PU and one PIRU event:
  ``fwd_bwd + precondition + other + PU_event / 100 + PIRU_event / 500``.
* Everything runs with ``--threads`` torch threads; on a shared machine, prefer a quiet moment
  and compare ratios from one run only.
* Per-factor cost (``--micro-orders``): one PU and one PIRU of a single square factor of each
  order, for every variant; naive 4-bit with both root methods (its default coupled Schur-Newton
  root, which falls back to ``eigh`` when Newton diverges on an indefinite quantized factor, and
  ``eigh`` directly). ``--naive-root`` picks the one used in the main comparison (default: the
  optimizer's default, Schur-Newton).

Part ``optstep``: the optimizer step alone
==========================================

* Workloads (``--workloads``): ``vit_tiny`` (the ``create_model`` ViT-Tiny, CIFAR-100 head, batch
  32 of class-structured synthetic 32x32 images: a smooth random prototype per class plus noise);
  ``mlp`` (Linear layers 384-1152-384-1536-384-100 with GELU, batch 128, inputs with a decaying
  spectrum labelled by a fixed random linear teacher); ``transformer`` (the char-level pre-LN
  transformer of ``quality.py`` at d_model 256, 4 layers, 4 heads, context 128, batch 16 of
  windows of this Python's standard-library source).
* Gradients are recorded once per workload: ``--record-warmup`` real AdamW training steps, then
  ``--record-steps`` more whose per-step gradients are stored (forward + backward on a fresh
  batch each time, the model still training). Every contender starts from the weights of the first
  recorded step and, before each ``opt.step()``, gets the recorded gradient of that step copied
  into its own ``p.grad`` buffers (the recording is cycled); so every contender sees the same
  gradients and no contender can alter another's.
* Contenders (``--contenders``): ``Shampoo4bit`` with ``bits=32``, ``bits=4`` (the default
  method), ``bits=8`` (block 256) and ``quantize="preconditioner"`` (naive 4-bit, its default
  Schur-Newton root), ``quantize="cholesky"`` / ``"cholesky8"``; ``ours4_bf16`` / ``ours32_bf16``
  (not run by default): ``bits=4`` / ``32`` with ``precondition_dtype="bfloat16"``, the
  preconditioning matmuls in bf16 (fast only where the hardware has bf16 matrix units, e.g. AMX or
  tensor cores); ``torch.optim.AdamW(foreach=True)``; and ``DS32``, Meta's Distributed Shampoo
  in fp32, when ``distributed_shampoo`` is importable (``--ds-path DIR`` or the environment variable
  ``DISTRIBUTED_SHAMPOO_PATH`` names a checkout to put on ``sys.path``; otherwise it is skipped and
  the reason recorded). Shared settings: lr 1e-3, betas (0.9, 0.999), eps 1e-8, decoupled weight
  decay 0.05, statistics EMA 0.95, damping 1e-6, largest factor order 1200. DS32 is configured
  like ours as far as it allows: Adam grafting (``AdamPreconditionerConfig(beta2=0.999,
  epsilon=1e-8)``), ``betas=(0.9, 0.95)`` (its ``betas[1]`` is the factor EMA), ``epsilon=1e-6``
  (an absolute damping added before the eigendecomposition; ours is relative to the largest
  eigenvalue), ``max_preconditioner_dim=1200``, ``precondition_frequency`` = our root interval,
  the default eigendecomposition root (``EigenConfig``), 1-D tensors not preconditioned
  (``inverse_exponent_override={1: 0.0}``; ours give rank <= 1 tensors the plain base update),
  decoupled weight decay, no distributed config. ``start_preconditioning_step`` equals the root
  interval: DS requires it to be at least ``precondition_frequency``, and it matches ours, which
  is its base optimizer until the first root update. DS updates its factor statistics on every
  step; that is how it works, so its steady step includes them and it has no separate
  statistics step.
* ``soap4`` / ``soap8`` / ``soap32`` (not run by default): ``SOAP4bit`` at its defaults (``bits=4``),
  with 8-bit eigenvector matrices (``bits=8``) and its fp32 reference (``bits=32``), betas (0.95, 0.95), ``precondition_frequency`` = ``--opt-stat-interval``:
  its eigenbasis refresh is booked as the statistics step (the first step, which only sets up
  the eigenbases, is in the warm-up), so ``amortized_10_50_ms`` is SOAP's amortized step at its
  default frequency 10; ``x_soap32`` compares with the fp32 reference.
* Schedule: contenders are interleaved step by step in one process (the order rotates each step);
  one warm-up root interval (ends with the first root update), then ``--opt-cycles`` measured
  root intervals at the scaled-down ``--opt-stat-interval`` / ``--opt-root-interval`` (default
  5 / 20), then one more root interval under the op / memory probe (not timed). Python's garbage
  collector is off while steps are timed.
* Timing: ``opt.step()`` alone, in thread CPU time (``time.thread_time``; with one torch thread
  all the step's work runs on that thread, and other processes' load does not count) and wall
  time. Each step is classified: *steady* (no statistics and no root update), *statistics step*
  (statistics updated, no root update) and *root step* (root update, which for ours coincides
  with a statistics update). For ``Shampoo4bit`` the kind comes from its ``counters``; for DS32
  from its schedule (roots every ``precondition_frequency`` steps; the probe's per-kind count of
  ``linalg.eigh`` calls, ``eigh_calls`` in the JSON, shows it). Per kind the median is reported.
* Amortized time at intervals T1 / T2 (reported at 100 / 500 and 10 / 50) is computed from the
  measured per-kind medians: ``steady + (stat - steady) / T1 + (root - stat) / T2``, i.e. the
  cost of a statistics event is the statistics step's excess over a steady step and the cost of a
  root event the root step's excess over a statistics step. For DS32 ``stat = steady`` (statistics
  every step), so it is ``steady + (root - steady) / T2``; for AdamW it is the steady step. Ratios
  are given against ``Shampoo4bit bits=32`` and against DS32.
* Kernel ops and host syncs (one root interval under a ``TorchDispatchMode``): every aten op
  dispatched inside ``opt.step()`` is counted once per call (a ``_foreach_*`` op over a list is one
  op; composite ops appear as the ops they decompose into; ops outside the ``aten`` namespace, such
  as ``record_function`` markers, are listed apart), per step kind, per parameter tensor (ops /
  number of parameter tensors). *Kernel ops* leave out the views (``view``, ``permute``,
  ``split``, ... only make new tensor metadata, no kernel runs); all aten ops are given too. On a CPU nothing really synchronizes, so the ops that would make a GPU wait for the
  host are counted instead: ``aten._local_scalar_dense``
  (``.item()``, ``bool()``, ``float()``, ``int()`` of a tensor), ``aten.is_nonzero``, ``aten.equal``,
  ``aten.nonzero``, ``aten.masked_select``, ``aten._unique``, ``aten._unique2``, ``aten.unique_dim``,
  ``aten.unique_consecutive``, ``aten.unique_dim_consecutive``, ``aten.bincount`` (data-dependent
  results or output sizes), plus calls of ``Tensor.tolist()`` and ``torch.cuda.synchronize()``
  (wrapped for the probe). Such a read counts as a sync only when the tensor read would be on the
  GPU in a GPU run: parameters, gradients, every pre-existing tensor that is not 0-dim and
  everything computed from one of them (or made by a factory op) are; pre-existing 0-dim tensors
  and what is computed from them alone are not - host-side step counters, which torch's AdamW and
  DS keep on the CPU whatever the device; their reads are reported as *host reads* (JSON only).
  Separately (*linalg syncs*): ``aten._linalg_eigh``, ``aten.linalg_eig``, ``aten._linalg_svd`` and
  ``aten._linalg_check_errors``, whose CUDA versions synchronize to check for errors.
* Step transient memory (same probe): the live bytes of storages first created inside
  ``opt.step()`` as outputs of dispatched ops, tracked with ``weakref.finalize`` on each storage
  (views and in-place results of pre-existing tensors - parameters, gradients, state - do not
  count). Reported: the peak over the step (max over the steps of a kind) and the bytes still
  alive at the step's end (state created or replaced by the step). Scratch memory a kernel
  allocates internally without dispatching (LAPACK workspaces, matmul packing) is not seen. The
  persistent state is given for reference (unique storages reachable from the optimizer's state,
  parameters and gradients excluded).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import statistics
import subprocess
import sys
import time
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    LABELS,
    SHAMPOO_VARIANTS,
    base_parser,
    mib,
    setup_run,
    table,
    write_result,
)

from lightning_shampoo4 import (
    Shampoo4bit,
    kernels,
)
from lightning_shampoo4.kernels import cpu
from lightning_shampoo4.models import create_model
from lightning_shampoo4.optim.soap import SOAP4bit

NAME = "step_time"
OPT_NAME = "step_time_optstep"
PARTS = ("train", "optstep")
VARIANTS = ("baseline", "shampoo32", "naive4", "shampoo4", "shampoo8")
SGDM_MODELS = ("resnet", "vgg", "small_cnn")


class PreconditionTimer:
    """Wraps ``kernels.precondition`` and ``kernels.precondition_batch`` (same-shape blocks run
    batched) and books their wall time to the current optimizer."""

    NAMES = ("precondition", "precondition_batch")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.current: str | None = None
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._orig: dict[str, Any] = {}

    def __enter__(self) -> PreconditionTimer:
        sync = self._sync

        def wrap(orig: Any) -> Any:
            def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
                sync()
                t0 = time.perf_counter()
                out = orig(*args, **kwargs)
                sync()
                if self.current is not None:
                    self.seconds[self.current] = self.seconds.get(self.current, 0.0) + time.perf_counter() - t0
                    self.calls[self.current] = self.calls.get(self.current, 0) + 1
                return out

            return timed

        for name in self.NAMES:
            self._orig[name] = getattr(kernels, name)
            setattr(kernels, name, wrap(self._orig[name]))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, orig in self._orig.items():
            setattr(kernels, name, orig)
        self._orig = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def make_optimizer(params, base: str, variant: str, t1: int, t2: int, naive_root: str):
    if base == "sgdm":
        hp: dict[str, Any] = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
        if variant == "baseline":
            return torch.optim.SGD(params, **hp)
        hp["base"] = "sgd"
    else:
        hp = dict(lr=1e-3, weight_decay=0.05)
        if variant == "baseline":
            return torch.optim.AdamW(params, **hp)
        hp["base"] = "adamw"
    kw = dict(SHAMPOO_VARIANTS[variant])
    if variant == "naive4":
        kw["root_method"] = naive_root
    return Shampoo4bit(params, stat_interval=t1, root_interval=t2, **hp, **kw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_chunk(rec: dict[str, Any], steps: int, batches: list, device: torch.device, timer: PreconditionTimer,
              measure: bool) -> None:
    model, opt, name = rec["model"], rec["opt"], rec["name"]
    timer.current = name if measure else None
    for _ in range(steps):
        x, y = batches[rec["step"] % len(batches)]
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        _sync(device)
        t1 = time.perf_counter()
        opt.step()
        _sync(device)
        t2 = time.perf_counter()
        rec["step"] += 1
        if measure:
            rec["fwd_bwd"].append(t1 - t0)
            rec["opt_times"].append(t2 - t1)
    timer.current = None


def micro_benchmark(orders: list[int], variants: list[str], naive_root: str, device: torch.device) -> list[dict[str, Any]]:
    """Seconds of one PU and one PIRU of a single order-n factor pair (square parameter n x n)."""
    rows = []
    cases = [(v, None) for v in variants if v != "baseline"]
    if "naive4" in variants:
        other = "schur_newton" if naive_root == "eigen" else "eigen"
        cases.append(("naive4", other))
    for n in orders:
        for variant, root in cases:
            g = torch.Generator().manual_seed(n)
            p = torch.nn.Parameter(torch.zeros(n, n, device=device))
            kw = dict(SHAMPOO_VARIANTS[variant])
            if variant == "naive4":
                kw["root_method"] = root or naive_root
            opt = Shampoo4bit([p], lr=1e-3, stat_interval=1, root_interval=4, **kw)
            w = torch.randn(n, n, generator=g) / n**0.5
            for _ in range(4):  # 4 PUs then the first PIRU at step 4: a factor with some history
                p.grad = (w @ torch.randn(n, 32, generator=g) @ torch.randn(32, n, generator=g)).to(device)
                opt.step()
            c = opt.counters
            rows.append({
                "order": n,
                "variant": variant,
                "root_method": kw.get("root_method") or ("schur_newton" if variant == "naive4" else "eigen"),
                "pu_s": c["time_stats_s"] / c["stat_updates"],
                "piru_s": c["time_roots_s"] / c["root_updates"],
                "retried_updates": c["retried_updates"],
                "failed_updates": c["failed_updates"],
            })
            print(f"[step_time] micro n={n} {variant}/{rows[-1]['root_method']}: PU {rows[-1]['pu_s']:.3f}s, "
                  f"PIRU {rows[-1]['piru_s']:.3f}s, retried {c['retried_updates']}", flush=True)
    return rows


def train_part(args: Any, argv: list[str]) -> dict[str, Any]:
    """The ``train`` part: amortized training-step time split into phases (``step_time.json``)."""
    device = torch.device(args.device)
    run = setup_run(args, device)
    micro_orders = args.micro_orders if args.micro_orders is not None else ([64] if args.quick else [256, 768])
    t1, t2 = args.stat_interval, args.root_interval
    base = "sgdm" if args.model.startswith(SGDM_MODELS) else "adamw"

    torch.manual_seed(0)
    model0 = create_model(args.model, num_classes=100, width=args.width).to(device)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(args.batch_size, 3, 32, 32, generator=g).to(device),
         torch.randint(0, 100, (args.batch_size,), generator=g).to(device))
        for _ in range(4)
    ]
    recs = []
    for variant in args.variants:
        model = copy.deepcopy(model0)
        opt = make_optimizer(list(model.parameters()), base, variant, t1, t2, args.naive_root)
        recs.append({"name": variant, "model": model, "opt": opt, "step": 0, "fwd_bwd": [], "opt_times": []})

    with PreconditionTimer(device) as timer:
        t_start = time.perf_counter()
        for _ in range(t2):  # warm-up: one root interval
            for rec in recs:
                run_chunk(rec, 1, batches, device, timer, measure=False)
        snap = {r["name"]: dict(r["opt"].counters) for r in recs if isinstance(r["opt"], Shampoo4bit)}
        for _ in range(args.cycles * t2):
            for rec in recs:
                run_chunk(rec, 1, batches, device, timer, measure=True)
        wall = time.perf_counter() - t_start

    measured_steps = args.cycles * t2
    fb = statistics.median([t for rec in recs for t in rec["fwd_bwd"]])  # same work for every optimizer
    results: dict[str, Any] = {}
    for rec in recs:
        name = rec["name"]
        n = len(rec["opt_times"])
        step = statistics.fmean(rec["opt_times"])
        r: dict[str, Any] = {
            "label": LABELS[base] if name == "baseline" else LABELS[name],
            "steps_measured": n,
            "fwd_bwd_ms": 1e3 * fb,
            "own_fwd_bwd_mean_ms": 1e3 * statistics.fmean(rec["fwd_bwd"]),
            "own_fwd_bwd_median_ms": 1e3 * statistics.median(rec["fwd_bwd"]),
            "opt_step_ms": 1e3 * step,
            "total_ms": 1e3 * (fb + step),
        }
        if isinstance(rec["opt"], Shampoo4bit):
            c0, c1 = snap[name], rec["opt"].counters
            stats_s = c1["time_stats_s"] - c0["time_stats_s"]
            roots_s = c1["time_roots_s"] - c0["time_roots_s"]
            pre_s = timer.seconds.get(name, 0.0)
            n_pu_events = measured_steps // t1
            n_piru_events = measured_steps // t2
            r.update({
                "precondition_ms": 1e3 * pre_s / n,
                "stats_ms": 1e3 * stats_s / n,
                "roots_ms": 1e3 * roots_s / n,
                "other_ms": 1e3 * (step - (pre_s + stats_s + roots_s) / n),
                "pu_event_s": stats_s / n_pu_events,
                "piru_event_s": roots_s / n_piru_events,
                "precondition_calls_per_step": timer.calls.get(name, 0) / n,
                "retried_updates": c1["retried_updates"],
                "failed_updates": c1["failed_updates"],
            })
            r["total_ms_at_100_500"] = (
                r["fwd_bwd_ms"] + r["precondition_ms"] + r["other_ms"]
                + 1e3 * (r["pu_event_s"] / 100 + r["piru_event_s"] / 500)
            )
        else:
            r.update({"precondition_ms": 0.0, "stats_ms": 0.0, "roots_ms": 0.0, "other_ms": r["opt_step_ms"],
                      "total_ms_at_100_500": r["total_ms"]})
        results[name] = r
    ref = results.get("baseline")
    for r in results.values():
        if ref:
            r["ratio_total"] = r["total_ms"] / ref["total_ms"]
            r["ratio_total_at_100_500"] = r["total_ms_at_100_500"] / ref["total_ms_at_100_500"]
            r["ratio_opt_step"] = r["opt_step_ms"] / ref["opt_step_ms"]

    micro = micro_benchmark(micro_orders, list(args.variants), args.naive_root, device) if micro_orders else []

    rows = []
    for name, r in results.items():
        rows.append([r["label"], r["fwd_bwd_ms"], r["precondition_ms"], r["stats_ms"], r["roots_ms"], r["other_ms"],
                     r["total_ms"], r.get("ratio_total"), r["total_ms_at_100_500"], r.get("ratio_total_at_100_500")])
    print(f"\n{args.model} (width {args.width}, batch {args.batch_size}, {base} base) on {run['machine']['device_name']}, "
          f"{torch.get_num_threads()} threads; amortized ms per step over {measured_steps} steps at T1/T2 = {t1}/{t2}")
    print(table(["optimizer", "fwd+bwd (pooled)", "precond", f"PU (/{t1})", f"PIRU (/{t2})", "other", "total", "x base",
                 "total @100/500", "x base @100/500"], rows, 1))
    if micro:
        print("\nOne statistics update (PU) and one inverse-root update (PIRU) of a single factor, seconds")
        print(table(["order", "variant", "root", "PU s", "PIRU s", "retried"],
                    [[m["order"], LABELS[m["variant"]], m["root_method"], m["pu_s"], m["piru_s"], m["retried_updates"]]
                     for m in micro], 3))
    payload = {
        "settings": {
            "model": args.model, "width": args.width, "batch_size": args.batch_size, "base": base,
            "params": sum(p.numel() for p in model0.parameters()),
            "stat_interval": t1, "root_interval": t2, "warmup_steps": t2, "measured_steps": measured_steps,
            "naive_root_method": args.naive_root, "device": str(device),
            "shampoo": {v: SHAMPOO_VARIANTS[v] for v in args.variants if v != "baseline"},
            "first_order": "torch.optim.SGD(lr=0.1, momentum=0.9, wd=5e-4)" if base == "sgdm"
            else "torch.optim.AdamW(lr=1e-3, wd=0.05)",
            "precondition_timing": ("wall time of every lightning_shampoo4.kernels.precondition and "
                                    "precondition_batch call (wrapped)"),
            "schedule": "optimizers take turns step by step",
            "fwd_bwd": "median over all optimizers' measured forward+backward times (identical work)",
            "threads": torch.get_num_threads(),
            "wall_s": round(wall, 1),
        },
        "results": results,
        "micro": micro,
    }
    path = write_result(args.out, NAME, payload, run, argv)
    print(f"\nwrote {path}")
    return payload


# == part "optstep": the optimizer step alone on recorded gradients ==========================
OPT_CONTENDERS = ("ours32", "ours4", "ours8", "naive4", "cholesky4", "cholesky8", "adamw", "ds32")
BF16_CONTENDERS = ("ours4_bf16", "ours32_bf16")  # on request: fast only with bf16 matrix units
SOAP_CONTENDERS = ("soap4", "soap8", "soap32")  # on request: SOAP4bit (4-, 8-bit) and its fp32 reference
OPT_LABELS = {
    "ours32": "Shampoo4bit bits=32",
    "ours4": "Shampoo4bit bits=4",
    "ours8": "Shampoo4bit bits=8",
    "naive4": "Shampoo4bit quantize=preconditioner",
    "cholesky4": "Shampoo4bit quantize=cholesky",
    "cholesky8": "Shampoo4bit quantize=cholesky8",
    "ours4_bf16": "Shampoo4bit bits=4, bf16 matmuls",
    "ours32_bf16": "Shampoo4bit bits=32, bf16 matmuls",
    "adamw": "AdamW (foreach)",
    "ds32": "DS32 (Distributed Shampoo fp32)",
    "soap4": "SOAP4bit bits=4",
    "soap8": "SOAP4bit bits=8",
    "soap32": "SOAP4bit bits=32",
}
SOAP_KW = {"soap4": dict(bits=4), "soap8": dict(bits=8), "soap32": dict(bits=32)}
OURS_VARIANT = {"ours32": "shampoo32", "ours4": "shampoo4", "ours8": "shampoo8", "naive4": "naive4",
                "cholesky4": "cholesky4", "cholesky8": "cholesky8", "ours4_bf16": "shampoo4",
                "ours32_bf16": "shampoo32"}
WORKLOADS = ("vit_tiny", "mlp", "transformer")
KINDS = ("steady", "stat", "root")
AMORTIZE_AT = ((100, 500), (10, 50))
DS_ENV = "DISTRIBUTED_SHAMPOO_PATH"
OPT_HP: dict[str, Any] = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
SHAMPOO_BETA = 0.95  # EMA of the Kronecker factors (Shampoo4bit's shampoo_beta, DS's betas[1])
DAMPING = 1e-6  # Shampoo4bit's matrix_eps (relative), DS's epsilon (absolute)
MAX_ORDER = 1200
# ops whose result (or output size) the host must read: a GPU would synchronize
SYNC_OPS = frozenset({
    "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique", "_unique2",
    "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount",
})
# linear algebra whose CUDA implementation synchronizes to check for errors
LINALG_SYNC_OPS = frozenset({"_linalg_eigh", "linalg_eig", "_linalg_svd", "_linalg_check_errors"})


class StepProbe(TorchDispatchMode):
    """Counts the aten ops dispatched while active (and the host-sync ones among them) and tracks
    the live bytes of storages first created while active.

    A storage is *new* when it is the output of an op and was never an input of one before (views
    and in-place results of pre-existing tensors share their storage); its bytes count as live
    until ``weakref.finalize`` on the storage reports it freed.

    Device residency (which tensors would live on the GPU in a GPU run): a pre-existing tensor is
    on the device unless it is 0-dim (host-side counters such as torch AdamW's and DS's ``step``
    tensors are 0-dim CPU tensors in a GPU run too); a new tensor is on the device when any tensor
    input is, or when it has no tensor input (a factory). A sync op reading only host tensors is
    booked as a *host read*, not a sync.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.view_ops = 0
        self.other_ops: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.host_reads: Counter[str] = Counter()
        self.linalg_syncs: Counter[str] = Counter()
        self.live = 0
        self.peak = 0
        self.retained = 0
        self._pre: set[int] = set()
        self._new: dict[int, int] = {}
        self._on_device: dict[int, bool] = {}
        self._finalizers: list[weakref.finalize] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "aten":
            self.ops[str(func)] += 1
            self.view_ops += bool(func.is_view)
        else:  # e.g. profiler.record_function markers: no kernel
            self.other_ops[str(func)] += 1
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device = [self._input(t) for t in inputs]
        base = func._schema.name.split("::")[-1]
        if base in SYNC_OPS:
            (self.syncs if any(device) else self.host_reads)[f"aten.{base}"] += 1
        elif base in LINALG_SYNC_OPS:
            self.linalg_syncs[f"aten.{base}"] += 1
        out = func(*args, **kwargs)
        on_device = any(device) or not inputs
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._output(t, on_device)
        return out

    def read(self, t: torch.Tensor, what: str) -> None:
        """Book a host read of ``t`` outside the dispatcher (``Tensor.tolist``)."""
        (self.syncs if self._input(t) else self.host_reads)[what] += 1

    @staticmethod
    def _storage(t: torch.Tensor):
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None

    def _input(self, t: torch.Tensor) -> bool:
        """Register ``t``'s storage (pre-existing when first seen as an input); is it on the device?"""
        st = self._storage(t)
        if st is None:
            return t.dim() > 0
        key = st._cdata
        if key not in self._new and key not in self._pre:
            self._pre.add(key)
            self._on_device[key] = t.dim() > 0
            self._finalizers.append(weakref.finalize(st, self._forget, key))
        return self._on_device.get(key, True)

    def _forget(self, key: int) -> None:
        self._pre.discard(key)
        self._on_device.pop(key, None)

    def _output(self, t: torch.Tensor, on_device: bool) -> None:
        st = self._storage(t)
        if st is None or st._cdata in self._new or st._cdata in self._pre:
            return
        n = st.nbytes()
        self._new[st._cdata] = n
        self._on_device[st._cdata] = on_device
        self.live += n
        self.peak = max(self.peak, self.live)
        self._finalizers.append(weakref.finalize(st, self._freed, st._cdata))

    def _freed(self, key: int) -> None:
        self._on_device.pop(key, None)
        n = self._new.pop(key, None)
        if n is not None:
            self.live -= n

    def close(self) -> None:
        """Record the bytes still alive and drop the finalizers."""
        self.retained = self.live
        for f in self._finalizers:
            f.detach()
        self._finalizers.clear()


CPU_ROWS_OP = "lightning_shampoo4.kernels.cpu.symmetric_rows"


def probed_step(opt: torch.optim.Optimizer) -> StepProbe:
    """``opt.step()`` under a :class:`StepProbe`, with ``Tensor.tolist`` and
    ``torch.cuda.synchronize`` wrapped to count their calls as syncs, and every call of the CPU
    root-rebuild kernel (invisible to the dispatcher) counted as one kernel op. The CPU
    quantizer kernel, which runs only at statistics and root updates (one call per stored
    matrix), is not counted: those steps' op counts leave it out."""
    probe = StepProbe()
    calls: Counter[str] = Counter()
    had_tolist = "tolist" in torch.Tensor.__dict__
    orig_tolist, orig_sync = torch.Tensor.tolist, torch.cuda.synchronize
    orig_rows = cpu.symmetric_rows

    def rows(*args, **kwargs):
        done = orig_rows(*args, **kwargs)
        probe.ops[CPU_ROWS_OP] += bool(done)
        return done

    def tolist(self, *args, **kwargs):
        probe.read(self, "Tensor.tolist")
        return orig_tolist(self, *args, **kwargs)

    def synchronize(*args, **kwargs):
        calls["torch.cuda.synchronize"] += 1
        return orig_sync(*args, **kwargs)

    torch.Tensor.tolist, torch.cuda.synchronize, cpu.symmetric_rows = tolist, synchronize, rows
    try:
        with probe:
            opt.step()
    finally:
        if had_tolist:
            torch.Tensor.tolist = orig_tolist
        else:
            del torch.Tensor.tolist
        torch.cuda.synchronize, cpu.symmetric_rows = orig_sync, orig_rows
        probe.close()
    probe.syncs.update(calls)
    return probe


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the unique storages reachable from the optimizer's attributes (``opt.state`` and
    any other per-group state it keeps) other than the parameters' and gradients' own; containers,
    dataclasses and objects of ``lightning_shampoo4`` / ``distributed_shampoo`` are followed."""
    exclude = set()
    for group in opt.param_groups:
        for p in group["params"]:
            for t in (p, p.grad):
                st = None if t is None else StepProbe._storage(t)
                if st is not None:
                    exclude.add(st._cdata)
    seen_objects: set[int] = set()
    storages: dict[int, int] = {}

    def walk(x: Any, depth: int) -> None:
        if depth > 16 or id(x) in seen_objects:
            return
        seen_objects.add(id(x))
        if isinstance(x, torch.Tensor):
            st = StepProbe._storage(x)
            if st is not None and st._cdata not in exclude:
                storages[st._cdata] = st.nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v, depth + 1)
        elif isinstance(x, (list, tuple, set, frozenset)):
            for v in x:
                walk(v, depth + 1)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name, None), depth + 1)
        elif type(x).__module__.split(".")[0] in ("lightning_shampoo4", "distributed_shampoo") and hasattr(x, "__dict__"):
            walk(vars(x), depth + 1)

    walk({k: v for k, v in vars(opt).items() if k not in ("param_groups", "defaults")}, 0)
    return sum(storages.values())


# -- workloads -----------------------------------------------------------------------------------
Batch = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def build_workload(name: str, quick: bool) -> tuple[nn.Module, Batch, dict[str, Any]]:
    """The model (seeded init), a batch sampler and a description of one workload."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(10)
    if name == "vit_tiny":
        classes, width, batch = (10, 0.25, 4) if quick else (100, 1.0, 32)
        depth = 2 if quick else 12
        model = create_model("vit_tiny", num_classes=classes, width=width, depth=depth)
        protos = F.interpolate(torch.randn(classes, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)

        def sample(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.randint(0, classes, (batch,), generator=gen)
            return protos[y] + 0.5 * torch.randn(batch, 3, 32, 32, generator=gen), y

        info = {"model": f"vit_tiny (width {width}, depth {depth}, {classes} classes, 32x32)", "batch": batch,
                "data": "per-class smooth random prototype (8x8 noise upsampled) + N(0, 0.25) noise"}
    elif name == "mlp":
        dims, batch = ((48, 144, 48, 192, 48, 10), 16) if quick else ((384, 1152, 384, 1536, 384, 100), 128)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        model = nn.Sequential(*layers)
        d, classes = dims[0], dims[-1]
        scale = (1.0 / (1.0 + torch.arange(d) / 16.0)).sqrt()[:, None]
        mix = scale * torch.randn(d, d, generator=g) / d**0.5  # input covariance with a decaying spectrum
        teacher = torch.randn(d, classes, generator=g)

        def sample(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randn(batch, d, generator=gen) @ mix
            return x, (x @ teacher).argmax(1)

        info = {"model": "MLP " + "-".join(map(str, dims)) + " (GELU)", "batch": batch,
                "data": "Gaussian inputs with a decaying spectrum, labels = argmax of a fixed random linear teacher"}
    elif name == "transformer":
        from quality import VOCAB, CharTransformer, stdlib_text  # the char-LM of the quality benchmark

        cfg = dict(context=16, d_model=32, n_layers=1, n_heads=2) if quick else dict(
            context=128, d_model=256, n_layers=4, n_heads=4)
        batch = 4 if quick else 16
        model = CharTransformer(vocab=VOCAB, **cfg)
        text, text_info = stdlib_text(20_000 if quick else 300_000)
        codes = torch.tensor([c if c < VOCAB else 0 for c in map(ord, text)], dtype=torch.long)
        ctx = cfg["context"]

        def sample(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            start = torch.randint(0, codes.numel() - ctx - 1, (batch,), generator=gen)
            win = codes[start[:, None] + torch.arange(ctx + 1)]
            return win[:, :-1], win[:, 1:]

        info = {"model": f"char transformer d_model {cfg['d_model']} x {cfg['n_layers']} layers, "
                         f"{cfg['n_heads']} heads, context {ctx}, vocab {VOCAB}", "batch": batch,
                "data": f"random windows of {text_info['chars']} characters of the stdlib source "
                        f"(sha256 {text_info['sha256'][:12]})"}
    else:
        raise ValueError(f"unknown workload {name!r}")
    return model, sample, info


def record_gradients(model: nn.Module, sample: Batch, warmup: int, steps: int) -> tuple[list, list, list[float]]:
    """Train with AdamW for ``warmup`` steps, then ``steps`` more storing every step's gradients.

    Returns the weights at the first recorded step, the per-step gradients and the losses.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=OPT_HP["lr"], weight_decay=OPT_HP["weight_decay"])
    gen = torch.Generator().manual_seed(11)
    init, grads, losses = None, [], []
    for i in range(warmup + steps):
        x, y = sample(gen)
        opt.zero_grad(set_to_none=True)
        loss = _ce(model(x), y)
        loss.backward()
        losses.append(loss.item())
        if i >= warmup:
            if init is None:
                init = [p.detach().clone() for p in params]
            grads.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params])
        opt.step()
    return init, grads, losses


# -- contenders ----------------------------------------------------------------------------------
def import_distributed_shampoo(path: str | None) -> tuple[Any, dict[str, Any]]:
    """``distributed_shampoo`` (from ``path`` put first on ``sys.path`` when given) and where it came from."""
    info: dict[str, Any] = {"path": path}
    if path:
        path = str(Path(path).expanduser().resolve())
        info["path"] = path
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        import distributed_shampoo as ds
    except Exception as err:  # ImportError, or an API / version problem inside the package
        info.update(available=False, reason=f"{type(err).__name__}: {err}")
        return None, info
    root = Path(ds.__file__).resolve().parent.parent
    info.update(available=True, module=str(Path(ds.__file__).resolve()))
    try:
        text = (root / "pyproject.toml").read_text(encoding="utf-8")
        info["version"] = next((ln.split("=", 1)[1].strip().strip('"') for ln in text.splitlines()
                                if ln.strip().startswith("version")), None)
    except OSError:
        pass
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        info["commit"] = out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return ds, info


def package_source(pkg: Path) -> dict[str, Any]:
    """Where the measured ``lightning_shampoo4`` came from: its folder, and the git commit and
    whether the package has uncommitted changes when it lives in a git checkout."""
    info: dict[str, Any] = {"path": str(pkg), "commit": None, "uncommitted_changes": None}
    try:
        head = subprocess.run(["git", "-C", str(pkg.parent), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            info["commit"] = head.stdout.strip()
            status = subprocess.run(["git", "--no-optional-locks", "-C", str(pkg.parent), "status", "--porcelain", "--", pkg.name],
                                    capture_output=True, text=True, timeout=30)
            info["uncommitted_changes"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def make_ds32(ds: Any, params: list[torch.Tensor], root_interval: int) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
    """Distributed Shampoo in fp32 set up like Shampoo4bit (see the module docstring)."""
    import inspect

    grafting_cls = getattr(ds, "AdamPreconditionerConfig", None) or getattr(ds, "AdamGraftingConfig")
    kw: dict[str, Any] = dict(
        lr=OPT_HP["lr"],
        betas=(OPT_HP["betas"][0], SHAMPOO_BETA),
        epsilon=DAMPING,
        weight_decay=OPT_HP["weight_decay"],
        max_preconditioner_dim=MAX_ORDER,
        precondition_frequency=root_interval,
        start_preconditioning_step=root_interval,
        use_bias_correction=True,
        grafting_config=grafting_cls(beta2=OPT_HP["betas"][1], epsilon=OPT_HP["eps"]),
    )
    accepted = inspect.signature(ds.DistributedShampoo.__init__).parameters
    if hasattr(ds, "WeightDecayType") and "weight_decay_type" in accepted:
        kw["weight_decay_type"] = ds.WeightDecayType.DECOUPLED
    elif "use_decoupled_weight_decay" in accepted:
        kw["use_decoupled_weight_decay"] = True
    root_cls = getattr(ds, "RootInvShampooPreconditionerConfig", None) or getattr(ds, "ShampooPreconditionerConfig", None)
    if root_cls is not None and "preconditioner_config" in accepted:
        kw["preconditioner_config"] = root_cls(inverse_exponent_override={1: 0.0})
    opt = ds.DistributedShampoo(params, **kw)
    return opt, {k: repr(v) if not isinstance(v, (int, float, tuple)) else v for k, v in kw.items()}


def make_contender(name: str, params: list[torch.Tensor], t1: int, t2: int, ds: Any) -> tuple[torch.optim.Optimizer, Any]:
    if name == "adamw":
        return torch.optim.AdamW(params, **OPT_HP, foreach=True), "torch.optim.AdamW(foreach=True)"
    if name == "ds32":
        return make_ds32(ds, params, t2)
    if name in SOAP_CONTENDERS:  # its eigenbasis refresh takes the place of the statistics step
        kw = dict(**OPT_HP, shampoo_beta=SHAMPOO_BETA, precondition_frequency=t1, **SOAP_KW[name])
        kw["betas"] = (0.95, 0.95)
        return SOAP4bit(params, **kw), kw
    kw = dict(**OPT_HP, base="adamw", shampoo_beta=SHAMPOO_BETA, matrix_eps=DAMPING, max_order=MAX_ORDER,
              stat_interval=t1, root_interval=t2, **SHAMPOO_VARIANTS[OURS_VARIANT[name]])
    if name in BF16_CONTENDERS:
        kw["precondition_dtype"] = "bfloat16"
    return Shampoo4bit(params, **kw), kw


def _kind_by_schedule(name: str, s: int, t1: int, t2: int) -> str:
    if name == "adamw":
        return "steady"
    if name in SOAP_CONTENDERS:  # step 1 sets up the eigenbases; then a refresh every t1 Adam steps
        return "stat" if s > 1 and (s - 1) % t1 == 0 else "steady"
    if s % t2 == 0:
        return "root"
    if name == "ds32":
        return "steady"  # statistics every step: no separate statistics step
    return "stat" if s % t1 == 0 else "steady"


def _kind_by_counters(before: dict[str, float], after: dict[str, float]) -> str:
    if after["root_updates"] > before["root_updates"]:
        return "root"
    return "stat" if after["stat_updates"] > before["stat_updates"] else "steady"


def run_steps(contenders: list[dict[str, Any]], grads: list, first: int, last: int, t1: int, t2: int,
              mode: str) -> None:
    """Steps ``first..last`` for every contender, interleaved (rotating order); ``mode`` is
    ``"warmup"``, ``"time"`` or ``"probe"``."""
    for s in range(first, last + 1):
        rec = grads[(s - 1) % len(grads)]
        k = s % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            for buf, g in zip(c["grad_bufs"], rec):
                buf.copy_(g)
            opt = c["opt"]
            counters = getattr(opt, "counters", None)
            before = dict(counters) if isinstance(counters, dict) and {"stat_updates", "root_updates"} <= set(
                counters) else None
            if mode == "probe":
                probe = probed_step(opt)
            else:
                w0, t0 = time.perf_counter(), time.thread_time()
                opt.step()
                t_1, w1 = time.thread_time(), time.perf_counter()
            kind = _kind_by_counters(before, opt.counters) if before is not None else _kind_by_schedule(
                c["name"], s, t1, t2)
            if kind != _kind_by_schedule(c["name"], s, t1, t2):
                c["schedule_mismatches"] += 1
            if mode == "time":
                c["thread"][kind].append(1e3 * (t_1 - t0))
                c["wall"][kind].append(1e3 * (w1 - w0))
            elif mode == "probe":
                c["probes"][kind].append(probe)


def _timing_summary(samples: dict[str, list[float]]) -> dict[str, Any]:
    med = {k: statistics.median(v) for k, v in samples.items() if v}
    steady = med["steady"]
    stat = med.get("stat", steady)
    root = med.get("root", stat)
    r: dict[str, Any] = {
        "steady_ms": steady, "stat_ms": stat, "root_ms": root,
        "stat_event_ms": stat - steady, "root_event_ms": root - stat,
        "samples": {k: len(v) for k, v in samples.items()},
        "mean_ms": {k: statistics.fmean(v) for k, v in samples.items() if v},
        "min_ms": {k: min(v) for k, v in samples.items() if v},
        "measured_mean_ms": statistics.fmean([x for v in samples.values() for x in v]),
    }
    for t1, t2 in AMORTIZE_AT:
        r[f"amortized_{t1}_{t2}_ms"] = steady + (stat - steady) / t1 + (root - stat) / t2
    return r


def _probe_summary(probes: dict[str, list[StepProbe]], n_tensors: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, ps in probes.items():
        if not ps:
            continue
        ops = statistics.fmean(sum(p.ops.values()) for p in ps)
        out[kind] = {
            "steps": len(ps),
            "ops": ops,
            "ops_per_tensor": ops / n_tensors,
            "view_ops": statistics.fmean(p.view_ops for p in ps),
            "non_view_ops_per_tensor": (ops - statistics.fmean(p.view_ops for p in ps)) / n_tensors,
            "non_aten_ops": dict(sum((p.other_ops for p in ps), Counter())),
            "syncs": statistics.fmean(sum(p.syncs.values()) for p in ps),
            "host_reads": statistics.fmean(sum(p.host_reads.values()) for p in ps),
            "host_read_ops": dict(sum((p.host_reads for p in ps), Counter())),
            "linalg_syncs": statistics.fmean(sum(p.linalg_syncs.values()) for p in ps),
            "sync_ops": dict(sum((p.syncs for p in ps), Counter())),
            "linalg_sync_ops": dict(sum((p.linalg_syncs for p in ps), Counter())),
            "eigh_calls": statistics.fmean(p.ops.get("aten._linalg_eigh.default", 0) for p in ps),
            "peak_transient_bytes": max(p.peak for p in ps),
            "retained_bytes": max(p.retained for p in ps),
            "op_histogram_first_step": dict(ps[0].ops.most_common()),
        }
    return out


def run_workload(name: str, args: Any, ds: Any) -> dict[str, Any]:
    t1, t2 = args.opt_stat_interval, args.opt_root_interval
    t_start = time.perf_counter()
    model, sample, info = build_workload(name, args.quick)
    init, grads, losses = record_gradients(model, sample, args.record_warmup, args.record_steps)
    del model
    n_tensors = len(init)
    info.update(params=sum(p.numel() for p in init), param_tensors=n_tensors,
                recorded_steps=len(grads), record_warmup=args.record_warmup,
                loss_first=losses[0], loss_recorded=losses[args.record_warmup:],
                record_s=round(time.perf_counter() - t_start, 1))
    contenders = []
    for cname in args.contenders:
        if cname == "ds32" and ds is None:
            continue
        params = [nn.Parameter(p.clone()) for p in init]
        grad_bufs = [torch.empty_like(p) for p in init]
        for p, buf in zip(params, grad_bufs):
            p.grad = buf
        opt, config = make_contender(cname, params, t1, t2, ds)
        contenders.append({"name": cname, "opt": opt, "params": params, "grad_bufs": grad_bufs, "config": config,
                           "thread": {k: [] for k in KINDS}, "wall": {k: [] for k in KINDS},
                           "probes": {k: [] for k in KINDS}, "schedule_mismatches": 0})
    print(f"[step_time] optstep {name}: {info['params']:,} params in {n_tensors} tensors, "
          f"{len(grads)} recorded gradients ({info['record_s']} s); contenders: "
          f"{', '.join(c['name'] for c in contenders)}", flush=True)

    run_steps(contenders, grads, 1, t2, t1, t2, "warmup")  # ends with the first root update
    gc.collect()
    gc.disable()
    try:
        for cycle in range(args.opt_cycles):
            first = t2 * (cycle + 1) + 1
            run_steps(contenders, grads, first, first + t2 - 1, t1, t2, "time")
            gc.collect()
    finally:
        gc.enable()
    first = t2 * (args.opt_cycles + 1) + 1
    run_steps(contenders, grads, first, first + t2 - 1, t1, t2, "probe")

    results: dict[str, Any] = {}
    for c in contenders:
        r: dict[str, Any] = {"label": OPT_LABELS[c["name"]], "config": c["config"],
                             "thread": _timing_summary(c["thread"]), "wall": _timing_summary(c["wall"]),
                             "probe": _probe_summary(c["probes"], n_tensors),
                             "state_bytes": state_bytes(c["opt"]),
                             "schedule_mismatches": c["schedule_mismatches"],
                             "stats_every_step": c["name"] == "ds32"}
        if isinstance(getattr(c["opt"], "counters", None), dict):
            r["counters"] = dict(c["opt"].counters)
        results[c["name"]] = r
    for ref in ("ours32", "ds32", "soap32"):
        if ref not in results:
            continue
        for r in results.values():
            for clock in ("thread", "wall"):
                a, b = r[clock], results[ref][clock]
                a[f"x_{ref}"] = {key: a[key] / b[key] for key in
                                 ["steady_ms"] + [f"amortized_{t1_}_{t2_}_ms" for t1_, t2_ in AMORTIZE_AT]}
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    return {"workload": info, "results": results}


def _fmt_ratio(r: dict[str, Any], ref: str, key: str) -> float | None:
    return r["thread"].get(f"x_{ref}", {}).get(key)


def print_workload(name: str, w: dict[str, Any], t1: int, t2: int, cycles: int, threads: int | None = None) -> None:
    info, res = w["workload"], w["results"]
    print(f"\n### {name}: {info['model']}, {info['params']:,} params in {info['param_tensors']} tensors, "
          f"batch {info['batch']}\n")
    print(f"opt.step() thread CPU ms ({threads or torch.get_num_threads()} torch thread(s)); medians over {cycles} measured "
          f"root intervals at T1/T2 = {t1}/{t2}; amortized at 100/500 and 10/50 from the per-kind medians\n")
    rows = []
    for r in res.values():
        th, wl = r["thread"], r["wall"]
        rows.append([r["label"], th["steady_ms"], None if r["stats_every_step"] else th["stat_ms"], th["root_ms"],
                     th["amortized_100_500_ms"], _fmt_ratio(r, "ours32", "amortized_100_500_ms"),
                     _fmt_ratio(r, "ds32", "amortized_100_500_ms"),
                     th["amortized_10_50_ms"], _fmt_ratio(r, "ours32", "amortized_10_50_ms"),
                     _fmt_ratio(r, "ds32", "amortized_10_50_ms"), wl["amortized_100_500_ms"]])
    print(table(["contender", "steady", "stat step", "root step", "@100/500", "x ours32", "x DS32",
                 "@10/50", "x ours32", "x DS32", "wall @100/500"], rows, 2))
    print("\nper opt.step(): kernel (non-view aten) ops per parameter tensor, all aten ops per tensor, host "
          "syncs (+ linalg error-check syncs), transient peak MiB; state MiB\n")
    rows = []
    n = info["param_tensors"]
    for r in res.values():
        p = r["probe"]
        row = [r["label"]]
        row += [p[k].get("non_view_ops_per_tensor", (p[k]["ops"] - p[k]["view_ops"]) / n) if k in p else None
                for k in KINDS]
        row.append(p["steady"]["ops_per_tensor"])
        row += [f"{p[k]['syncs']:g} (+{p[k]['linalg_syncs']:g})" if k in p else None for k in KINDS]
        row += [mib(p[k]["peak_transient_bytes"]) if k in p else None for k in KINDS]
        row.append(mib(r["state_bytes"]))
        rows.append(row)
    print(table(["contender", "kernel ops/tensor steady", "stat", "root", "all ops/tensor steady", "syncs steady",
                 "stat", "root", "peak MiB steady", "stat", "root", "state MiB"], rows, 2))


def print_summary(workloads: dict[str, Any], contenders: list[str]) -> None:
    names = [c for c in contenders if any(c in w["results"] for w in workloads.values())]
    print("\nSummary: amortized opt.step() thread CPU ms at T1/T2 = 100/500 (x ours32)\n")
    rows = []
    for c in names:
        row = [OPT_LABELS[c]]
        for w in workloads.values():
            r = w["results"].get(c)
            x = None if r is None else _fmt_ratio(r, "ours32", "amortized_100_500_ms")
            row.append(None if r is None else f"{r['thread']['amortized_100_500_ms']:.1f}"
                       + ("" if x is None else f" ({x:.2f}x)"))
        rows.append(row)
    print(table(["contender", *workloads], rows, 2))
    soap = [c for c in names if c in SOAP_CONTENDERS]
    if soap:
        print("\nSOAP: amortized opt.step() thread CPU ms at precondition_frequency 10 (x 32-bit SOAP)\n")
        rows = []
        for c in soap:
            row = [OPT_LABELS[c]]
            for w in workloads.values():
                r = w["results"].get(c)
                x = None if r is None else _fmt_ratio(r, "soap32", "amortized_10_50_ms")
                row.append(None if r is None else f"{r['thread']['amortized_10_50_ms']:.1f}"
                           + ("" if x is None else f" ({x:.2f}x)"))
            rows.append(row)
        print(table(["contender", *workloads], rows, 2))


def optstep_part(args: Any, argv: list[str]) -> dict[str, Any]:
    """The ``optstep`` part: ``opt.step()`` alone on recorded gradients (``step_time_optstep.json``)."""
    run = setup_run(args, "cpu")
    t1, t2 = args.opt_stat_interval, args.opt_root_interval
    ds, ds_info = (None, {"available": False, "reason": "not requested"})
    if "ds32" in args.contenders:
        ds, ds_info = import_distributed_shampoo(args.ds_path or os.environ.get(DS_ENV))
        if ds is None:
            print(f"[step_time] DS32 skipped: {ds_info['reason']}", flush=True)
    if torch.get_num_threads() > 1:
        print("[step_time] note: thread CPU time covers the calling thread only; use --threads 1 for it to be "
              "the whole step's CPU time", flush=True)
    t_start = time.perf_counter()
    workloads = {}
    for name in args.workloads:
        workloads[name] = run_workload(name, args, ds)
        print_workload(name, workloads[name], t1, t2, args.opt_cycles)
    print_summary(workloads, list(args.contenders))
    import lightning_shampoo4

    payload = {
        "settings": {
            "workloads": list(args.workloads), "contenders": list(args.contenders),
            "measured_stat_interval": t1, "measured_root_interval": t2, "cycles": args.opt_cycles,
            "warmup_steps": t2, "probe_steps": t2, "record_warmup": args.record_warmup,
            "record_steps": args.record_steps, "amortized_at": [list(x) for x in AMORTIZE_AT],
            "hyperparameters": {**OPT_HP, "shampoo_beta": SHAMPOO_BETA, "damping": DAMPING, "max_order": MAX_ORDER},
            "distributed_shampoo": ds_info,
            "lightning_shampoo4": package_source(Path(lightning_shampoo4.__file__).resolve().parent),
            "threads": torch.get_num_threads(),
            "timing": "time.thread_time and time.perf_counter around opt.step() alone; per-kind medians; gc off",
            "amortized": "steady + (stat - steady) / T1 + (root - stat) / T2 from per-kind medians "
                         "(DS32: stat = steady, statistics every step; AdamW: steady)",
            "sync_ops": sorted(f"aten.{o}" for o in SYNC_OPS) + ["Tensor.tolist", "torch.cuda.synchronize"],
            "linalg_sync_ops": sorted(f"aten.{o}" for o in LINALG_SYNC_OPS),
            "memory": "live bytes of storages created inside opt.step() (TorchDispatchMode outputs, "
                      "weakref.finalize on storages); kernel-internal scratch not seen",
            "wall_s": round(time.perf_counter() - t_start, 1),
        },
        "workloads": workloads,
    }
    path = write_result(args.out, OPT_NAME, payload, run, argv, script=NAME)
    print(f"\nwrote {path}")
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.split("\n\n")[0], NAME)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                        help="train: the training-step phases; optstep: opt.step() alone on recorded gradients")
    train = parser.add_argument_group("part train")
    train.add_argument("--model", default="vit_tiny", help="a create_model name (CIFAR-100 head, 32x32)")
    train.add_argument("--width", type=float, default=1.0, help="model width multiplier")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--stat-interval", type=int, default=10, help="T1 of the measured run")
    train.add_argument("--root-interval", type=int, default=50, help="T2 of the measured run (multiple of T1)")
    train.add_argument("--cycles", type=int, default=1, help="measured root intervals after the warm-up one")
    train.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    train.add_argument("--naive-root", choices=("eigen", "schur_newton"), default="schur_newton",
                       help="root method of naive 4-bit in the main comparison (schur_newton: its default)")
    train.add_argument("--micro-orders", type=int, nargs="*", default=None,
                       help="orders for the per-factor PU / PIRU timing (default 256 768; 64 with --quick; none: skip)")
    train.add_argument("--device", default="cpu", help="cpu or cuda")
    opt = parser.add_argument_group("part optstep")
    opt.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    opt.add_argument("--contenders", nargs="+", default=list(OPT_CONTENDERS),
                     choices=OPT_CONTENDERS + BF16_CONTENDERS + SOAP_CONTENDERS)
    opt.add_argument("--opt-stat-interval", type=int, default=5, help="T1 of the measured optimizer steps")
    opt.add_argument("--opt-root-interval", type=int, default=20, help="T2 of the measured optimizer steps (multiple of T1)")
    opt.add_argument("--opt-cycles", type=int, default=4, help="measured root intervals after the warm-up one")
    opt.add_argument("--record-warmup", type=int, default=20, help="AdamW training steps before recording")
    opt.add_argument("--record-steps", type=int, default=8, help="recorded gradients (cycled)")
    opt.add_argument("--ds-path", default=None,
                     help=f"checkout of facebookresearch/optimizers to put on sys.path (default: ${DS_ENV})")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.quick:
        defaults = dict(model="small_cnn", width=0.5, batch_size=4, stat_interval=2, root_interval=4, threads=1,
                        opt_stat_interval=2, opt_root_interval=4, opt_cycles=1, record_warmup=1, record_steps=2)
        for key, value in defaults.items():
            if f"--{key.replace('_', '-')}" not in argv:
                setattr(args, key, value)
    if args.root_interval % args.stat_interval:
        parser.error("--root-interval must be a multiple of --stat-interval")
    if args.opt_stat_interval < 2 or args.opt_root_interval % args.opt_stat_interval or (
            args.opt_root_interval < 2 * args.opt_stat_interval):
        parser.error("--opt-root-interval must be a multiple (>= 2x) of --opt-stat-interval, which must be >= 2 "
                     "(so that steady and statistics-only steps are measured)")
    out: dict[str, Any] = {}
    if "train" in args.parts:
        out["train"] = train_part(args, argv)
    if "optstep" in args.parts:
        out["optstep"] = optstep_part(args, argv)
    return out


if __name__ == "__main__":
    main()
