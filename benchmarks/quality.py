"""Training quality of 4-bit Shampoo against 32-bit and naive 4-bit Shampoo, AdamW and Muon on two
small real-data tasks that need no download.

Tasks
-----
``digits``  scikit-learn's 8x8 handwritten digits (1797 real images), the same seeded stratified
            1438 / 359 split as ``DigitsDataModule``, normalised with the training mean / std; a
            2-hidden-layer GELU MLP (``create_model("mlp")``, 85k params); cross-entropy.
``charlm``  a character-level language model on Python source text that ships with Python
            itself: the standard library's top-level ``.py`` files, sorted by name, concatenated
            up to ``--chars`` characters (non-ASCII mapped to one unknown symbol, 128 symbols);
            every 10th 8192-character chunk is validation. A pre-LayerNorm decoder-only
            transformer (learned positions, GELU MLP, untied head) trained on random windows.

Optimizers (all share one warm-up + cosine schedule, gradient clipping at norm 1, weight decay)
------------------------------------------------------------------------------------------------
``adamw``       torch.optim.AdamW.
``shampoo32``   Shampoo4bit(bits=32) grafted on AdamW.
``naive4``      Shampoo4bit(bits=4, quantize="preconditioner"): the factors and roots themselves
                quantized, the root taken by the paper's naive baseline (coupled Newton, at most
                10 iterations, early stop).
``shampoo4``    Shampoo4bit(bits=4, quantize="eigenvectors"): 4-bit eigenvectors, the paper's method.
``shampoo4_m4`` the same with AdamW's moments at 4 bits (``moment_bits=4``).
``cholesky4``   Shampoo4bit(bits=4, quantize="cholesky"): the statistics' Cholesky factors at 4 bits
                with error feedback (Li et al., arXiv 2412.10663), the second published 4-bit Shampoo.
``cholesky8``   Shampoo4bit(bits=4, quantize="cholesky8"), the default storage: the same bytes as an
                8-bit Cholesky factor without error feedback, the root at 4 bits.
``cholesky8_m4`` the same with AdamW's moments at 4 bits (``moment_bits=4``).
``shampoo4_bf16`` (only when named in ``--optimizers``) Shampoo4bit(bits=4,
                precondition_dtype="bfloat16"): the preconditioning matmuls in bf16.
``soap4``       SOAP4bit(): SOAP (Adam in Shampoo's eigenbasis, Vyas et al., arXiv 2409.11321) with
                4-bit eigenvector matrices and its default compact moments (``docs/soap.md``).
``soap32``      SOAP4bit(bits=32): the fp32 SOAP, the reference of ``soap4``.
``soap8``       (only when named) SOAP4bit(bits=8): 8-bit eigenvector matrices, the rest as ``soap4``.
``soap4_bjorck1`` (only when named) ``soap4`` with one Björck step on the dequantized bases.
``soap4_norm4`` (only when named) ``soap4`` with its compact first moment: 4 bits, in the eigenbasis,
                divided by the root of the second moment (``first_moment_basis="normalized"``).
``soap_po``     (only when named, needs ``pytorch_optimizer``) pytorch_optimizer's SOAP, fp32, its
                defaults but betas (0.95, 0.95), ``precondition_frequency`` 10.
``singd``       (only when named, needs ``singd``) SINGD (structured inverse-free KFAC, arXiv
                2312.05705) on the hidden linear layers, AdamW on the rest (same lr).
``muon``        torch.optim.Muon (Newton-Schulz orthogonalised momentum, ``adjust_lr_fn=
                "match_rms_adamw"`` so it shares AdamW's learning-rate scale) on the hidden 2-D
                weight matrices; AdamW on embeddings, the output head, biases and norms, same lr.

``--reuse NAME ...`` takes those optimizers' records from an earlier results file (``--reuse-from``)
when its task settings are identical, e.g. torch's AdamW and Muon, which no change here affects.

Curves record the training time (``train_s``, evaluations excluded) at every evaluation; the run's
``time_s`` includes the evaluations.

Protocol: a learning-rate sweep on seed 0 for every optimizer, the best lr chosen by final
validation loss (a best lr on the edge of the grid extends the grid that way, by the grid's
ratio, up to twice; then one more run at the geometric midpoint between the best lr and its
better neighbour), then that lr rerun on further seeds (seed 0 reused); mean, std, min and max of
the final validation loss (and accuracy) over seeds; loss curves as PNG. Shampoo runs use
``stat_interval`` / ``root_interval`` = 10 / 50 (the paper's 100 / 500 are for runs of tens of
thousands of steps), identical for all Shampoo variants.
"""

from __future__ import annotations

import hashlib
import math
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LABELS, SHAMPOO_VARIANTS, base_parser, setup_run, table, write_result

from lightning_shampoo4 import Shampoo4bit
from lightning_shampoo4.optim.soap import SOAP4bit

NAME = "quality"
OPTIMIZERS = ("adamw", "shampoo32", "naive4", "shampoo4", "shampoo4_m4", "cholesky4", "cholesky8", "cholesky8_m4",
              "muon")
OPTIONAL = ("shampoo4_bf16", "soap4", "soap32", "soap8", "soap4_bjorck1", "soap4_norm4", "soap_po", "singd")  # run only when named
LABELS = {**LABELS, "shampoo4_m4": "4-bit eigenvector Shampoo + 4-bit moments",
          "cholesky8_m4": "4-bit Shampoo (default) + 4-bit moments",
          "shampoo4_bf16": "4-bit eigenvector Shampoo, bf16 matmuls",
          "soap4": "4-bit SOAP (SOAP4bit)", "soap32": "32-bit SOAP (SOAP4bit bits=32)",
          "soap8": "8-bit SOAP (SOAP4bit bits=8)", "soap4_bjorck1": "4-bit SOAP, one Björck step",
          "soap4_norm4": "4-bit SOAP, normalized 4-bit first moment",
          "soap_po": "SOAP (pytorch_optimizer, fp32)", "singd": "SINGD (+AdamW)"}
# SOAP4bit variants: keyword arguments (the char-LM runs share SOAP's precondition_frequency 10)
SOAP_KW: dict[str, dict[str, Any]] = {"soap4": dict(bits=4), "soap32": dict(bits=32), "soap8": dict(bits=8),
                                      "soap4_bjorck1": dict(bits=4, bjorck_steps=1),
                                      "soap4_norm4": dict(bits=4, first_moment_basis="normalized", moment_bits=4)}
SHAMPOO_KW = {
    "shampoo32": dict(bits=32),
    "naive4": dict(bits=4, quantize="preconditioner"),
    "shampoo4": dict(bits=4, quantize="eigenvectors"),
    "shampoo4_m4": dict(bits=4, quantize="eigenvectors", moment_bits=4),
    "cholesky4": SHAMPOO_VARIANTS["cholesky4"],
    "cholesky8": SHAMPOO_VARIANTS["cholesky8"],
    "cholesky8_m4": dict(SHAMPOO_VARIANTS["cholesky8"], moment_bits=4),
    "shampoo4_bf16": dict(bits=4, quantize="eigenvectors", precondition_dtype="bfloat16"),
}

# -- task configurations -------------------------------------------------------------------
FULL = {
    "digits": dict(
        steps=600, batch_size=64, eval_every=50, lrs=[3e-4, 1e-3, 3e-3, 1e-2], weight_decay=0.01,
        stat_interval=10, root_interval=50, hidden=256,
    ),
    "charlm": dict(
        steps=400, batch_size=32, eval_every=50, lrs=[1e-3, 2e-3, 4e-3, 8e-3], weight_decay=0.01,
        stat_interval=10, root_interval=50, chars=1_000_000, context=64, d_model=128, n_layers=2,
        n_heads=4, eval_batches=16,
    ),
}
QUICK = {
    "digits": dict(
        steps=20, batch_size=64, eval_every=10, lrs=[3e-3], weight_decay=0.01, stat_interval=5,
        root_interval=10, hidden=64,
    ),
    "charlm": dict(
        steps=12, batch_size=8, eval_every=6, lrs=[4e-3], weight_decay=0.01, stat_interval=5,
        root_interval=10, chars=20_000, context=16, d_model=32, n_layers=1, n_heads=2, eval_batches=4,
    ),
}
WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.1
CLIP_NORM = 1.0


# -- data ------------------------------------------------------------------------------------
def load_digits_split() -> dict[str, torch.Tensor]:
    """The DigitsDataModule split (seeded, stratified 1438 / 359), flattened and normalised."""
    from lightning_shampoo4.data.digits import _load_sklearn_digits, stratified_split

    images, labels = _load_sklearn_digits()
    train_idx, val_idx = stratified_split(labels, 0.2, 0)
    x_train, x_val = images[train_idx], images[val_idx]
    mean, std = x_train.mean(), x_train.std()
    return {
        "x_train": ((x_train - mean) / std).contiguous(),
        "y_train": labels[train_idx],
        "x_val": ((x_val - mean) / std).contiguous(),
        "y_val": labels[val_idx],
    }


VOCAB = 128  # ASCII; every other character becomes 0 (NUL never occurs in source text)
CHUNK = 8192


def stdlib_text(max_chars: int) -> tuple[str, dict[str, Any]]:
    """Sorted top-level ``.py`` files of this Python's standard library, concatenated."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.iterdir() if p.suffix == ".py" and p.is_file())
    parts, total, used = [], 0, []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        used.append(path.name)
        total += len(text)
        if total >= max_chars:
            break
    text = "".join(parts)[:max_chars]
    info = {
        "source": str(root),
        "python": sys.version.split()[0],
        "files": len(used),
        "first_file": used[0] if used else None,
        "last_file": used[-1] if used else None,
        "chars": len(text),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    return text, info


def load_char_data(max_chars: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    text, info = stdlib_text(max_chars)
    codes = torch.tensor([c if c < VOCAB else 0 for c in map(ord, text)], dtype=torch.long)
    chunks = list(codes.split(CHUNK))
    train = torch.cat([c for i, c in enumerate(chunks) if i % 10 != 9])
    val = torch.cat([c for i, c in enumerate(chunks) if i % 10 == 9] or [chunks[-1]])
    info.update(train_chars=train.numel(), val_chars=val.numel(), vocab=VOCAB, split="every 10th 8192-char chunk")
    return {"train": train, "val": val}, info


# -- the character-level transformer ----------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharTransformer(nn.Module):
    """Decoder-only pre-LN transformer over ``vocab`` symbols with a context of ``context``."""

    def __init__(self, vocab: int = VOCAB, context: int = 64, d_model: int = 128, n_layers: int = 2, n_heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2 style scaled init of the residual projections
            for lin in (block.proj, block.fc2):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def muon_param_split(model: nn.Module, task: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden 2-D matrices for Muon, everything else for AdamW)."""
    muon, adam = [], []
    for name, p in model.named_parameters():
        hidden = p.ndim == 2 and not name.startswith(("tok.", "pos.", "head."))
        (muon if hidden else adam).append(p)
    return muon, adam


# -- optimizers ------------------------------------------------------------------------------
class Combined:
    """Several optimizers stepped as one (Muon + AdamW)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()


def make_optimizer(name: str, model: nn.Module, task: str, lr: float, cfg: dict[str, Any]) -> Any:
    wd = cfg["weight_decay"]
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    if name == "muon":
        hidden, rest = muon_param_split(model, task)
        return Combined(
            torch.optim.Muon(hidden, lr=lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(rest, lr=lr, weight_decay=wd),
        )
    if name in SOAP_KW:
        return SOAP4bit(model.parameters(), lr=lr, weight_decay=wd, **SOAP_KW[name])
    if name == "soap_po":
        from pytorch_optimizer import SOAP

        return SOAP(model.parameters(), lr=lr, weight_decay=wd, betas=(0.95, 0.95), precondition_frequency=10)
    if name == "singd":
        from singd.optim.optimizer import SINGD

        hidden, rest = muon_param_split(model, task)
        ids = {id(p) for p in hidden}
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) in ids]
        biases = [m.bias for m in linears if m.bias is not None]
        bias_ids = {id(b) for b in biases}
        return Combined(
            SINGD(model, params=hidden + biases, lr=lr, weight_decay=wd, structures=("dense", "dense"),
                  loss_average="batch+sequence" if task == "charlm" else "batch", warn_unsupported=False),
            torch.optim.AdamW([p for p in rest if id(p) not in bias_ids], lr=lr, weight_decay=wd),
        )
    return Shampoo4bit(
        model.parameters(), lr=lr, weight_decay=wd, base="adamw", stat_interval=cfg["stat_interval"],
        root_interval=cfg["root_interval"], **SHAMPOO_KW[name],
    )


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 5 % of steps, then cosine decay to 10 % (step is 0-based)."""
    warmup = max(1, round(WARMUP_FRACTION * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


# -- one training run --------------------------------------------------------------------------
def build(task: str, cfg: dict[str, Any], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if task == "digits":
        from lightning_shampoo4.models import create_model

        return create_model("mlp", num_classes=10, in_chans=1, img_size=8, hidden=cfg["hidden"])
    return CharTransformer(VOCAB, cfg["context"], cfg["d_model"], cfg["n_layers"], cfg["n_heads"])


@torch.no_grad()
def evaluate(task: str, model: nn.Module, data: dict[str, torch.Tensor], cfg: dict[str, Any], full: bool) -> dict[str, float]:
    model.eval()
    if task == "digits":
        logits = model(data["x_val"])
        out = {
            "loss": float(F.cross_entropy(logits, data["y_val"])),
            "acc": float((logits.argmax(1) == data["y_val"]).float().mean()),
        }
    else:
        ctx = cfg["context"]
        val = data["val"]
        n_win = (val.numel() - 1) // ctx
        starts = torch.arange(n_win) * ctx
        if not full:  # a fixed, evenly spread subset for the intermediate curve points
            keep = min(n_win, cfg["eval_batches"] * cfg["batch_size"])
            starts = starts[torch.linspace(0, n_win - 1, keep).long()]
        total_loss, total_tok, correct = 0.0, 0, 0
        for chunk in starts.split(256):
            idx = chunk[:, None] + torch.arange(ctx + 1)
            seq = val[idx]
            logits = model(seq[:, :-1])
            tgt = seq[:, 1:]
            total_loss += float(F.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1), reduction="sum"))
            correct += int((logits.argmax(-1) == tgt).sum())
            total_tok += tgt.numel()
        loss = total_loss / total_tok
        out = {"loss": loss, "acc": correct / total_tok, "bits_per_char": loss / math.log(2)}
    model.train()
    return out


def batch_loss(task: str, model: nn.Module, data: dict[str, torch.Tensor], cfg: dict[str, Any],
               gen: torch.Generator) -> torch.Tensor:
    """The training loss of one random batch (drawn from ``gen``)."""
    if task == "digits":
        idx = torch.randint(0, data["x_train"].shape[0], (cfg["batch_size"],), generator=gen)
        return F.cross_entropy(model(data["x_train"][idx]), data["y_train"][idx])
    ctx = cfg["context"]
    starts = torch.randint(0, data["train"].numel() - ctx - 1, (cfg["batch_size"],), generator=gen)
    seq = data["train"][starts[:, None] + torch.arange(ctx + 1)]
    return F.cross_entropy(model(seq[:, :-1]).reshape(-1, VOCAB), seq[:, 1:].reshape(-1))


def train_run(task: str, opt_name: str, lr: float, seed: int, data: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, Any]:
    model = build(task, cfg, seed)
    opt = make_optimizer(opt_name, model, task, lr, cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(10_000 + seed)
    steps = cfg["steps"]
    curve: list[dict[str, float]] = []
    train_ema = None
    diverged = False
    t0 = time.perf_counter()
    eval_s = 0.0
    for step in range(steps):
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * lr_factor(step, steps)
        loss = batch_loss(task, model, data, cfg, gen)
        if not torch.isfinite(loss):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        opt.step()
        value = float(loss.detach())
        train_ema = value if train_ema is None else 0.9 * train_ema + 0.1 * value
        if (step + 1) % cfg["eval_every"] == 0 and step + 1 < steps:
            train_s = time.perf_counter() - t0 - eval_s  # training time so far, evaluations excluded
            e0 = time.perf_counter()
            ev = evaluate(task, model, data, cfg, full=False)
            eval_s += time.perf_counter() - e0
            curve.append({"step": step + 1, "train_loss": train_ema, "val_loss": ev["loss"], "train_s": round(train_s, 2)})
    train_s = time.perf_counter() - t0 - eval_s
    if diverged:
        final = {"loss": float("inf"), "acc": 0.0}
    else:
        final = evaluate(task, model, data, cfg, full=True)
        curve.append({"step": steps, "train_loss": train_ema, "val_loss": final["loss"], "train_s": round(train_s, 2)})
    rec = {
        "optimizer": opt_name,
        "lr": lr,
        "seed": seed,
        "val_loss": final["loss"],
        "val_acc": final["acc"],
        "diverged": diverged or not math.isfinite(final["loss"]),
        "time_s": round(time.perf_counter() - t0, 2),
        "train_s": round(train_s, 2),
        "curve": curve,
    }
    if "bits_per_char" in final:
        rec["val_bits_per_char"] = final["bits_per_char"]
    if isinstance(opt, (Shampoo4bit, SOAP4bit)):
        rec["counters"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in opt.counters.items()}
    return rec


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def run_task(task: str, cfg: dict[str, Any], optimizers: list[str], seeds: int, log,
             reused: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sweep and final runs of every optimizer; ``reused`` (an earlier run of this task with the
    same settings) supplies the records of the optimizers it holds."""
    if task == "digits":
        data = load_digits_split()
        data_info = {"source": "sklearn.datasets.load_digits", "train": int(data["y_train"].numel()),
                     "val": int(data["y_val"].numel()), "split": "DigitsDataModule (stratified, seed 0)"}
    else:
        data, data_info = load_char_data(cfg["chars"])
    sweep: dict[str, dict[str, Any]] = {}
    best: dict[str, float] = {}
    all_lrs = sorted(cfg["lrs"])
    lr_for = cfg.get("lr_for", {})  # --lr-for: one fixed lr (no sweep) for these optimizers

    def try_lr(name: str, lr: float) -> None:
        rec = train_run(task, name, lr, 0, data, cfg)
        sweep[name][repr(lr)] = rec
        log(f"[{task}] sweep {name:9s} lr={lr:<7g} val_loss={rec['val_loss']:.4f} acc={rec['val_acc']:.4f} "
            f"({rec['time_s']:.1f}s)")

    def pick(name: str) -> float:
        runs = sweep[name]
        ok = [k for k, r in runs.items() if not r["diverged"]]
        return float(min(ok or runs, key=lambda k: runs[k]["val_loss"]))

    reused = reused or {"sweep": {}, "best_lr": {}, "final": {}}
    for name in optimizers:
        if name in reused["final"]:
            sweep[name], best[name] = reused["sweep"][name], reused["best_lr"][name]
            log(f"[{task}] {name}: reused from the earlier results (lr {best[name]:g})")
            continue
        sweep[name] = {}
        lrs = [lr_for[name]] if name in lr_for else all_lrs
        for lr in lrs:
            try_lr(name, lr)
        # A best lr on the edge of the grid is not a best lr: extend the grid that way (same ratio).
        if len(lrs) > 1:
            up, down = lrs[-1] / lrs[-2], lrs[0] / lrs[1]
            for _ in range(cfg.get("max_extend", 2)):
                tried = sorted(float(k) for k in sweep[name])
                if pick(name) == tried[-1]:
                    try_lr(name, float(f"{tried[-1] * up:.3g}"))
                elif pick(name) == tried[0]:
                    try_lr(name, float(f"{tried[0] * down:.3g}"))
                else:
                    break
            # One refinement: the geometric midpoint between the best lr and its better neighbour.
            tried = sorted(float(k) for k in sweep[name])
            i = tried.index(pick(name))
            neighbours = [tried[j] for j in (i - 1, i + 1) if 0 <= j < len(tried)]
            if neighbours and cfg.get("refine", True):
                runs = sweep[name]
                other = min(neighbours, key=lambda lr: runs[repr(lr)]["val_loss"])
                try_lr(name, float(f"{math.sqrt(pick(name) * other):.3g}"))
        best[name] = pick(name)
    finals: dict[str, Any] = {}
    for name in optimizers:
        if name in reused["final"]:
            finals[name] = reused["final"][name]
            continue
        lr = best[name]
        runs = [sweep[name][repr(lr)]]
        for seed in range(1, seeds):
            rec = train_run(task, name, lr, seed, data, cfg)
            runs.append(rec)
            log(f"[{task}] final {name:9s} lr={lr:<7g} seed={seed} val_loss={rec['val_loss']:.4f} "
                f"acc={rec['val_acc']:.4f} ({rec['time_s']:.1f}s)")
        finite = [r for r in runs if not r["diverged"]]
        finals[name] = {
            "lr": lr,
            "lrs_tried": sorted(float(k) for k in sweep[name]),
            "lr_at_sweep_edge": len(sweep[name]) > 1 and lr in (min(map(float, sweep[name])), max(map(float, sweep[name]))),
            "seeds": [r["seed"] for r in runs],
            "val_loss": summarize([r["val_loss"] for r in finite]) if finite else None,
            "val_acc": summarize([r["val_acc"] for r in finite]) if finite else None,
            "diverged_runs": len(runs) - len(finite),
            "runs": runs,
        }
        if task == "charlm" and finite:
            finals[name]["val_bits_per_char"] = summarize([r["val_bits_per_char"] for r in finite])
    return {"config": cfg, "data": data_info, "sweep": sweep, "best_lr": best, "final": finals}


# -- plots --------------------------------------------------------------------------------------
def plot_task(task: str, res: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for name, fin in res["final"].items():
        runs = [r for r in fin["runs"] if not r["diverged"]]
        if not runs:
            continue
        steps = [p["step"] for p in runs[0]["curve"]]
        vals = torch.tensor([[p["val_loss"] for p in r["curve"]] for r in runs if len(r["curve"]) == len(steps)])
        mean = vals.mean(0)
        ax.plot(steps, mean, marker="o", ms=3, label=f"{LABELS[name]} (lr {fin['lr']:g})")
        if vals.shape[0] > 1:
            ax.fill_between(steps, vals.min(0).values, vals.max(0).values, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{task}: validation loss, best lr, mean and min-max over seeds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    lo = min((min(p["val_loss"] for p in r["curve"]) for f in res["final"].values() for r in f["runs"] if r["curve"] and not r["diverged"]), default=None)
    if lo is not None:
        hi = max(r["curve"][len(r["curve"]) // 3]["val_loss"] for f in res["final"].values() for r in f["runs"] if r["curve"] and not r["diverged"])
        ax.set_ylim(lo - 0.05 * (hi - lo), hi)
    ax = axes[1]
    for name, per_lr in res["sweep"].items():
        lrs = sorted(float(k) for k in per_lr)
        vals = [per_lr[repr(lr)]["val_loss"] for lr in lrs]
        vals = [v if math.isfinite(v) else float("nan") for v in vals]
        ax.plot(lrs, vals, marker="o", label=LABELS[name])
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss (seed 0)")
    ax.set_title(f"{task}: learning-rate sweep")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"quality_{task}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path.name)
    return paths


def time_to_quality(res: dict[str, Any], target: str = "adamw") -> dict[str, Any]:
    """From the first run of every optimizer (seed 0 at its best lr): the training time (``train_s``,
    evaluations excluded) at which its validation loss first reaches ``target``'s final loss
    (linear between evaluations), and that time over ``target``'s whole training time."""
    if target not in res["final"]:
        return {}
    ref = res["final"][target]["runs"][0]
    goal, total = ref["val_loss"], ref.get("train_s")
    out: dict[str, Any] = {"target": target, "target_val_loss": goal, "target_train_s": total, "optimizers": {}}
    for name, fin in res["final"].items():
        run = fin["runs"][0]
        pts = [(0.0, float("inf"))] + [(p["train_s"], p["val_loss"]) for p in run["curve"] if "train_s" in p]
        hit = None
        for (t0, v0), (t1, v1) in zip(pts, pts[1:]):
            if v1 <= goal:
                hit = t1 if not math.isfinite(v0) else t0 + (t1 - t0) * (v0 - goal) / (v0 - v1)
                break
        out["optimizers"][name] = {"train_s": run.get("train_s"), "reaches_target_s": hit,
                                   "vs_target_time": None if hit is None or not total else hit / total}
    return out


def plot_time(task: str, res: dict[str, Any], out: Path) -> str | None:
    """Validation loss against training time (first run of every optimizer), where recorded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn = False
    for name, fin in res["final"].items():
        pts = [(p["train_s"], p["val_loss"]) for p in fin["runs"][0]["curve"] if "train_s" in p]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=f"{LABELS[name]} (lr {fin['lr']:g})")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    goal = res.get("time_to_quality", {}).get("target_val_loss")
    if goal is not None:
        ax.axhline(goal, color="grey", lw=0.8, ls="--", label="AdamW's final val loss")
    ax.set_xlabel("training time (s, one thread, evaluations excluded)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{task}: validation loss against time (seed 0)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    vals = [p["val_loss"] for f in res["final"].values() for p in f["runs"][0]["curve"]]
    ax.set_ylim(min(vals) - 0.05, min(max(vals), 3.0))
    fig.tight_layout()
    path = out / f"quality_{task}_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.split("\n\n")[0], NAME)
    parser.add_argument("--tasks", nargs="+", default=["digits", "charlm"], choices=["digits", "charlm"])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS + OPTIONAL)
    parser.add_argument("--seeds", type=int, default=None, help="seeds for the final runs (default 3; 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="override the training steps of every task")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="override the learning-rate grid")
    parser.add_argument("--lr-for", nargs="+", default=[], metavar="NAME=LR",
                        help="run these optimizers at this one lr (no sweep), e.g. for a timing run at known best lrs")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--reuse", nargs="+", default=[], choices=OPTIMIZERS + OPTIONAL,
                        help="take these optimizers' records from --reuse-from (same task settings only)")
    parser.add_argument("--reuse-from", type=Path, default=Path(__file__).resolve().parent / "results" / "quality.json",
                        help="the earlier results file for --reuse")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    run = setup_run(args)
    seeds = args.seeds or (1 if args.quick else 3)
    configs = QUICK if args.quick else FULL

    def log(msg: str) -> None:
        print(msg, flush=True)

    results: dict[str, Any] = {}
    for task in args.tasks:
        cfg = dict(configs[task])
        if args.steps:
            cfg["steps"] = args.steps
            cfg["eval_every"] = max(1, min(cfg["eval_every"], args.steps // 4 or 1))
        if args.lrs:
            cfg["lrs"] = list(args.lrs)
        if args.lr_for:
            cfg["lr_for"] = {k: float(v) for k, v in (item.split("=", 1) for item in args.lr_for)}
        reused = None
        if args.reuse:
            import json

            earlier = json.loads(args.reuse_from.read_text())["tasks"].get(task)
            if earlier is None or earlier["config"] != cfg:
                parser.error(f"--reuse: {args.reuse_from} has no {task} run with these settings")
            reused = {k: {n: earlier[k][n] for n in args.reuse if n in earlier["final"]}
                      for k in ("sweep", "best_lr", "final")}
            missing = [n for n in args.reuse if n not in earlier["final"]]
            if missing:
                parser.error(f"--reuse: {args.reuse_from} has no {task} records for {missing}")
        t0 = time.perf_counter()
        results[task] = run_task(task, cfg, list(args.optimizers), seeds, log, reused)
        results[task]["wall_s"] = round(time.perf_counter() - t0, 1)
        results[task]["time_to_quality"] = time_to_quality(results[task])
        if not args.no_plots:
            results[task]["plots"] = plot_task(task, results[task], args.out)
            time_plot = plot_time(task, results[task], args.out)
            if time_plot:
                results[task]["plots"].append(time_plot)

    for task, res in results.items():
        metric = "val bits/char" if task == "charlm" else "val acc %"
        rows = []
        for name, fin in res["final"].items():
            loss = fin["val_loss"]
            if task == "charlm":
                sec = fin.get("val_bits_per_char")
                sec_txt = None if sec is None else f"{sec['mean']:.4f} ± {sec['std']:.4f}"
            else:
                acc = fin["val_acc"]
                sec_txt = None if acc is None else f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}"
            loss_txt = "diverged" if loss is None else f"{loss['mean']:.4f} ± {loss['std']:.4f}"
            spread = None if loss is None else f"[{loss['min']:.4f}, {loss['max']:.4f}]"
            edge = " (edge)" if fin["lr_at_sweep_edge"] else ""
            rows.append([LABELS[name], f"{fin['lr']:g}{edge}", loss_txt, spread, sec_txt, len(fin["seeds"])])
        print(f"\n{task}: final validation at the best lr ({res['config']['steps']} steps, mean ± std over seeds)")
        print(table(["optimizer", "best lr", "val loss", "min/max", metric, "seeds"], rows))

    payload = {
        "settings": {
            "optimizers": {n: LABELS[n] for n in args.optimizers},
            "shampoo": {n: kw for n, kw in SHAMPOO_KW.items() if n in args.optimizers},
            "soap": {n: kw for n, kw in SOAP_KW.items() if n in args.optimizers},
            "schedule": f"linear warm-up {WARMUP_FRACTION:.0%} of steps, cosine to {FINAL_LR_FRACTION:g} x lr",
            "grad_clip_norm": CLIP_NORM,
            "adam_betas": [0.9, 0.999],
            "muon": "torch.optim.Muon(momentum=0.95, nesterov=True, ns_steps=5, adjust_lr_fn='match_rms_adamw') "
            "on hidden 2-D weights; AdamW (same lr and wd) on the rest",
            "selection": "best lr by final validation loss on seed 0 (grid extended up to twice past an edge "
            "winner, same ratio; then one run at the geometric midpoint of the best lr and its better "
            "neighbour); that lr rerun on seeds 1..n-1",
            "seeds": seeds,
            "quick": args.quick,
        },
        "tasks": results,
    }
    path = write_result(args.out, NAME, payload, run, argv)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
