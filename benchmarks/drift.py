"""Drift of the stored preconditioner over many statistics updates: each variant of
``Shampoo4bit`` is fed the same gradient sequence as an exact float64 Shampoo shadow, and after
every statistics update (PU) and inverse-root update (PIRU) its state is compared with the
shadow's. A one-time quantization error that grows with every re-quantization shows up here and
nowhere in the one-shot quantization-error benchmark.

Streams (one weight matrix each, gradients G_t of shape m x n, left factor order m, right n)
---------------------------------------------------------------------------------------------
``synthetic``       G_t = A Z_t B, Z_t i.i.d. Gaussian, A and B fixed with log-spaced singular
                    values and random orthogonal singular vectors such that both Kronecker
                    factors have condition number ``--cond`` (default 1e4). 128 x 256.
``synthetic1200``   the same with order 1200 on the left (1200 x 128), fewer updates (slow on CPU).
``charlm``          per-step gradients of ``blocks.0.fc1.weight`` (512 x 128) of the char-level
                    transformer of ``quality.py``, AdamW lr 4e-3, its warm-up + cosine schedule,
                    clipping at norm 1, seed 0.
``digits``          per-step gradients of the second hidden layer ``body.3.weight`` (256 x 256) of
                    the digits MLP of ``quality.py``, AdamW lr 3e-3, same protocol.
Captured streams are cached under ``--cache`` (a temporary folder) and regenerated when absent.

Variants (stat_interval 1, root_interval ``--root-interval``)
-------------------------------------------------------------
``shampoo4`` / ``shampoo8`` / ``shampoo32`` / ``naive4``: ``Shampoo4bit`` as in
``_common.SHAMPOO_VARIANTS``. ``eigen32``: the 4-bit eigen-mode pipeline with fp32 eigenvectors
and root (its error is the subspace iteration's tracking error alone). ``oneshot4``: the
shadow's exact eigenvectors quantized once to 4 bits (4 Björck steps), the root built from them
with the exact eigenvalues and stored like the optimizer's root - the error floor of a
4-bit-eigenvector state that never re-quantizes (no statistic: it is the shadow's own).
``exactroot4``: the shadow's exact root stored at 4 bits like the eigenvector storage's root
(Linear-2, blocks of 256) - the floor of any state whose root is stored that way, however exact
its statistic; ``exactroot4_default``: the same with the default storage's root layout
(Linear-1.5, blocks of 40).
``cholesky4``: ``quantize="cholesky"``, 4 bits (the Cholesky factor of the statistic with error
feedback, Li et al. 2025); ``cholesky4_noef``: the same with the error feedback switched off.
``cholesky8``: ``quantize="cholesky8"``, 4 bits: the Cholesky factor with 8-bit codes and no
error-feedback state (the bytes of ``cholesky4``'s two 4-bit triangles), the root at 4 bits.
``chol8sr``: ``CholeskyFactor``, a reference of ``cholesky8`` with stochastic rounding of the
factor's codes instead of rounding to nearest.
``hh8`` / ``hh8x2`` / ``hh8x3`` / ``hh8r4x2``: ``HouseholderFactor``, a reference of a proposed
storage not in the optimizer: eigenvectors as 8-bit Householder reflectors (half the entries of
U, so the bytes of 4-bit U), the root's triangle with 8-bit codes, 1, 2 or 3 subspace
iterations per PU; ``hh8r4x2``: 2 iterations and a 4-bit root (fewer bytes than ``shampoo4``).

Measures, per update t (float64; roots with relative damping rho = eps * lambda_max)
-------------------------------------------------------------------------------------
``stat_nre``  ||F - L_t||_F / ||L_t||_F, F = ``Factor.factor()``, L_t the shadow's statistic
``root_nre``  ||R - (L_t + rho I)^-1/4||_F / ||(L_t + rho I)^-1/4||_F, R = ``Factor.root()``
``cosine``    cosine between R_L G_t R_R (the variant's stored roots) and the exact
              L_t^-1/4 G_t R_t^-1/4 (the direction before grafting)
Measured at root updates only (every update with the default ``--root-interval 1``).

SOAP (``--soap``, written to ``drift_soap.json``)
-------------------------------------------------
``SOAP4bit`` variants (``SOAP_DRIFT_VARIANTS``: how the statistics L, R and the eigenvector
matrices are stored) fed the same gradient stream as a float64 shadow of the statistics
(``L_t = b L + (1 - b) G G^T``, ``b = 0.95``) and as the fp32 SOAP (``bits=32``). After every
eigenbasis refresh (``precondition_frequency`` 10) and at every step:

``basis_offdiag``  ||offdiag(Q^T L_t Q)||_F / ||L_t||_F for the variant's stored (dequantized)
                   eigenbasis Q of each side (mean of L and R): how far Q is from diagonalizing
                   the exact statistic (fp32 SOAP's own figure is its power iteration's lag)
``cosine``         cosine between the variant's update and fp32 SOAP's at the same step
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import QUICK_DIR, SHAMPOO_VARIANTS, base_parser, setup_run, table, write_result

from lightning_shampoo4 import Shampoo4bit, linalg
from lightning_shampoo4.optim.validation import STORAGE_DEFAULTS, STORAGE_FALLBACK
from lightning_shampoo4.quant import dequantize, dequantize_symmetric, get_codebook, quantize, quantize_symmetric

NAME = "drift"
BETA = 0.95
EPS = 1e-6
CHECKPOINTS = (1, 20, 100, 500)
DEFAULT_VARIANTS = (
    "shampoo4", "shampoo8", "eigen32", "shampoo32", "naive4", "oneshot4", "cholesky4", "cholesky4_noef",
    "hh8", "hh8x2", "hh8x3", "hh8r4x2", "cholesky8", "chol8sr", "exactroot4", "exactroot4_default",
)
# the 4-bit pipeline (Björck, EMA, subspace iteration) with fp32 eigenvectors and root: its
# error is the subspace iteration's tracking error alone, no quantization
EXTRA_VARIANTS = {
    "eigen32": dict(bits=4, quantize="eigenvectors", min_quant_numel=2**62),
    "cholesky4": dict(bits=4, quantize="cholesky"),
    "cholesky4_noef": dict(bits=4, quantize="cholesky"),
}
# scale of the carried quantization error in cholesky mode (CholeskyStorage._feedback; 1: the default)
FEEDBACK = {"cholesky4_noef": 0.0}
# the proposed storage (``HouseholderFactor``): 1, 2 or 3 subspace iterations per PU, 8- or 4-bit root
PROPOSALS = {"hh8": dict(iters=1), "hh8x2": dict(iters=2), "hh8x3": dict(iters=3), "hh8r4x2": dict(iters=2, root_bits=4)}
# ``CholeskyFactor``: ``cholesky8`` with stochastic rounding of the factor's codes
CHOLESKY_PROPOSALS = {"chol8sr": dict(stochastic=True)}
CACHE_DIR = Path("/tmp") / "lightning_shampoo4_drift"

FULL = {
    "synthetic": dict(kind="synthetic", m=128, n=256, updates=600),
    "synthetic1200": dict(kind="synthetic", m=1200, n=128, updates=100,
                          variants=("shampoo4", "eigen32", "oneshot4", "hh8", "hh8x2", "hh8r4x2")),
    "charlm": dict(kind="charlm", updates=500),
    "digits": dict(kind="digits", updates=600),
}
QUICK = {
    "synthetic": dict(kind="synthetic", m=64, n=96, updates=25),
    "digits": dict(kind="digits", updates=12, hidden=64),
    "charlm": dict(kind="charlm", updates=8, d_model=64, chars=20_000, context=16, batch_size=8),
}


# -- gradient streams ------------------------------------------------------------------------
def _factor_half(order: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    """Q diag(s) with log-spaced s, s_max / s_min = sqrt(cond): Q diag(s^2) Q^T has condition cond."""
    q, _ = torch.linalg.qr(torch.randn(order, order, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -0.5 * math.log10(cond), order, dtype=torch.float64)
    return q * s


def synthetic_stream(m: int, n: int, steps: int, cond: float = 1e4, seed: int = 0) -> Iterator[torch.Tensor]:
    """G_t = A Z_t B with E[G G^T] ~ A A^T and E[G^T G] ~ B^T B, both of condition ``cond``."""
    gen = torch.Generator().manual_seed(seed)
    a = _factor_half(m, cond, gen)
    b = _factor_half(n, cond, gen).T
    scale = 1.0 / math.sqrt(m * n)
    for _ in range(steps):
        z = torch.randn(m, n, generator=gen, dtype=torch.float64)
        yield (scale * (a @ z @ b)).float()


def _capture(task: str, steps: int, cfg: dict[str, Any], lr: float, param: str, seed: int = 0) -> torch.Tensor:
    """Per-step gradients of one weight matrix during AdamW training of a ``quality.py`` model."""
    import quality

    if task == "digits":
        data = quality.load_digits_split()
    else:
        data, _ = quality.load_char_data(cfg["chars"])
    model = quality.build(task, cfg, seed)
    weight = dict(model.named_parameters())[param]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg["weight_decay"])
    gen = torch.Generator().manual_seed(10_000 + seed)
    grads = torch.empty(steps, *weight.shape)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * quality.lr_factor(step, steps)
        loss = quality.batch_loss(task, model, data, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), quality.CLIP_NORM)
        grads[step] = weight.grad.detach()
        opt.step()
    return grads


def captured_stream(task: str, steps: int, cache: Path | None, **overrides: Any) -> Iterator[torch.Tensor]:
    """The gradients of ``task``'s tracked matrix, from ``cache`` if captured before."""
    import quality

    cfg = dict(quality.FULL[task])
    cfg.update(overrides)
    if task == "digits":
        lr, param = 3e-3, "body.3.weight"
    else:
        lr, param = 4e-3, "blocks.0.fc1.weight"
    key = "_".join([task, str(steps)] + [f"{k}{v}" for k, v in sorted(overrides.items())])
    path = cache / f"{key}.pt" if cache is not None else None
    if path is not None and path.exists():
        grads = torch.load(path)
    else:
        grads = _capture(task, steps, cfg, lr, param)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(grads, path)
    yield from grads


def make_stream(spec: dict[str, Any], updates: int, cond: float, cache: Path | None) -> Iterator[torch.Tensor]:
    if spec["kind"] == "synthetic":
        return synthetic_stream(spec["m"], spec["n"], updates, cond)
    overrides = {k: v for k, v in spec.items() if k not in ("kind", "updates", "variants")}
    return captured_stream(spec["kind"], updates, cache, **overrides)


# -- SOAP: the stored statistics and eigenbases against a float64 shadow -----------------------
SOAP_DRIFT_VARIANTS: dict[str, dict[str, Any]] = {
    "soap32": dict(bits=32),
    "q4_dense": dict(bits=4, statistics="dense", second_moment="full", moment_bits=32),
    "q4_cholesky8": dict(bits=4, statistics="cholesky8", second_moment="full", moment_bits=32),
    "q4_rotated8": dict(bits=4, statistics="rotated8", second_moment="full", moment_bits=32),
    "q4_rotated4": dict(bits=4, statistics="rotated4", second_moment="full", moment_bits=32),
    "q4_eigen": dict(bits=4, statistics="eigen", second_moment="full", moment_bits=32),
    "q4_rotated4_bjorck1": dict(bits=4, statistics="rotated4", bjorck_steps=1, second_moment="full", moment_bits=32),
    "soap4_default": dict(bits=4),
}


def soap_drift(grads: Iterator[torch.Tensor], updates: int, variants: list[str], frequency: int = 10) -> dict[str, Any]:
    """Feed every SOAP variant the stream; basis error against the float64 shadow statistics and
    update cosine against fp32 SOAP, per step."""
    from lightning_shampoo4.optim.soap import SOAP4bit

    runs: dict[str, Any] = {}
    shadow_l = shadow_r = None
    first = None
    for t, g in enumerate(grads):
        if t >= updates:
            break
        if first is None:
            first = g
            for name in variants:
                p = torch.nn.Parameter(torch.zeros_like(g))
                opt = SOAP4bit([p], lr=1.0, shampoo_beta=BETA, precondition_frequency=frequency,
                               max_precondition_dim=max(g.shape), **SOAP_DRIFT_VARIANTS[name])
                runs[name] = {"p": p, "opt": opt, "basis": [], "cosine": [], "steps": []}
        g64 = g.double()
        gl, gr = g64 @ g64.T, g64.T @ g64
        shadow_l = (1 - BETA) * gl if shadow_l is None else BETA * shadow_l + (1 - BETA) * gl
        shadow_r = (1 - BETA) * gr if shadow_r is None else BETA * shadow_r + (1 - BETA) * gr
        directions = {}
        for name, r in runs.items():
            before = r["p"].detach().clone()
            r["p"].grad = g.clone()
            r["opt"].step()
            directions[name] = (before - r["p"].detach()).double()
        ref = directions.get("soap32")
        for name, r in runs.items():
            errs = []
            for _, _, side, q in r["opt"].eigenbases():
                stat = shadow_l if side == "L" else shadow_r
                rot = q.double().T @ stat @ q.double()
                off = rot - torch.diag(rot.diagonal())
                errs.append(float(off.norm() / stat.norm()))
            r["steps"].append(t + 1)
            r["basis"].append(sum(errs) / len(errs))
            if ref is not None and t > 0:
                r["cosine"].append(_cos(directions[name], ref))
    out = {}
    for name, r in runs.items():
        late = r["basis"][len(r["basis"]) // 2:]
        cos_late = r["cosine"][len(r["cosine"]) // 2:]
        out[name] = {"settings": SOAP_DRIFT_VARIANTS[name], "basis_offdiag": r["basis"], "cosine": r["cosine"],
                     "basis_offdiag_mean_second_half": sum(late) / len(late),
                     "cosine_mean_second_half": sum(cos_late) / len(cos_late) if cos_late else None,
                     "state_bytes": r["opt"].memory_report()}
    return {"shape": list(first.shape), "updates": updates, "frequency": frequency, "variants": out}


# -- the exact shadow ----------------------------------------------------------------------------
def exact_eigh(stat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a float64 statistic."""
    w, v = torch.linalg.eigh(stat)
    return w.clamp(min=0), v


def exact_root(stat: torch.Tensor, eps: float = EPS, eig: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(L + eps * lambda_max I)^-1/4 in float64 (negative eigenvalues clamped at 0)."""
    w, v = exact_eigh(stat) if eig is None else eig
    return (v * (w + eps * w.max()).pow(-0.25)) @ v.T


class Shadow:
    """Exact Shampoo statistics in float64: L_t = beta L_{t-1} + (1 - beta) G G^T from eps I."""

    def __init__(self, m: int, n: int, beta: float = BETA, eps: float = EPS):
        self.beta = beta
        self.stats = {
            "L": eps * torch.eye(m, dtype=torch.float64),
            "R": eps * torch.eye(n, dtype=torch.float64),
        }

    def update(self, g: torch.Tensor) -> None:
        g = g.double()
        self.stats["L"].mul_(self.beta).add_(g @ g.T, alpha=1 - self.beta)
        self.stats["R"].mul_(self.beta).add_(g.T @ g, alpha=1 - self.beta)


# -- variants ------------------------------------------------------------------------------------
class FactorLike(Protocol):
    """What the benchmark reads from one factor (the public view of ``Factor``)."""

    def factor(self) -> torch.Tensor: ...

    def root(self) -> torch.Tensor: ...


class Variant(Protocol):
    def step(self, g: torch.Tensor, t: int) -> None: ...

    def factors(self) -> dict[str, FactorLike | None]: ...


class OptimizerVariant:
    """``Shampoo4bit`` on one m x n parameter, lr 0, fed the stream as its gradient."""

    def __init__(self, m: int, n: int, root_interval: int, feedback: float | None = None, **kwargs: Any):
        self.param = torch.nn.Parameter(torch.zeros(m, n))
        self.opt = Shampoo4bit(
            [self.param], lr=0.0, weight_decay=0.0, stat_interval=1, root_interval=root_interval,
            shampoo_beta=BETA, matrix_eps=EPS, max_order=max(m, n), **kwargs,
        )
        if feedback is not None:  # cholesky mode only: the storage objects are the optimizer's own
            self.opt.init_state()
            for _, _, _, f in self.opt.factors():
                f.storage._feedback = feedback

    def step(self, g: torch.Tensor, t: int) -> None:
        self.param.grad = g.clone()
        self.opt.step()

    def factors(self) -> dict[str, FactorLike | None]:
        return {side: f for _, block, side, f in self.opt.factors() if block == 0}

    def nbytes(self) -> int:
        """Bytes of the second-order state (both factors)."""
        return int(self.opt.memory_report()["second_order"])


class FactorPairVariant:
    """A pair of stand-alone factor objects with ``update_stats(M)``, ``update_root()``,
    ``factor()`` and ``root()`` (prototypes of other storage schemes use this)."""

    def __init__(self, m: int, n: int, root_interval: int, make: Callable[[int], Any]):
        self.sides = {"L": make(m), "R": make(n)}
        self.root_interval = root_interval

    def step(self, g: torch.Tensor, t: int) -> None:
        g = g.float()
        self.sides["L"].update_stats(g @ g.T)
        self.sides["R"].update_stats(g.T @ g)
        if t % self.root_interval == 0:
            for f in self.sides.values():
                f.update_root()

    def factors(self) -> dict[str, FactorLike | None]:
        return dict(self.sides)

    def nbytes(self) -> int | None:
        sizes = [getattr(f, "state_bytes", lambda: None)() for f in self.sides.values()]
        return None if None in sizes else sum(sizes)


# The eigenvector storage's layout: Linear-2 codes, bf16 block scales, eigenvectors in blocks of
# 64 along each eigenvector, symmetric roots as fp32 diagonal + strict upper triangle in blocks
# of 256 (``Shampoo4bit``'s storage settings for quantize="eigenvectors").
SCALE_DTYPE = torch.bfloat16
ROOT_BLOCK = STORAGE_FALLBACK["root_block_size"]
# the default storage's (quantize="cholesky8"): its codebook, factor block, root block
C8 = STORAGE_DEFAULTS["cholesky8"]


def _qdq_eigvecs(v: torch.Tensor, bits: int = 4, block: int = 64) -> torch.Tensor:
    """Eigenvectors (columns) stored as U^T row-wise, and back."""
    cb = get_codebook("linear2", bits)
    q = quantize(v.float(), cb, bits, block, transpose=True, scale_dtype=SCALE_DTYPE)
    return dequantize(q, cb, tuple(v.shape), bits, block, transpose=True).double()


def _qdq_symmetric(x: torch.Tensor, bits: int = 4, block: int = ROOT_BLOCK, codebook: str = "linear2") -> torch.Tensor:
    """A symmetric matrix stored as fp32 diagonal + quantized strict upper triangle, and back."""
    cb = get_codebook(codebook, bits)
    q = quantize_symmetric(x.float(), cb, bits, block, scale_dtype=SCALE_DTYPE)
    return dequantize_symmetric(q, cb, x.shape[0], bits, block).double()


def oneshot_root(stat: torch.Tensor, eps: float = EPS, bjorck_steps: int = 4,
                 eig: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The root a 4-bit eigenvector state would give if it quantized the exact eigenvectors once."""
    w, v = exact_eigh(stat) if eig is None else eig
    if stat.shape[0] ** 2 < 4096:  # below min_quant_numel the optimizer keeps fp32
        return (v * (w + eps * w.max()).pow(-0.25)) @ v.T
    vq = linalg.bjorck(_qdq_eigvecs(v), bjorck_steps)
    return _qdq_symmetric((vq * (w + eps * w.max()).pow(-0.25)) @ vq.T)


def exact_root4(stat: torch.Tensor, eps: float = EPS, eig: tuple[torch.Tensor, torch.Tensor] | None = None,
                *, block: int = ROOT_BLOCK, codebook: str = "linear2") -> torch.Tensor:
    """The exact root of ``stat`` stored as the eigenvector storage stores its 4-bit roots."""
    root = exact_root(stat, eps, eig)
    return _qdq_symmetric(root, 4, block, codebook) if stat.shape[0] ** 2 >= 4096 else root


def exact_root4_default(stat: torch.Tensor, eps: float = EPS,
                        eig: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The exact root of ``stat`` stored as the default storage stores its 4-bit roots."""
    return exact_root4(stat, eps, eig, block=C8["root_block_size"], codebook=C8["codebook"])


# references computed from the shadow's statistic at each measurement (no state of their own)
SHADOW_REFERENCES = {"oneshot4": oneshot_root, "exactroot4": exact_root4, "exactroot4_default": exact_root4_default}


class HouseholderFactor:
    """Reference of a proposed storage (not in the optimizer): the eigenvectors kept as the
    Householder reflectors of the subspace iteration's QR with ``bits``-bit codes, the root
    stored like the optimizer's (fp32 diagonal + strict upper triangle) with ``root_bits``-bit
    codes. Both hold n(n-1)/2 codes, so 8-bit codes cost what 4-bit codes of a full matrix cost.

    ``geqrf(A V)`` gives P = H_1 ... H_n, H_k = I - tau_k v_k v_k^T, v_k = e_k plus the k-th
    column of its strictly lower part. That part is stored with the optimizer's triangle codec
    (as the strict upper triangle of its transpose: one reflector per row, blocks of ``block``,
    ``codebook`` codes; the codec's diagonal slot is not needed), plus one flag per reflector
    for tau_k = 0. On load tau_k = 2 / ||v_k||^2 from the dequantized v_k, so the rebuilt basis
    is orthogonal to round-off whatever the codes (no Björck step), and re-quantizing an
    unchanged basis gives the same codes, so an update adds noise only where the basis moved.
    PU: V = rebuild, A = beta V diag(lambda) V^T + (1 - beta) M, ``iters`` warm-started
    subspace iterations (the last through geqrf), lambda = diag(P^T A P).
    PIRU: V diag((lambda + rho)^-1/4) V^T (V the PU's fp32 P when a PU just ran, as in the
    optimizer), stored symmetric.
    """

    def __init__(self, n: int, *, bits: int = 8, block: int = 64, codebook: str = "linear", root_bits: int = 8,
                 iters: int = 1, beta: float = BETA, eps: float = EPS):
        self.n, self.bits, self.block, self.codebook, self.root_bits = n, bits, block, codebook, root_bits
        self.iters, self.beta, self.eps = iters, beta, eps
        self.quantized = n * n >= 4096
        self.reflectors = torch.zeros(n, n)  # strictly lower part used
        self.identity = torch.ones(n, dtype=torch.bool)  # tau_k = 0: V = I
        self.lam = torch.full((n,), eps)
        self._root = torch.eye(n)
        self._fresh: torch.Tensor | None = None

    def eigvecs(self) -> torch.Tensor:
        a = torch.tril(self.reflectors, -1) + torch.eye(self.n)
        tau = torch.where(self.identity, torch.zeros(self.n), 2.0 / (a * a).sum(0))
        return torch.linalg.householder_product(a, tau)

    def update_stats(self, m: torch.Tensor) -> None:
        v = self.eigvecs()
        a = self.beta * ((v * self.lam) @ v.T) + (1 - self.beta) * m.float()
        for _ in range(self.iters - 1):
            _, v = linalg.subspace_iteration(a, v)
        h, tau = torch.geqrf(a @ v)
        p = torch.linalg.householder_product(h, tau)
        self.lam = (p * (a @ p)).sum(0)
        self._fresh = p  # a root update right after this PU uses it (like the optimizer does)
        lower = torch.tril(h, -1)
        if self.quantized:
            cb = get_codebook(self.codebook, self.bits)
            q = quantize_symmetric(lower.T, cb, self.bits, self.block, scale_dtype=SCALE_DTYPE)
            lower = torch.triu(dequantize_symmetric(q, cb, self.n, self.bits, self.block), 1).T
        self.reflectors = lower
        self.identity = tau == 0

    def update_root(self) -> None:
        v = self.eigvecs() if self._fresh is None else self._fresh
        self._fresh = None
        root = linalg.eigen_inverse_root(self.lam.double(), v.double(), 4, self.eps)
        self._root = (_qdq_symmetric(root, self.root_bits) if self.quantized else root).float()

    def factor(self) -> torch.Tensor:
        v = self.eigvecs()
        return (v * self.lam) @ v.T

    def root(self) -> torch.Tensor:
        return self._root

    def state_bytes(self) -> int:
        if not self.quantized:
            return 4 * (2 * self.n * self.n + self.n)  # fp32 reflectors (full matrix), root and lambda
        return self.nbytes(self.n, self.bits, self.block, self.root_bits)

    @staticmethod
    def nbytes(n: int, bits: int = 8, block: int = 64, root_bits: int = 8) -> int:
        """Bytes per factor of order n: codes packed as the optimizer packs them, bf16 scales,
        one byte per reflector flag, fp32 eigenvalues and root diagonal."""
        tri = n * (n - 1) // 2
        codes = lambda b: (tri + 1) // 2 if b == 4 else tri
        blocks = lambda size: sum(-(-(n - 1 - i) // size) for i in range(n - 1))
        return codes(bits) + 2 * blocks(block) + n + 4 * n + codes(root_bits) + 2 * blocks(ROOT_BLOCK) + 4 * n


class CholeskyFactor:
    """Reference of ``quantize="cholesky8"`` written independently of the optimizer: the
    statistic's lower Cholesky factor C with ``bits``-bit codes in its strict lower triangle (the
    optimizer's triangle codec on C^T, blocks of ``block`` down each column, fp32 diagonal), no
    error-feedback state, the root stored like the optimizer's. With ``stochastic`` (not in the
    optimizer) every code rounds to one of its two neighbours with probabilities by distance
    (unbiased), so re-quantizing at each update does not accumulate a rounding bias.
    """

    def __init__(self, n: int, *, bits: int = 8, block: int = C8["block_size"], codebook: str = C8["codebook"],
                 root_block: int = C8["root_block_size"], stochastic: bool = False, root_bits: int = 4,
                 beta: float = BETA, eps: float = EPS, seed: int = 0):
        self.n, self.bits, self.block, self.stochastic, self.root_bits = n, bits, block, stochastic, root_bits
        self.codebook, self.root_block = codebook, root_block
        self.beta, self.eps = beta, eps
        self.quantized = n * n >= 4096
        self.chol = eps**0.5 * torch.eye(n)
        self._root = torch.eye(n)
        self.gen = torch.Generator().manual_seed(seed + n)

    def _store(self, c: torch.Tensor) -> torch.Tensor:
        """C as its stored codes give it back."""
        if not self.quantized:
            return c
        cb = get_codebook(self.codebook, self.bits)
        q = quantize_symmetric(c.T.contiguous(), cb, self.bits, self.block, scale_dtype=SCALE_DTYPE)
        if self.stochastic:
            from lightning_shampoo4.quant.blockwise import _triangle_index

            _, block_of, tri_at = _triangle_index(self.n, self.block, c.device)
            scale = q.absmax.float()[block_of.long()]
            v = c.T.reshape(-1)[tri_at.long()] / torch.where(scale > 0, scale, 1.0)
            low = (torch.searchsorted(cb, v.contiguous(), right=True) - 1).clamp(0, cb.numel() - 2)
            p = ((v - cb[low]) / (cb[low + 1] - cb[low])).clamp(0, 1)
            code = low + (torch.rand(v.shape, generator=self.gen) < p).long()
            upper = torch.zeros(self.n * self.n)
            upper[tri_at.long()] = cb[code] * scale
            return upper.view(self.n, self.n).T + torch.diag(q.diag)
        return torch.triu(dequantize_symmetric(q, cb, self.n, self.bits, self.block)).T

    def update_stats(self, m: torch.Tensor) -> None:
        a = self.beta * (self.chol @ self.chol.T) + (1 - self.beta) * m.float()
        c, info = torch.linalg.cholesky_ex(a.double())
        if int(info) != 0:
            c = torch.linalg.cholesky(a.double() + self.eps * a.diagonal().max() * torch.eye(self.n, dtype=torch.float64))
        self.chol = self._store(c.float())

    def update_root(self) -> None:
        root = exact_root((self.chol @ self.chol.T).double(), self.eps)
        self._root = (_qdq_symmetric(root, self.root_bits, self.root_block, self.codebook) if self.quantized
                      else root).float()

    def factor(self) -> torch.Tensor:
        return self.chol @ self.chol.T

    def root(self) -> torch.Tensor:
        return self._root


def build_variant(name: str, m: int, n: int, root_interval: int) -> Variant | None:
    if name in SHADOW_REFERENCES:
        return None  # computed from the shadow at measurement time
    if name in PROPOSALS:
        return FactorPairVariant(m, n, root_interval, lambda order: HouseholderFactor(order, **PROPOSALS[name]))
    if name in CHOLESKY_PROPOSALS:
        return FactorPairVariant(m, n, root_interval, lambda order: CholeskyFactor(order, **CHOLESKY_PROPOSALS[name]))
    return OptimizerVariant(m, n, root_interval, FEEDBACK.get(name), **({**SHAMPOO_VARIANTS, **EXTRA_VARIANTS}[name]))


# -- the loop ------------------------------------------------------------------------------------
def measure_schedule(updates: int, root_interval: int) -> list[int]:
    """Every root update up to 20, then every 5th update up to 100, then every 25th, plus the
    checkpoints and the last update (only updates that are root updates)."""
    pts = set(range(1, 21)) | set(range(25, 101, 5)) | set(range(125, updates + 1, 25))
    pts |= {c for c in CHECKPOINTS if c <= updates} | {updates}
    out = sorted({math.ceil(p / root_interval) * root_interval for p in pts if p <= updates})
    return [p for p in out if p <= updates]


def _nre(x: torch.Tensor, ref: torch.Tensor) -> float:
    return round(float((x - ref).norm() / ref.norm()), 6)


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return round(float((x * y).sum() / (x.norm() * y.norm()).clamp(min=1e-300)), 7)


def run_stream(
    stream: Iterator[torch.Tensor],
    variants: dict[str, Callable[[int, int], Variant | None]],
    updates: int,
    root_interval: int = 1,
    eps: float = EPS,
    log: Callable[[str], None] = print,
    label: str = "",
) -> dict[str, Any]:
    """Feed ``updates`` gradients to the shadow and every variant; measure at root updates."""
    schedule = set(measure_schedule(updates, root_interval))
    shadow: Shadow | None = None
    built: dict[str, Variant | None] = {}
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    times = {name: 0.0 for name in variants}
    shape = None
    t_start = time.perf_counter()
    for t, g in enumerate(stream, start=1):
        if t > updates:
            break
        if shadow is None:
            shape = tuple(g.shape)
            shadow = Shadow(*shape, eps=eps)
            built = {name: make(*shape) for name, make in variants.items()}
        shadow.update(g)
        for name, var in built.items():
            if var is not None:
                t0 = time.perf_counter()
                var.step(g, t)
                times[name] += time.perf_counter() - t0
        if t not in schedule:
            continue
        eigs = {side: exact_eigh(stat) for side, stat in shadow.stats.items()}
        exact = {side: exact_root(stat, eps, eigs[side]) for side, stat in shadow.stats.items()}
        gd = g.double()
        direction = exact["L"] @ gd @ exact["R"]
        for name, var in built.items():
            rec: dict[str, Any] = {"update": t}
            if var is None:  # a root computed from the shadow's statistic
                roots = {side: SHADOW_REFERENCES[name](stat, eps, eig=eigs[side]) for side, stat in shadow.stats.items()}
                for side in ("L", "R"):
                    rec[side] = {"stat_nre": None, "root_nre": _nre(roots[side], exact[side])}
            else:
                facs = var.factors()
                roots = {}
                for side in ("L", "R"):
                    f = facs[side]
                    roots[side] = f.root().double()
                    stat = f.factor().double()
                    rec[side] = {
                        "stat_nre": _nre(stat, shadow.stats[side]),
                        "root_nre": _nre(roots[side], exact[side]),
                    }
            rec["cosine"] = _cos(roots["L"] @ gd @ roots["R"], direction)
            records[name].append(rec)
        if t in CHECKPOINTS or t == updates:
            msg = " ".join(
                f"{name}={records[name][-1]['L']['root_nre']:.3f}/{records[name][-1]['cosine']:.3f}" for name in built
            )
            log(f"[drift] {label} update {t}: root NRE (L) / cosine: {msg} ({time.perf_counter() - t_start:.0f}s)")
    if shape is None:
        raise ValueError("empty gradient stream")
    out: dict[str, Any] = {"shape": list(shape), "updates": min(updates, t), "root_interval": root_interval, "variants": {}}
    for name in variants:
        var = built[name]
        nbytes = getattr(var, "nbytes", lambda: None)() if var is not None else None
        out["variants"][name] = {"records": records[name], "variant_time_s": round(times[name], 3),
                                 "second_order_bytes": nbytes}
    return out


def summary_rows(streams: dict[str, Any], checkpoints: tuple[int, ...] = CHECKPOINTS) -> list[list[Any]]:
    """One row per (stream, variant): root NRE of both sides and the cosine at each checkpoint,
    plus the worst root NRE and the lowest cosine over updates >= 100."""
    rows = []
    for sname, res in streams.items():
        for vname, vres in res["variants"].items():
            by_t = {r["update"]: r for r in vres["records"]}
            row: list[Any] = [sname, vname]
            for c in checkpoints:
                r = by_t.get(c)
                row.append("-" if r is None else f"{r['L']['root_nre']:.3f} / {r['R']['root_nre']:.3f} / {r['cosine']:.3f}")
            late = [r for r in vres["records"] if r["update"] >= 100]
            if late:
                worst = max(max(r["L"]["root_nre"], r["R"]["root_nre"]) for r in late)
                row.append(f"{worst:.3f} / {min(r['cosine'] for r in late):.3f}")
            else:
                row.append("-")
            rows.append(row)
    return rows


def summary_table(streams: dict[str, Any]) -> str:
    headers = ["stream", "variant"] + [f"update {c}: NRE L / R / cos" for c in CHECKPOINTS] + ["t>=100: max NRE / min cos"]
    return table(headers, summary_rows(streams))


# -- plots ---------------------------------------------------------------------------------------
def plot(streams: dict[str, Any], path: Path) -> None:
    """Per stream: root NRE, statistic NRE and 1 - cosine against the update, log-log; one
    colour per variant across all rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(streams)
    variants = list(dict.fromkeys(v for res in streams.values() for v in res["variants"]))
    cmap = plt.get_cmap("tab20" if len(variants) > 10 else "tab10")
    colour = {v: cmap(i % cmap.N) for i, v in enumerate(variants)}
    fig, axes = plt.subplots(len(names), 3, figsize=(15, 3.4 * len(names)), squeeze=False)
    for row, sname in enumerate(names):
        res = streams[sname]
        for vname, vres in res["variants"].items():
            recs = vres["records"]
            ts = [r["update"] for r in recs]
            c = colour[vname]
            for side, style in (("L", "-"), ("R", "--")):
                label = vname if side == "L" else None
                axes[row, 0].plot(ts, [r[side]["root_nre"] for r in recs], style, color=c, label=label)
                stat = [r[side]["stat_nre"] for r in recs]
                if stat and stat[0] is not None:
                    axes[row, 1].plot(ts, stat, style, color=c, label=label)
            gap = [max(1.0 - r["cosine"], 1e-6) for r in recs]
            axes[row, 2].plot(ts, gap, color=c, label=vname)
        m, n = res["shape"]
        axes[row, 0].set_title(f"{sname} ({m}x{n}): root NRE (L solid, R dashed)")
        axes[row, 1].set_title(f"{sname}: statistic NRE (L solid, R dashed)")
        axes[row, 2].set_title(f"{sname}: 1 - cosine to the exact direction")
        for ax in axes[row]:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("statistics update")
            ax.grid(alpha=0.3)
        axes[row, 0].set_ylim(1e-3, 10)
        axes[row, 2].set_ylim(1e-4, 1)
        axes[row, 2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------
def main(
    argv: list[str] | None = None,
    extra_variants: dict[str, Callable[[int, int, int], Variant]] | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark; ``extra_variants`` (name -> factory(m, n, root_interval)) adds
    prototype storage schemes to the variants, ``note`` says where they came from."""
    parser = base_parser(__doc__.split("\n\n")[0], NAME)
    parser.add_argument("--streams", nargs="+", default=None, help=f"subset of {list(FULL)}")
    parser.add_argument("--variants", nargs="+", default=None,
                        help=f"variants to run (default {list(DEFAULT_VARIANTS)}; fewer for synthetic1200)")
    parser.add_argument("--updates", type=int, default=None, help="statistics updates per stream (overrides the table)")
    parser.add_argument("--root-interval", type=int, default=1, help="statistics updates between root updates")
    parser.add_argument("--cond", type=float, default=1e4, help="condition number of the synthetic factors")
    parser.add_argument("--cache", type=Path, default=CACHE_DIR, help="folder for captured gradient streams")
    parser.add_argument("--name", default=NAME, help="result file stem (drift, drift_<suffix>)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other streams (and, for a stream run again, the other variants) of an "
                        "existing result file: run streams or variant groups one at a time")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing result file")
    parser.add_argument("--soap", action="store_true",
                        help="the SOAP4bit variants instead (SOAP_DRIFT_VARIANTS; result file drift_soap.json)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    run = setup_run(args)
    if args.soap:
        return soap_main(args, argv, run)
    if args.plot_only:
        import json

        data = json.loads((args.out / f"{args.name}.json").read_text())
        plot(data["streams"], args.out / f"{args.name}.png")
        return data
    specs = QUICK if args.quick else FULL
    chosen = args.streams or list(specs)
    unknown = [s for s in chosen if s not in specs]
    if unknown:
        parser.error(f"unknown streams {unknown}; choose from {list(specs)}")
    cache = args.cache if not args.quick else QUICK_DIR / "drift_cache"

    streams: dict[str, Any] = {}
    for sname in chosen:
        spec = specs[sname]
        updates = args.updates or spec["updates"]
        factories: dict[str, Callable[[int, int], Variant | None]] = {}
        for name in args.variants or spec.get("variants", DEFAULT_VARIANTS):
            factories[name] = lambda m, n, name=name: build_variant(name, m, n, args.root_interval)
        for name, make in (extra_variants or {}).items():
            factories[name] = lambda m, n, make=make: make(m, n, args.root_interval)
        t0 = time.perf_counter()
        res = run_stream(make_stream(spec, updates, args.cond, cache), factories, updates, args.root_interval,
                         label=sname)
        res["spec"] = spec
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        res["runs"] = [{"command": " ".join(["python benchmarks/drift.py", *argv]), "variants": list(factories),
                        "started": run["started"], "wall_s": res["wall_s"]}]
        streams[sname] = res
        print(f"[drift] {sname} done in {res['wall_s']:.0f}s", flush=True)

    previous = args.out / f"{args.name}.json"
    if args.merge and previous.exists():
        import json

        old = json.loads(previous.read_text())
        merged = dict(old.get("streams", {}))
        for k, v in streams.items():  # a stream run again replaces the variants it ran
            if k in merged and merged[k]["shape"] == v["shape"] and merged[k]["updates"] == v["updates"]:
                v = {**v, "variants": {**merged[k]["variants"], **v["variants"]},
                     "runs": merged[k].get("runs", []) + v["runs"]}
            merged[k] = v
        streams = merged
        order = list(FULL) + list(QUICK)
        streams = dict(sorted(streams.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    text = summary_table(streams)
    print(text)
    png = args.out / f"{args.name}.png"
    plot(streams, png)
    payload = {
        "config": {"beta": BETA, "eps": EPS, "stat_interval": 1, "root_interval": args.root_interval,
                   "cond": args.cond, "checkpoints": list(CHECKPOINTS)},
        "streams": streams,
        "table": text,
        "plot": png.name,
    }
    if note:
        payload["note"] = note
    if args.name == NAME:
        write_result(args.out, NAME, payload, run, argv)
    else:  # written under this script's name (so the recorded command is right), then renamed
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            shutil.move(write_result(Path(tmp), NAME, payload, run, argv), args.out / f"{args.name}.json")
    return payload


def soap_main(args: Any, argv: list[str], run: dict[str, Any]) -> dict[str, Any]:
    specs = QUICK if args.quick else FULL
    chosen = args.streams or ["charlm", "synthetic"]
    cache = args.cache if not args.quick else QUICK_DIR / "drift_cache"
    variants = args.variants or list(SOAP_DRIFT_VARIANTS)
    streams: dict[str, Any] = {}
    rows = []
    for sname in chosen:
        spec = specs[sname]
        updates = args.updates or min(spec["updates"], 300)
        t0 = time.perf_counter()
        res = soap_drift(make_stream(spec, updates, args.cond, cache), updates, variants)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        streams[sname] = res
        for name, v in res["variants"].items():
            rows.append([sname, name, v["basis_offdiag_mean_second_half"], v["cosine_mean_second_half"],
                         v["state_bytes"]["second_order"]])
        print(f"[drift] soap {sname} done in {res['wall_s']:.0f}s", flush=True)
    text = table(["stream", "variant", "basis off-diagonal / ||L|| (2nd half)", "cosine to fp32 SOAP (2nd half)",
                  "second-order bytes"], rows, 4)
    print(text)
    payload = {"config": {"beta": BETA, "precondition_frequency": 10, "variants": {v: SOAP_DRIFT_VARIANTS[v]
                                                                                   for v in variants}},
               "streams": streams, "table": text}
    name = args.name if args.name != NAME else "drift_soap"
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        shutil.move(write_result(Path(tmp), NAME, payload, run, argv), args.out / f"{name}.json")
    return payload


if __name__ == "__main__":
    main()
