"""Amortized training-step time of 32-bit, naive 4-bit, 4-bit and 8-bit Shampoo against the
first-order baseline (AdamW or SGDM) on one model in one run, split into the optimizer's phases.

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
  preconditioning by timing every ``lightning_shampoo4.kernels.precondition`` call (the root
  dequantization and both matmuls; the module function is wrapped for the run, with a CUDA
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
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    LABELS,
    SHAMPOO_VARIANTS,
    base_parser,
    setup_run,
    table,
    write_result,
)

from lightning_shampoo4 import (
    Shampoo4bit,
    kernels,
)
from lightning_shampoo4.models import create_model

NAME = "step_time"
VARIANTS = ("baseline", "shampoo32", "naive4", "shampoo4", "shampoo8")
SGDM_MODELS = ("resnet", "vgg", "small_cnn")


class PreconditionTimer:
    """Wraps ``kernels.precondition`` and books its wall time to the current optimizer."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.current: str | None = None
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._orig = None

    def __enter__(self) -> PreconditionTimer:
        self._orig = kernels.precondition
        orig, sync = self._orig, self._sync

        def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
            sync()
            t0 = time.perf_counter()
            out = orig(*args, **kwargs)
            sync()
            if self.current is not None:
                self.seconds[self.current] = self.seconds.get(self.current, 0.0) + time.perf_counter() - t0
                self.calls[self.current] = self.calls.get(self.current, 0) + 1
            return out

        kernels.precondition = timed
        return self

    def __exit__(self, *exc: object) -> None:
        kernels.precondition = self._orig

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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.split("\n\n")[0], NAME)
    parser.add_argument("--model", default="vit_tiny", help="a create_model name (CIFAR-100 head, 32x32)")
    parser.add_argument("--width", type=float, default=1.0, help="model width multiplier")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--stat-interval", type=int, default=10, help="T1 of the measured run")
    parser.add_argument("--root-interval", type=int, default=50, help="T2 of the measured run (multiple of T1)")
    parser.add_argument("--cycles", type=int, default=1, help="measured root intervals after the warm-up one")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--naive-root", choices=("eigen", "schur_newton"), default="schur_newton",
                        help="root method of naive 4-bit in the main comparison (schur_newton: its default)")
    parser.add_argument("--micro-orders", type=int, nargs="*", default=None,
                        help="orders for the per-factor PU / PIRU timing (default 256 768; 64 with --quick; none: skip)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.quick:
        defaults = dict(model="small_cnn", width=0.5, batch_size=4, stat_interval=2, root_interval=4)
        for key, value in defaults.items():
            if f"--{key.replace('_', '-')}" not in argv:
                setattr(args, key, value)
    if args.root_interval % args.stat_interval:
        parser.error("--root-interval must be a multiple of --stat-interval")
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
            "precondition_timing": "wall time of every lightning_shampoo4.kernels.precondition call (wrapped)",
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


if __name__ == "__main__":
    main()
