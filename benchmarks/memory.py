"""Optimizer-state memory of 4-bit Shampoo against 32-bit, 8-bit and naive 4-bit Shampoo and the
first-order baseline, on the paper's CIFAR-100 models (ResNet34, VGG19-BN, ViT-Small, Swin-Tiny).

Two measurements per (model, optimizer):

1. **State bytes, exact.** Every optimizer takes one step on zero gradients (so lazily created
   buffers such as SGD's momentum exist; no preconditioner update happens) and its state is
   counted tensor by tensor: ``Shampoo4bit.memory_report()`` for Shampoo, the sum of the torch
   optimizer's state tensors for SGDM / AdamW. These numbers do not depend on the machine.
2. **Peak memory of a training step, measured.** A fresh subprocess per (model, optimizer)
   builds the model and runs two training steps (forward + backward on a random CIFAR-sized
   batch, ``zero_grad(set_to_none=True)``, optimizer step) with preconditioning active (every
   Shampoo block multiplies its gradient by both stored roots, the per-step work). The first step
   creates the lazily allocated buffers; the second one is measured: its forward + backward, its
   step and then, with the gradients still alive, one statistics update (PU) and one
   inverse-root update (PIRU) of the model's largest factor - factors are updated one at a time,
   so the largest one bounds the transient of those updates. Reported: the peak RSS of the
   second step (VmHWM, reset before it) minus the RSS before the model was built (after a tiny
   warm-up that loads the libraries), and the exact static bytes (parameters + gradients +
   optimizer state). The RSS also counts activations, which scale with ``--batch-size`` (the
   paper used 128 on a GPU; the default here is smaller to keep the run practical on 2 CPU
   cores), and allocator slack; glibc's mmap threshold is fixed so freed blocks leave the RSS.
   Without a resettable VmHWM (Linux < 4.0) the lifetime peak is used.

Shampoo settings are the paper's: block 64 (8-bit: 256, as in the paper's 8-bit ablation),
Linear-2, max order 1200, min_quant_numel 4096; base SGDM (lr 0.1, momentum 0.9, wd 5e-4) for
ResNet / VGG and AdamW (lr 1e-3, wd 0.05) for ViT / Swin.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

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

from lightning_shampoo4 import Shampoo4bit
from lightning_shampoo4.models import create_model
from lightning_shampoo4.optim.blocking import blocks_for

NAME = "memory"
MODELS = {"resnet34": "sgdm", "vgg19_bn": "sgdm", "vit_small": "adamw", "swin_tiny": "adamw"}
VARIANTS = ("baseline", "shampoo32", "shampoo8", "naive4", "shampoo4")
# Paper Table 2: total peak GPU MB at batch 128 (first-order, + 32-bit Shampoo, + 4-bit Shampoo).
PAPER_PEAK_MB = {
    "resnet34": (822, 1442, 908),
    "vit_small": (2720, 3252, 2792),
    "swin_tiny": (1466, 2036, 1544),
}
MOMENT_KEYS = {"exp_avg", "exp_avg_sq", "momentum_buffer"}


def make_optimizer(params: list[torch.nn.Parameter], base: str, variant: str, **overrides: Any) -> torch.optim.Optimizer:
    params = list(params)
    if base == "sgdm":
        hp = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
        if variant == "baseline":
            return torch.optim.SGD(params, **hp)
        return Shampoo4bit(params, base="sgd", **hp, **SHAMPOO_VARIANTS[variant], **overrides)
    hp = dict(lr=1e-3, weight_decay=0.05)
    if variant == "baseline":
        return torch.optim.AdamW(params, **hp)
    return Shampoo4bit(params, base="adamw", **hp, **SHAMPOO_VARIANTS[variant], **overrides)


def state_report(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the optimizer state by kind (``Shampoo4bit.memory_report`` or the torch equivalent)."""
    if isinstance(opt, Shampoo4bit):
        return opt.memory_report()
    moments = other = 0
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                nbytes = value.numel() * value.element_size()
                if key in MOMENT_KEYS:
                    moments += nbytes
                else:
                    other += nbytes
    return {"moments": moments, "second_order": 0, "other": other, "total": moments + other}


def factor_orders(opt: torch.optim.Optimizer) -> list[int]:
    if not isinstance(opt, Shampoo4bit):
        return []
    return [f.order for _, _, _, f in opt.factors()]


def measure_state(model_name: str, variants: tuple[str, ...], device: str = "cpu") -> dict[str, Any]:
    """Exact state bytes of every variant for one model.

    ``device="cpu"``: real tensors, one optimizer step on zero gradients each.
    ``device="meta"``: shapes only (no allocation, instant): torch optimizers step on meta
    tensors; Shampoo4bit runs ``init_state()`` and, for the SGD base, SGD's momentum buffer
    (created lazily at the first step) is added as one parameter-sized fp32 tensor per parameter.
    Both give the same bytes; the full run checks that.
    """
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=100)
    base = MODELS.get(model_name, "adamw")
    params = list(model.parameters())
    if device == "meta":
        params = [torch.nn.Parameter(torch.empty_like(p, device="meta")) for p in params]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    out: dict[str, Any] = {
        "base": base,
        "params": sum(p.numel() for p in params),
        "param_bytes": param_bytes,
        "variants": {},
    }
    for variant in variants:
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = make_optimizer(params, base, variant)
        if device == "meta" and isinstance(opt, Shampoo4bit):
            opt.init_state()
            rep = opt.memory_report()
            if base == "sgdm":
                rep["moments"] += param_bytes
                rep["total"] += param_bytes
        else:
            opt.step()
            rep = state_report(opt)
        orders = factor_orders(opt)
        out["variants"][variant] = {"state": rep, "num_factors": len(orders), "max_order": max(orders, default=0)}
        del opt
    for p in params:
        p.grad = None
    v = out["variants"]
    for other, key in (("shampoo4", "32_over_4"), ("shampoo8", "32_over_8"), ("naive4", "32_over_naive4")):
        if "shampoo32" in v and other in v:
            out[f"second_order_ratio_{key}"] = v["shampoo32"]["state"]["second_order"] / v[other]["state"]["second_order"]
    return out


# -- peak memory of a training step, one fresh process per (model, variant) ----------------
def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset this process's peak-RSS mark (VmHWM); Linux >= 4.0."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM) since the last reset. Not ``getrusage().ru_maxrss``: Linux
    carries the parent's RSS at fork into a child's ru_maxrss across exec."""
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _warm_up(model_name: str, variant: str, num_classes: int) -> None:
    """Run the same kinds of ops at tiny sizes first, so that library initialisation (oneDNN,
    BLAS / LAPACK workspaces, thread pools) is not counted as the step's memory."""
    base = MODELS.get(model_name, "adamw")
    model = create_model(model_name, num_classes=num_classes, width=0.25)
    opt = make_optimizer(list(model.parameters()), base, variant)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if variant != "baseline":  # the decompositions (QR / eigh / Newton) on one small factor pair
        p = torch.nn.Parameter(torch.zeros(80, 80))
        small = make_optimizer([p], base, variant, stat_interval=1, root_interval=1)
        for _ in range(2):
            p.grad = torch.randn(80, 80)
            small.step()
        del p, small
    del model, opt, loss
    gc.collect()


def child(model_name: str, variant: str, batch_size: int, transient: bool, num_classes: int = 100) -> dict[str, Any]:
    """Two training steps in this (fresh) process; the second one is measured. Bytes."""
    _warm_up(model_name, variant, num_classes)
    gc.collect()
    rss0 = _rss_bytes()
    torch.manual_seed(0)
    base = MODELS.get(model_name, "adamw")
    model = create_model(model_name, num_classes=num_classes)
    params = list(model.parameters())
    opt = make_optimizer(params, base, variant, stat_interval=10**9, root_interval=10**9)
    if isinstance(opt, Shampoo4bit):
        opt.init_state()
        # Mark the roots as computed (they hold the initial identity, stored in the variant's
        # format), so every step preconditions each block exactly as a steady-state step does.
        for state in opt.state.values():
            if "last_root_step" in state:
                flag = state["last_root_step"]
                if isinstance(flag, torch.Tensor):
                    flag.fill_(1)
                else:
                    state["last_root_step"] = 1
    x = torch.randn(batch_size, 3, 32, 32)
    y = torch.randint(0, num_classes, (batch_size,))

    def forward_backward() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()

    # Step 1 creates every lazily allocated buffer (AdamW moments, SGD momentum), so step 2 is a
    # steady-state step: state, parameters and activations are alive together, as in training.
    forward_backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    reset = _reset_peak()
    rss_before_step2 = _rss_bytes()
    phases: dict[str, int] = {}
    t0 = time.perf_counter()
    forward_backward()
    t_fwd_bwd = time.perf_counter() - t0
    phases["forward_backward"] = _peak_rss_bytes() - rss0
    rss_after_backward = _rss_bytes()
    opt.step()
    t_step = time.perf_counter() - t0 - t_fwd_bwd
    phases["optimizer_step"] = _peak_rss_bytes() - rss0
    largest = None
    t_transient = 0.0
    if transient and isinstance(opt, Shampoo4bit):
        # PU + PIRU of the largest factor, with the gradients still alive.
        p, i, side, factor = max(opt.factors(), key=lambda item: item[3].order)
        mshape, blocks = blocks_for(tuple(p.shape), opt.param_groups[0]["max_order"])
        b = blocks[i]
        g = p.grad.float().reshape(mshape)[b.r0 : b.r1, b.c0 : b.c1]
        t1 = time.perf_counter()
        factor.update_stats(g @ g.mT if side == "L" else g.mT @ g)
        factor.update_root()
        t_transient = time.perf_counter() - t1
        largest = factor.order
        phases["pu_piru_largest_factor"] = _peak_rss_bytes() - rss0
    state = state_report(opt)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    return {
        "model": model_name,
        "variant": variant,
        "batch_size": batch_size,
        "peak_rss_delta_bytes": _peak_rss_bytes() - rss0,
        "peak_mark_reset": reset,
        "cumulative_peak_after_phase_bytes": phases,
        "rss_before_step2_delta_bytes": rss_before_step2 - rss0,
        "rss_after_backward_delta_bytes": rss_after_backward - rss0,
        "static_bytes": param_bytes + grad_bytes + state["total"],
        "param_bytes": param_bytes,
        "grad_bytes": grad_bytes,
        "state_bytes": state["total"],
        "transient_factor_order": largest,
        "time_fwd_bwd_s": round(t_fwd_bwd, 3),
        "time_step_s": round(t_step, 3),
        "time_transient_s": round(t_transient, 3),
    }


def measure_peak(model_name: str, variant: str, batch_size: int, threads: int, transient: bool) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--models",
        model_name,
        "--variants",
        variant,
        "--batch-size",
        str(batch_size),
        "--threads",
        str(threads),
    ]
    if not transient:
        cmd.append("--no-transient")
    # A fixed mmap threshold makes glibc return every large block to the OS when it is freed, so
    # the RSS follows the live allocations instead of the allocator's cached free lists.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory child failed for {model_name}/{variant}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.split("\n\n")[0], NAME)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="models (CIFAR-100 heads, 32x32)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch-size", type=int, default=32, help="batch of the measured training step")
    parser.add_argument(
        "--peak", action=argparse.BooleanOptionalAction, default=None,
        help="measure the peak RSS of a training step (a subprocess per model and variant); "
        "default: on, off with --quick",
    )
    parser.add_argument(
        "--transient", action=argparse.BooleanOptionalAction, default=True,
        help="include one PU + PIRU of the largest factor in the measured step",
    )
    parser.add_argument(
        "--state-device", choices=("cpu", "meta"), default=None,
        help="count state on real CPU tensors (and cross-check against meta) or on meta tensors only; "
        "default: cpu, meta with --quick",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    if args.child:
        print(json.dumps(child(args.models[0], args.variants[0], args.batch_size, args.transient)))
        return {}
    run = setup_run(args)
    peak = (not args.quick) if args.peak is None else args.peak
    state_device = args.state_device or ("meta" if args.quick else "cpu")
    variants = tuple(args.variants)

    results: dict[str, Any] = {}
    for model_name in args.models:
        t0 = time.perf_counter()
        results[model_name] = measure_state(model_name, variants, state_device)
        if state_device == "cpu":
            shapes_only = measure_state(model_name, variants, "meta")
            results[model_name]["meta_matches_real"] = all(
                shapes_only["variants"][v]["state"] == results[model_name]["variants"][v]["state"] for v in variants
            )
        print(f"[memory] {model_name}: state bytes ({state_device}) in {time.perf_counter() - t0:.1f}s", flush=True)
        if peak:
            for variant in variants:
                t0 = time.perf_counter()
                rec = measure_peak(model_name, variant, args.batch_size, args.threads, args.transient)
                results[model_name]["variants"][variant]["peak"] = rec
                print(
                    f"[memory] {model_name}/{variant}: peak RSS delta {mib(rec['peak_rss_delta_bytes']):.0f} MiB, "
                    f"static {mib(rec['static_bytes']):.0f} MiB (fwd+bwd {rec['time_fwd_bwd_s']}s, step "
                    f"{rec['time_step_s']}s, PU+PIRU {rec['time_transient_s']}s; {time.perf_counter() - t0:.1f}s)",
                    flush=True,
                )

    # -- tables --
    rows = []
    for model_name, r in results.items():
        for variant in variants:
            v = r["variants"][variant]
            st = v["state"]
            label = LABELS[r["base"]] if variant == "baseline" else LABELS[variant]
            rows.append([
                model_name, label, round(mib(st["moments"]), 1), round(mib(st["second_order"]), 1),
                round(mib(st["total"]), 1), v["num_factors"],
            ])
    print("\nOptimizer state (MiB, exact; CIFAR-100 heads)")
    print(table(["model", "optimizer", "moments", "second-order", "total state", "factors"], rows, 1))
    rows = [[m, r["params"], r.get("second_order_ratio_32_over_4"), r.get("second_order_ratio_32_over_8"),
             r.get("second_order_ratio_32_over_naive4")] for m, r in results.items()]
    print("\nSecond-order state, 32-bit over quantized (target >= 6.5x for 4-bit; SPEC ~7x)")
    print(table(["model", "params", "32/4-bit", "32/8-bit", "32/naive 4-bit"], rows, 2))
    if peak:
        rows = []
        for model_name, r in results.items():
            base_peak = r["variants"]["baseline"]["peak"]["peak_rss_delta_bytes"] if "baseline" in variants else None
            for variant in variants:
                pk = r["variants"][variant]["peak"]
                label = LABELS[r["base"]] if variant == "baseline" else LABELS[variant]
                over = None if base_peak is None else round(mib(pk["peak_rss_delta_bytes"] - base_peak))
                rows.append([model_name, label, round(mib(pk["static_bytes"])), round(mib(pk["peak_rss_delta_bytes"])), over])
        print(f"\nPeak memory of one training step (MiB; batch {args.batch_size}, CPU RSS delta in a fresh process)")
        print(table(["model", "optimizer", "params+grads+state", "peak RSS delta", "over first-order"], rows, 0))

    payload = {
        "settings": {
            "num_classes": 100,
            "img_size": 32,
            "batch_size": args.batch_size if peak else None,
            "peak_measured": peak,
            "transient_included": args.transient,
            "state_device": state_device,
            "state_method": "one optimizer step on zero gradients, then exact bytes of every state tensor "
            "(Shampoo4bit.memory_report(); torch optimizers: sum over state tensors); on meta tensors "
            "Shampoo4bit uses init_state() plus SGD's parameter-sized momentum buffer",
            "peak_method": "fresh subprocess per (model, optimizer), glibc mmap threshold fixed at 128 KiB: after a "
            "tiny warm-up the RSS is recorded, the model and optimizer built and one training step run; then the "
            "peak-RSS mark (VmHWM) is reset and a second step measured (forward+backward, preconditioned optimizer "
            "step, one PU+PIRU of the largest factor); reported: peak minus the RSS before the model was built",
            "shampoo": {k: v for k, v in SHAMPOO_VARIANTS.items()},
            "first_order": {"sgdm": "torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)",
                            "adamw": "torch.optim.AdamW(lr=1e-3, weight_decay=0.05)"},
        },
        "paper_peak_gpu_mb_batch128": PAPER_PEAK_MB,
        "models": results,
    }
    path = write_result(args.out, NAME, payload, run, argv)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
