"""Optimizer-state memory of 4-bit Shampoo (with fp32, 8-bit or 4-bit moments) against 32-bit,
8-bit and naive 4-bit Shampoo and the fp32 first-order baseline, on the paper's CIFAR-100 models
(ResNet34, VGG19-BN, ViT-Small, Swin-Tiny).

Every optimizer gets ``shampoo_param_groups(model)`` (the first-order baseline the same groups
without the Shampoo-only keys). Two measurements per (model, optimizer):

1. **State bytes, exact.** Every optimizer takes one step on zero gradients (so lazily created
   buffers such as torch SGD's momentum exist; no preconditioner update happens) and its state
   is counted tensor by tensor: ``Shampoo4bit.memory_report()`` for Shampoo (quantized moments,
   ``exp_avg_codes`` / ``exp_avg_absmax`` ..., count as moments), the sum of the torch
   optimizer's state tensors for SGDM / AdamW. Each total is also given relative to what fp32
   AdamW keeps for the same parameters (``8 x numel`` bytes), and each quantized second-order
   state relative to 32-bit Shampoo's. These numbers do not depend on the machine;
   ``--no-peak`` (alias ``--no-rss``) gives them in a few minutes, ``--state-device meta`` in
   seconds.
2. **Peak memory of a training step, measured.** A fresh subprocess per (model, optimizer)
   builds the model and runs two training steps (forward + backward on a random CIFAR-sized
   batch, ``zero_grad(set_to_none=True)``, optimizer step) with preconditioning active (every
   Shampoo block multiplies its gradient by both stored roots, the per-step work). The first step
   creates the lazily allocated buffers; the second one is measured: its forward + backward, its
   step and then, with the gradients still alive, one statistics update (PU) and one
   inverse-root update (PIRU) of the model's largest factor - factors are updated one at a time,
   so the largest one bounds the transient of those updates. Reported: the peak RSS of the
   second step (VmHWM, reset before it) minus the RSS once the model was built ("above the
   model"; also minus the RSS before it, after a tiny warm-up that loads the libraries), and the
   exact static bytes (parameters + gradients + optimizer state). The RSS also counts
   activations, which scale with ``--batch-size`` (the paper used 128 on a GPU; the default here
   is smaller to keep the run practical on 2 CPU cores), and allocator slack; glibc's mmap
   threshold is fixed so freed blocks leave the RSS. Without a resettable VmHWM (Linux < 4.0)
   the lifetime peak is used.

Shampoo settings are the paper's: block 64 (8-bit: 256, as in the paper's 8-bit ablation),
Linear-2, max order 1200, min_quant_numel 4096, and the package's root storage defaults
(upper triangle, block 256, bf16 scales); base SGDM (lr 0.1, momentum 0.9, wd 5e-4) for
ResNet / VGG and AdamW (lr 1e-3, wd 0.05) for ViT / Swin. ``shampoo4_m8`` / ``shampoo4_m4`` are
the paper's 4-bit eigenvector Shampoo with ``moment_bits=8`` / ``4`` (the base optimizer's
moments quantized); ``cholesky8_m8`` / ``cholesky8_m4`` the same for the default storage.
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
from lightning_shampoo4.configure import PRECONDITION_KEY, shampoo_param_groups
from lightning_shampoo4.models import create_model
from lightning_shampoo4.optim.blocking import blocks_for
from lightning_shampoo4.optim.soap import SOAP4bit
from lightning_shampoo4.quant.moments import moment_bytes

NAME = "memory"
MODELS = {"resnet34": "sgdm", "vgg19_bn": "sgdm", "vit_small": "adamw", "swin_tiny": "adamw"}
# 4-bit Shampoo with quantized base-optimizer moments.
MOMENT_VARIANTS: dict[str, dict[str, Any]] = {
    "shampoo4_m8": dict(SHAMPOO_VARIANTS["shampoo4"], moment_bits=8),
    "shampoo4_m4": dict(SHAMPOO_VARIANTS["shampoo4"], moment_bits=4),
    "cholesky8_m8": dict(SHAMPOO_VARIANTS["cholesky8"], moment_bits=8),
    "cholesky8_m4": dict(SHAMPOO_VARIANTS["cholesky8"], moment_bits=4),
}
VARIANT_KWARGS: dict[str, dict[str, Any]] = {**SHAMPOO_VARIANTS, **MOMENT_VARIANTS}
# SOAP4bit (its defaults at 4 bits, and its fp32 reference) and, when installed, the peers
SOAP_VARIANTS: dict[str, dict[str, Any]] = {
    "soap4": dict(bits=4), "soap32": dict(bits=32), "soap8": dict(bits=8),
    # the design candidates of docs/soap.md
    "soap4_rotated4_m4": dict(bits=4, statistics="rotated4", moment_bits=4),
    "soap4_rotated4": dict(bits=4, statistics="rotated4"),
    "soap4_rotated8_m4": dict(bits=4, statistics="rotated8", moment_bits=4),
    "soap4_cholesky8": dict(bits=4, statistics="cholesky8"),
    "soap4_dense_stats": dict(bits=4, statistics="dense"),
    "soap4_eigen_m4_dim1024": dict(bits=4, statistics="eigen", moment_bits=4, max_precondition_dim=1024),
    "soap4_dim128_cholesky8_m4": dict(bits=4, statistics="cholesky8", moment_bits=4, max_precondition_dim=128),
    # the compact choices: the first moment in the eigenbasis at 4 bits, and also square blocks of 128
    "soap4_rotm4": dict(bits=4, first_moment_basis="rotated", moment_bits=4),
    "soap4_rotm4_dim128": dict(bits=4, first_moment_basis="rotated", moment_bits=4, max_precondition_dim=128),
    "soap4_norm4": dict(bits=4, first_moment_basis="normalized", moment_bits=4),
    "soap4_norm4_dim128": dict(bits=4, first_moment_basis="normalized", moment_bits=4, max_precondition_dim=128),
}
# pytorch_optimizer's SOAP (fp32), singd's SINGD (dense, fp32), torch's Muon (+ AdamW)
PEER_VARIANTS = ("soap_po", "singd", "muon")
# not among the CIFAR models of create_model: quality.py's char-level transformer (its charlm settings)
EXTRA_MODELS = {"charlm": "adamw"}
VARIANTS = ("baseline", "shampoo32", "shampoo8", "naive4", "shampoo4", "cholesky4", "cholesky8", "shampoo4_m8",
            "shampoo4_m4", "cholesky8_m8", "cholesky8_m4")
SOAP_CHOICES = (*SOAP_VARIANTS, *PEER_VARIANTS)  # on request (--variants)
PEAK_VARIANTS = ("baseline", "shampoo32", "shampoo4", "shampoo4_m8", "shampoo4_m4")
VARIANT_LABELS = {
    **LABELS,
    "shampoo4": "4-bit eigenvector Shampoo (fp32 moments)",
    "shampoo4_m8": "4-bit eigenvector Shampoo + 8-bit moments",
    "shampoo4_m4": "4-bit eigenvector Shampoo + 4-bit moments",
    "cholesky8": "4-bit Shampoo, default storage (fp32 moments)",
    "cholesky8_m8": "4-bit Shampoo, default storage + 8-bit moments",
    "cholesky8_m4": "4-bit Shampoo, default storage + 4-bit moments",
    "soap4": "4-bit SOAP (SOAP4bit defaults)",
    "soap32": "32-bit SOAP (SOAP4bit bits=32)",
    "soap8": "8-bit SOAP (SOAP4bit bits=8)",
    "soap4_rotated4_m4": "4-bit SOAP, rotated4 statistics, 4-bit m",
    "soap4_rotated4": "4-bit SOAP, rotated4 statistics",
    "soap4_rotated8_m4": "4-bit SOAP, 4-bit m",
    "soap4_cholesky8": "4-bit SOAP, cholesky8 statistics",
    "soap4_dense_stats": "4-bit SOAP, fp32 statistics",
    "soap4_eigen_m4_dim1024": "4-bit SOAP, eigen statistics, 4-bit m, max dim 1024",
    "soap4_dim128_cholesky8_m4": "4-bit SOAP, max dim 128, cholesky8, 4-bit m",
    "soap4_rotm4": "4-bit SOAP, 4-bit m in the eigenbasis",
    "soap4_rotm4_dim128": "4-bit SOAP, 4-bit m in the eigenbasis, max dim 128",
    "soap4_norm4": "4-bit SOAP, normalized 4-bit m",
    "soap4_norm4_dim128": "4-bit SOAP, normalized 4-bit m, max dim 128",
    "soap_po": "SOAP (pytorch_optimizer, fp32)",
    "singd": "SINGD (dense, fp32) + AdamW",
    "muon": "Muon (fp32 momentum) + AdamW",
}
# Paper Table 2: total peak GPU MB at batch 128 (first-order, + 32-bit Shampoo, + 4-bit Shampoo).
PAPER_PEAK_MB = {
    "resnet34": (822, 1442, 908),
    "vit_small": (2720, 3252, 2792),
    "swin_tiny": (1466, 2036, 1544),
}
MOMENT_KEYS = ("exp_avg", "momentum_buffer")  # exp_avg_sq and the quantized codes / scales too
SHAMPOO_ONLY_KEYS = (PRECONDITION_KEY, "start_preconditioning_step")


def label(variant: str, base: str) -> str:
    """Table label of ``variant`` (the baseline is named after its base optimizer)."""
    return f"{LABELS[base]} (fp32)" if variant == "baseline" else VARIANT_LABELS[variant]


def param_groups(model: torch.nn.Module, variant: str) -> list[dict[str, Any]]:
    """``shampoo_param_groups(model)``; for the first-order baseline without the Shampoo-only keys."""
    groups = shampoo_param_groups(model)
    if variant == "baseline" or variant in SOAP_VARIANTS or variant in PEER_VARIANTS:
        groups = [{k: v for k, v in g.items() if k not in SHAMPOO_ONLY_KEYS} for g in groups]
    return groups


def make_optimizer(params: Any, base: str, variant: str, **overrides: Any) -> torch.optim.Optimizer:
    """The optimizer of ``variant`` over ``params`` (parameters or group dicts)."""
    params = list(params)
    if base == "sgdm":
        hp = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
        if variant == "baseline":
            return torch.optim.SGD(params, **hp)
        return Shampoo4bit(params, base="sgd", **hp, **VARIANT_KWARGS[variant], **overrides)
    hp = dict(lr=1e-3, weight_decay=0.05)
    if variant == "baseline":
        return torch.optim.AdamW(params, **hp)
    if variant in SOAP_VARIANTS:
        return SOAP4bit(params, **hp, **SOAP_VARIANTS[variant], **overrides)
    if variant == "soap_po":
        from pytorch_optimizer import SOAP

        return _Peer(SOAP(params, **hp, betas=(0.95, 0.95), precondition_frequency=10))
    return Shampoo4bit(params, base="adamw", **hp, **VARIANT_KWARGS[variant], **overrides)


def state_report(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the optimizer state by kind (``Shampoo4bit.memory_report`` or the torch equivalent)."""
    if isinstance(opt, (Shampoo4bit, SOAP4bit)):
        return opt.memory_report()
    if isinstance(opt, _Peer):
        return opt.report()
    moments = other = 0
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                nbytes = value.numel() * value.element_size()
                if key.startswith(MOMENT_KEYS):
                    moments += nbytes
                else:
                    other += nbytes
    return {"moments": moments, "second_order": 0, "other": other, "total": moments + other}


def adamw32_bytes(params: list[torch.Tensor]) -> int:
    """What fp32 AdamW keeps for ``params``: two fp32 moments, 8 bytes per element."""
    return 8 * sum(p.numel() for p in params)


class _Peer:
    """A peer optimizer (pytorch_optimizer's SOAP, SINGD + AdamW) counted tensor by tensor: Adam
    moments (``exp_avg*``) and SINGD's momentum (``momentum_buffer``) as moments, every other state
    tensor (statistics, eigenbases, Kronecker factors and their momenta) as second-order state."""

    def __init__(self, *optimizers: torch.optim.Optimizer, extra: list[torch.Tensor] | None = None) -> None:
        self.optimizers, self.extra = optimizers, extra or []

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def report(self) -> dict[str, int]:
        moments = second = 0
        seen: set[int] = set()

        def walk(key: str, x: Any) -> None:
            nonlocal moments, second
            if isinstance(x, torch.Tensor):
                if id(x) in seen:
                    return
                seen.add(id(x))
                nbytes = x.numel() * x.element_size()
                if key.startswith(("exp_avg", "momentum_buffer")):
                    moments += nbytes
                else:
                    second += nbytes
            elif isinstance(x, dict):
                for k, v in x.items():
                    walk(str(k), v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    walk(key, v)

        for o in self.optimizers:
            for state in o.state.values():
                walk("", state)
        for t in self.extra:
            walk("", t)
        return {"moments": moments, "second_order": second, "other": 0, "total": moments + second}


def _singd(model: torch.nn.Module, model_name: str) -> _Peer:
    """SINGD (dense structures) on the linear and conv layers, AdamW on the rest, after one real
    forward + backward (SINGD's state lives in its per-layer Kronecker factors K, C and their
    momenta, created at construction)."""
    from singd.optim.optimizer import SINGD

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    covered = {id(p) for m in layers for p in m.parameters(recurse=False)}
    singd = SINGD(model, lr=1e-3, weight_decay=0.05, structures=("dense", "dense"), warn_unsupported=False,
                  loss_average="batch+sequence" if model_name == "charlm" else "batch")
    rest = [p for p in model.parameters() if id(p) not in covered]
    adamw = torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.05)
    x = (torch.randint(0, 128, (2, 64)) if model_name == "charlm" else torch.randn(2, 3, 32, 32))
    model.zero_grad()
    out = model(x)
    out.float().square().mean().backward()
    singd.step()
    adamw.step()
    # K, C and their momenta live on SINGD itself, not in its ``state``
    extra = [t for name in ("Ks", "Cs", "m_Ks", "m_Cs") for d in [getattr(singd, name, {})]
             for mat in (d.values() if isinstance(d, dict) else []) for t in _tensors_of(mat)]
    return _Peer(singd, adamw, extra=extra)


def _muon(model: torch.nn.Module, model_name: str) -> _Peer:
    """``torch.optim.Muon`` on the hidden matrices, AdamW on the rest, split as quality.py's runs
    split them; counted after a step (Muon creates its momentum buffers there)."""
    import quality

    hidden, rest = quality.muon_param_split(model, model_name)
    return _Peer(torch.optim.Muon(hidden, lr=1e-3, weight_decay=0.05, adjust_lr_fn="match_rms_adamw"),
                 torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.05))


def _tensors_of(x: Any) -> list[torch.Tensor]:
    """The tensors a SINGD structured matrix holds (its registered tensors are attributes)."""
    if isinstance(x, torch.Tensor):
        return [x]
    return [v for v in vars(x).values() if isinstance(v, torch.Tensor)]


def build_model(model_name: str) -> torch.nn.Module:
    """A CIFAR-100 model of ``create_model``, or ``charlm``: quality.py's char-level transformer."""
    if model_name == "charlm":
        import quality

        cfg = quality.FULL["charlm"]
        return quality.CharTransformer(quality.VOCAB, cfg["context"], cfg["d_model"], cfg["n_layers"], cfg["n_heads"])
    return create_model(model_name, num_classes=100)


def factor_orders(opt: torch.optim.Optimizer) -> list[int]:
    if not isinstance(opt, Shampoo4bit):
        return []
    return [f.order for _, _, _, f in opt.factors()]


def _missing_momentum_bytes(opt: Shampoo4bit) -> int:
    """SGD momentum bytes a first step would create that ``init_state()`` did not (meta count)."""
    missing = 0
    for group in opt.param_groups:
        if group["base"] != "sgd" or not group["momentum"]:
            continue
        for p in group["params"]:
            if not any(k.startswith("momentum_buffer") for k in opt.state.get(p, {})):
                missing += moment_bytes(p.numel(), "sgd", group.get("moment_bits", 32), p.element_size())
    return missing


def measure_state(model_name: str, variants: tuple[str, ...], device: str = "cpu") -> dict[str, Any]:
    """Exact state bytes of every variant for one model.

    ``device="cpu"``: real tensors, one optimizer step on zero gradients each.
    ``device="meta"``: shapes only (no allocation, instant): torch optimizers step on meta
    tensors; Shampoo4bit runs ``init_state()``, plus the SGD momentum buffers should it create
    them lazily (``moment_bytes`` of each parameter). Both give the same bytes; the full run
    checks that.
    """
    torch.manual_seed(0)
    model = build_model(model_name)
    base = {**MODELS, **EXTRA_MODELS}.get(model_name, "adamw")
    params = list(model.parameters())
    swap = {id(p): p for p in params}
    if device == "meta":
        swap = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta")) for p in params}
        params = list(swap.values())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    adamw32 = adamw32_bytes(params)
    out: dict[str, Any] = {
        "base": base,
        "params": sum(p.numel() for p in params),
        "param_bytes": param_bytes,
        "adamw32_bytes": adamw32,
        "variants": {},
    }
    for variant in variants:
        for p in params:
            p.grad = torch.zeros_like(p)
        groups = [{**g, "params": [swap[id(p)] for p in g["params"]]} for g in param_groups(model, variant)]
        if variant in ("singd", "muon"):
            if device == "meta":
                continue  # their state exists only after a real step (SINGD's after a forward + backward too)
            opt = _singd(model, model_name) if variant == "singd" else _muon(model, model_name)
            if variant == "muon":
                opt.step()
            rep = opt.report()
            out["variants"][variant] = {"state": rep, "total_vs_adamw32": rep["total"] / adamw32, "num_factors": 0,
                                        "max_order": 0}
            continue
        opt = make_optimizer(groups, base, variant)
        if device == "meta" and isinstance(opt, SOAP4bit):
            opt.init_state()
            rep = opt.memory_report()
        elif device == "meta" and variant == "soap_po":
            continue  # its state exists only after a real step
        elif device == "meta" and isinstance(opt, Shampoo4bit):
            opt.init_state()
            rep = opt.memory_report()
            extra = _missing_momentum_bytes(opt)
            rep["moments"] += extra
            rep["total"] += extra
        else:
            opt.step()
            rep = state_report(opt)
        orders = factor_orders(opt)
        out["variants"][variant] = {
            "state": rep,
            "total_vs_adamw32": rep["total"] / adamw32,
            "num_factors": len(orders),
            "max_order": max(orders, default=0),
        }
        del opt
    for p in params:
        p.grad = None
    v = out["variants"]
    if "soap32" in v:
        ref = v["soap32"]["state"]["second_order"]
        for name in (*SOAP_VARIANTS, "soap_po"):
            if name != "soap32" and name in v and v[name]["state"]["second_order"]:
                v[name]["second_order_soap32_over_this"] = ref / v[name]["state"]["second_order"]
    if "shampoo32" in v:
        ref = v["shampoo32"]["state"]["second_order"]
        for name, rec in v.items():
            if name != "baseline" and rec["state"]["second_order"]:
                rec["second_order_32_over_this"] = ref / rec["state"]["second_order"]
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
    gc.collect()
    rss_model = _rss_bytes()
    opt = make_optimizer(param_groups(model, variant), base, variant, stat_interval=10**9, root_interval=10**9)
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
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        mshape, blocks = blocks_for(tuple(p.shape), group["max_order"])
        b = blocks[i]
        g = p.grad.float().reshape(mshape)[b.r0 : b.r1, b.c0 : b.c1]
        t1 = time.perf_counter()
        state = opt.state[p]
        stats = factor.storage.update_stats(factor.view, g @ g.mT if side == "L" else g.mT @ g)
        state.update({f"{factor.prefix}.{k}": v for k, v in stats.entries.items()})
        roots = factor.storage.update_root(factor.view, stats.fresh)
        state.update({f"{factor.prefix}.{k}": v for k, v in roots.entries.items()})
        del stats, roots
        t_transient = time.perf_counter() - t1
        largest = factor.order
        phases["pu_piru_largest_factor"] = _peak_rss_bytes() - rss0
    state = state_report(opt)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    peak = _peak_rss_bytes()
    return {
        "model": model_name,
        "variant": variant,
        "batch_size": batch_size,
        "peak_rss_delta_bytes": peak - rss0,
        "peak_rss_above_model_bytes": peak - rss_model,
        "rss_model_delta_bytes": rss_model - rss0,
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
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + SOAP_CHOICES,
                        help="variants of the state table (soap4, soap32, soap_po, singd, muon: on request)")
    parser.add_argument(
        "--peak-variants", nargs="+", default=None, choices=VARIANTS,
        help=f"variants whose peak RSS is measured (default: those of {' '.join(PEAK_VARIANTS)} in --variants)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="batch of the measured training step")
    parser.add_argument(
        "--peak", "--rss", action=argparse.BooleanOptionalAction, default=None,
        help="measure the peak RSS of a training step (a subprocess per model and variant); "
        "default: on, off with --quick; --no-peak gives the exact-bytes table alone",
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
    variants = tuple(args.variants)
    peak_variants = tuple(args.peak_variants or [v for v in PEAK_VARIANTS if v in variants])
    if not set(peak_variants) <= set(variants):
        parser.error(f"--peak-variants must be among --variants, got {' '.join(v for v in peak_variants if v not in variants)}")
    run = setup_run(args)
    peak = (not args.quick) if args.peak is None else args.peak
    state_device = args.state_device or ("meta" if args.quick else "cpu")

    results: dict[str, Any] = {}
    for model_name in args.models:
        t0 = time.perf_counter()
        results[model_name] = measure_state(model_name, variants, state_device)
        if state_device == "cpu":
            shapes_only = measure_state(model_name, variants, "meta")
            results[model_name]["meta_matches_real"] = all(
                shapes_only["variants"][v]["state"] == results[model_name]["variants"][v]["state"] for v in variants
                if v in shapes_only["variants"]
            )
        print(f"[memory] {model_name}: state bytes ({state_device}) in {time.perf_counter() - t0:.1f}s", flush=True)
        if peak:
            for variant in peak_variants:
                t0 = time.perf_counter()
                rec = measure_peak(model_name, variant, args.batch_size, args.threads, args.transient)
                results[model_name]["variants"][variant]["peak"] = rec
                print(
                    f"[memory] {model_name}/{variant}: peak RSS above the model "
                    f"{mib(rec['peak_rss_above_model_bytes']):.0f} MiB, "
                    f"static {mib(rec['static_bytes']):.0f} MiB (fwd+bwd {rec['time_fwd_bwd_s']}s, step "
                    f"{rec['time_step_s']}s, PU+PIRU {rec['time_transient_s']}s; {time.perf_counter() - t0:.1f}s)",
                    flush=True,
                )
            base_peak = results[model_name]["variants"].get("baseline", {}).get("peak")
            for variant in peak_variants:
                rec = results[model_name]["variants"][variant]["peak"]
                if base_peak is not None:
                    rec["above_model_over_first_order_bytes"] = (
                        rec["peak_rss_above_model_bytes"] - base_peak["peak_rss_above_model_bytes"]
                    )
                    rec["above_model_vs_first_order"] = (
                        rec["peak_rss_above_model_bytes"] / base_peak["peak_rss_above_model_bytes"]
                    )

    # -- tables --
    rows = []
    for model_name, r in results.items():
        for variant in variants:
            v = r["variants"][variant]
            st = v["state"]
            rows.append([
                model_name, label(variant, r["base"]), f"{mib(st['moments']):.1f}", f"{mib(st['second_order']):.1f}",
                f"{mib(st['total']):.1f}", f"{v['total_vs_adamw32']:.2f}",
                v.get("second_order_32_over_this", v.get("second_order_soap32_over_this")),
            ])
    print("\nOptimizer state (MiB, exact; CIFAR-100 heads; AdamW-32 = 8 bytes per parameter element)")
    print(table(
        ["model", "optimizer", "moments", "second-order", "total", "total vs AdamW-32 (x)",
         "2nd-order 32-bit / this (x; SOAP: vs 32-bit SOAP)"],
        rows, 2,
    ))
    if peak:
        rows = []
        for model_name, r in results.items():
            for variant in peak_variants:
                pk = r["variants"][variant]["peak"]
                over = pk.get("above_model_over_first_order_bytes")
                ratio = pk.get("above_model_vs_first_order")
                rows.append([
                    model_name, label(variant, r["base"]), f"{mib(pk['state_bytes']):.1f}", f"{mib(pk['static_bytes']):.0f}",
                    f"{mib(pk['peak_rss_above_model_bytes']):.0f}", None if over is None else f"{mib(over):+.0f}",
                    None if ratio is None else f"{ratio:.2f}",
                ])
        print(
            f"\nPeak RSS of one training step above the model (MiB; batch {args.batch_size}, CPU, fresh process; "
            "first-order = SGDM for ResNet / VGG, AdamW-32 for ViT / Swin)"
        )
        print(table(
            ["model", "optimizer", "state", "params+grads+state", "peak above model", "vs first-order (MiB)",
             "vs first-order (x)"],
            rows, 2,
        ))

    payload = {
        "settings": {
            "num_classes": 100,
            "img_size": 32,
            "param_groups": "shampoo_param_groups(model) (first-order: without the Shampoo-only keys)",
            "batch_size": args.batch_size if peak else None,
            "peak_measured": peak,
            "peak_variants": list(peak_variants) if peak else [],
            "transient_included": args.transient,
            "state_device": state_device,
            "state_method": "one optimizer step on zero gradients, then exact bytes of every state tensor "
            "(Shampoo4bit.memory_report(); torch optimizers: sum over state tensors); on meta tensors "
            "Shampoo4bit uses init_state() plus any SGD momentum buffer it creates lazily",
            "adamw32_method": "8 bytes (two fp32 moments) per parameter element",
            "peak_method": "fresh subprocess per (model, optimizer), glibc mmap threshold fixed at 128 KiB: after a "
            "tiny warm-up the RSS is recorded, the model built (RSS recorded again), the optimizer built and one "
            "training step run; then the peak-RSS mark (VmHWM) is reset and a second step measured "
            "(forward+backward, preconditioned optimizer step, one PU+PIRU of the largest factor); reported: "
            "peak minus the RSS once the model was built (and minus the RSS before it)",
            "shampoo": {k: VARIANT_KWARGS[k] for k in variants if k in VARIANT_KWARGS},
            "soap": {k: SOAP_VARIANTS[k] for k in variants if k in SOAP_VARIANTS},
            "peers": {"soap_po": "pytorch_optimizer.SOAP(lr=1e-3, weight_decay=0.05, betas=(0.95, 0.95), "
                                 "precondition_frequency=10), its defaults otherwise (max_precondition_dim 10000)",
                      "singd": "singd SINGD(structures=('dense', 'dense')) on Linear / Conv2d layers after one real "
                               "forward + backward; AdamW on the rest",
                      "muon": "torch.optim.Muon(lr=1e-3, weight_decay=0.05, adjust_lr_fn='match_rms_adamw') on "
                              "quality.py's hidden matrices (2-D, not tok. / pos. / head.), AdamW on the rest"},
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
