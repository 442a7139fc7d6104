"""The per-block math of :class:`~.soap.SOAP4bit`: how a block's eigenbases, statistics and Adam
moments are stored (:class:`Codec`, :func:`side_init`, the moment helpers) and one block's step
(:func:`block_step`: Adam in the eigenbasis, the statistics, the eigenbasis refresh).

Kept apart from the optimizer class (``soap.py``: settings, plans, distribution, the step's
phases) so that the algorithm can be read, and tested, on plain tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from .. import kernels, linalg
from ..kernels import QuantizedMatrix
from ..quant import Quantized, get_codebook
from ..quant import moments as qm

__all__ = ["Codec", "adam_direction", "block_step", "moment_init", "moment_load", "moment_store", "side_init"]

_SCALE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CHOL_CODEBOOK = "linear1.5"  # the 8-bit Cholesky factor: the map of Shampoo4bit's default storage
_ROTATED_BITS = {"rotated8": 8, "rotated4": 4}


# -- the stored matrices --------------------------------------------------------------------
class Codec(NamedTuple):
    """How a group stores its matrices (hashable: caches key on it)."""

    bits: int
    codebook: str
    block_size: int
    scale_dtype: torch.dtype
    min_quant_numel: int
    backend: str

    @classmethod
    def of(cls, g: Mapping[str, Any]) -> Codec:
        return cls(g["bits"], g["codebook"], g["block_size"], _SCALE[g["scale_dtype"]], g["min_quant_numel"],
                   g["kernel_backend"])

    def quantized(self, k: int) -> bool:
        return self.bits != 32 and k * k >= self.min_quant_numel

    def store_q(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """The eigenvector matrix (columns) as entries: fp32, or every eigenvector's codes."""
        if not self.quantized(q.shape[0]):
            return {"eigvecs": q.float().contiguous()}
        cb = get_codebook(self.codebook, self.bits, q.device)
        # one eigenvector per stored row (the paper's per-eigenvector blocks), quantized contiguously
        out = kernels.quantize(q.float().mT.contiguous(), cb, self.bits, self.block_size,
                               scale_dtype=self.scale_dtype, backend=self.backend)
        return {"eigvecs_codes": out.codes, "eigvecs_absmax": out.absmax}

    def load_q(self, st: Mapping[str, torch.Tensor], k: int, bjorck: int) -> torch.Tensor:
        if not self.quantized(k):
            return st["eigvecs"]
        codes = st["eigvecs_codes"]
        cb = get_codebook(self.codebook, self.bits, codes.device)
        # the eigenvectors are stored as rows: decoded contiguously, Q is a transposed view
        qt = kernels.dequantize(Quantized(codes, st["eigvecs_absmax"], None), cb, (k, k), self.bits, self.block_size,
                                backend=self.backend)
        return linalg.bjorck(qt.mT, bjorck)

    def store_chol(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """A lower Cholesky factor: fp32, or its strict triangle with 8-bit codes (one scale per
        column) beside its fp32 diagonal."""
        k = c.shape[0]
        if not self.quantized(k):
            return {"chol": c.float().contiguous()}
        cb = get_codebook(_CHOL_CODEBOOK, 8, c.device)
        out = kernels.quantize_symmetric(c.mT, cb, 8, k, scale_dtype=self.scale_dtype, backend=self.backend)
        return {"chol_codes": out.codes, "chol_absmax": out.absmax, "chol_diag": out.diag}

    def store_rotated(self, a: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
        """The statistic in its eigenbasis (symmetric): fp32, or its fp32 diagonal beside the
        strict upper triangle at ``bits`` (one scale per row run)."""
        k = a.shape[0]
        if not self.quantized(k):
            return {"factor": a.float().contiguous()}
        cb = get_codebook(_CHOL_CODEBOOK, bits, a.device)
        out = kernels.quantize_symmetric(a, cb, bits, k, scale_dtype=self.scale_dtype, backend=self.backend)
        return {"factor_codes": out.codes, "factor_absmax": out.absmax, "factor_diag": out.diag}

    def load_rotated(self, st: Mapping[str, torch.Tensor], k: int, bits: int) -> torch.Tensor:
        if not self.quantized(k):
            return st["factor"]
        codes = st["factor_codes"]
        cb = get_codebook(_CHOL_CODEBOOK, bits, codes.device)
        m = QuantizedMatrix(codes, st["factor_absmax"], st["factor_diag"], k, cb, bits, k, symmetric=True)
        return kernels.materialize(m, backend=self.backend)

    def update_rotated(self, st: Mapping[str, torch.Tensor], k: int, bits: int, o: torch.Tensor,
                       beta: float) -> dict[str, torch.Tensor]:
        """The entries of ``S * beta + o * (1 - beta)`` for the stored rotated statistic ``S``: in one
        pass over its codes (:func:`lightning_shampoo4.kernels.symmetric_ema`)."""
        if not self.quantized(k):
            return {"factor": st["factor"] * beta + o * (1 - beta)}
        cb = get_codebook(_CHOL_CODEBOOK, bits, o.device)
        m = QuantizedMatrix(st["factor_codes"], st["factor_absmax"], st["factor_diag"], k, cb, bits, k, symmetric=True)
        out = kernels.symmetric_ema(m, o, beta, 1 - beta, scale_dtype=self.scale_dtype, backend=self.backend)
        return {"factor_codes": out.codes, "factor_absmax": out.absmax, "factor_diag": out.diag}

    def load_chol(self, st: Mapping[str, torch.Tensor], k: int) -> torch.Tensor:
        if not self.quantized(k):
            return st["chol"]
        codes = st["chol_codes"]
        cb = get_codebook(_CHOL_CODEBOOK, 8, codes.device)
        m = QuantizedMatrix(codes, st["chol_absmax"], st["chol_diag"], k, cb, 8, k, symmetric=True)
        return kernels.materialize(m, backend=self.backend).tril_()


@functools.lru_cache(maxsize=512)
def _side_template(codec: Codec, statistics: str, k: int) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    """Names, shapes and dtypes of a fresh factor's entries (from a real encoding on the CPU)."""
    eye = torch.eye(k)
    entries = codec._replace(backend="torch").store_q(eye)
    if statistics == "eigen":
        entries["eigvals"] = torch.zeros(k)
    elif statistics == "dense":
        entries["factor"] = torch.zeros(k, k)
    elif statistics.startswith("rotated"):
        entries.update(codec._replace(backend="torch").store_rotated(torch.zeros(k, k), _ROTATED_BITS[statistics]))
    else:
        entries.update(codec._replace(backend="torch").store_chol(eye))
    return tuple((n, tuple(t.shape), t.dtype) for n, t in entries.items())


def side_init(codec: Codec, statistics: str, k: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A fresh factor: Q = I, statistic 0 (its Cholesky factor I, overwritten at the first step)."""
    if device.type == "meta":
        return {n: torch.empty(s, dtype=d, device=device) for n, s, d in _side_template(codec, statistics, k)}
    eye = torch.eye(k, device=device)
    entries = codec.store_q(eye)
    if statistics == "eigen":
        entries["eigvals"] = torch.zeros(k, device=device)
    elif statistics == "dense":
        entries["factor"] = torch.zeros(k, k, device=device)
    elif statistics.startswith("rotated"):
        entries.update(codec.store_rotated(torch.zeros(k, k, device=device), _ROTATED_BITS[statistics]))
    else:
        entries.update(codec.store_chol(eye))
    return entries


# -- moments --------------------------------------------------------------------------------
def moment_init(name: str, shape: tuple[int, ...], bits: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    spec = qm.moment_spec(math.prod(shape), bits)
    if not spec.quantized:
        return {name: torch.zeros(shape, dtype=dtype, device=device)}
    return {f"{name}_codes": torch.zeros(spec.code_bytes, dtype=torch.uint8, device=device),
            f"{name}_absmax": torch.zeros(spec.nblocks, dtype=torch.float32, device=device)}


def moment_load(st: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...], bits: int) -> torch.Tensor:
    """Moment ``key`` (a full state key) as fp32 of ``shape``."""
    spec = qm.moment_spec(math.prod(shape), bits)
    if not spec.quantized:
        return st[key].float().reshape(shape)
    name = key.rsplit(".", 1)[-1]
    codes = st[f"{key}_codes"]
    cb = qm.moment_codebook(name, bits, codes.device)
    # the moments' flat layout is one row of the block-wise layout: decoded by the device's kernel
    q = Quantized(codes, st[f"{key}_absmax"].view(1, -1), None)
    return kernels.dequantize(q, cb, (spec.numel,), bits, spec.block_size).view(shape)


def moment_store(key: str, x: torch.Tensor, bits: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    spec = qm.moment_spec(x.numel(), bits)
    if not spec.quantized:
        return {key: x.to(dtype)}
    name = key.rsplit(".", 1)[-1]
    cb = qm.moment_codebook(name, bits, x.device)
    q = kernels.quantize(x.float().reshape(-1), cb, bits, spec.block_size)  # = qm.quantize_moment, bit for bit
    return {f"{key}_codes": q.codes, f"{key}_absmax": q.absmax.view(-1)}


# -- linear algebra ---------------------------------------------------------------------------
def _in_fp32_or_fp64(decompose: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], a: torch.Tensor
                     ) -> tuple[tuple[torch.Tensor, ...], str] | None:
    """``decompose(a)`` in float32, retried in float64 on a linear-algebra error or a non-finite
    last output (an orthonormal basis: its entries are bounded, so its sum is finite exactly when
    they all are, and one sum is a tenth of an elementwise check); (outputs, "ok" or "retried"),
    None when both fail."""
    for dtype, status in ((torch.float32, "ok"), (torch.float64, "retried")):
        try:
            out = decompose(a.to(dtype))
        except torch.linalg.LinAlgError:
            continue
        if bool(torch.isfinite(out[-1].sum())):
            return out, status
    return None


def _eigh_desc(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """Eigenvalues (descending) and eigenvectors of symmetric ``a``; float64 retry; None on failure."""
    res = _in_fp32_or_fp64(torch.linalg.eigh, a)
    if res is None:
        return None
    (lam, q), status = res
    return lam.flip(0).float(), q.flip(1).float(), status


def _qr(p: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    res = _in_fp32_or_fp64(lambda x: torch.linalg.qr(x)[:1], p)
    return None if res is None else (res[0][0].float(), res[1])


def _cholesky(a: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    c, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0 and bool(torch.isfinite(c).all()):
        return c, "ok"
    a64 = a.double()
    jitter = 1e-6 * a64.diagonal().abs().amax().clamp(min=1e-30)
    c, info = torch.linalg.cholesky_ex(a64 + jitter * torch.eye(a.shape[0], dtype=a64.dtype, device=a.device))
    if int(info) == 0 and bool(torch.isfinite(c).all()):
        return c.float(), "retried"
    return None


def adam_direction(m: torch.Tensor, v: torch.Tensor, b1: float, b2: float, eps: float, t: float) -> torch.Tensor:
    """``(m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``."""
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    return (m / bc1) / (v / bc2).sqrt().add_(eps)


def _rotate(x: torch.Tensor, ql: torch.Tensor | None, qr: torch.Tensor | None) -> torch.Tensor:
    if ql is not None:
        x = ql.mT @ x
    if qr is not None:
        x = x @ qr
    return x


def _rotate_back(x: torch.Tensor, ql: torch.Tensor | None, qr: torch.Tensor | None) -> torch.Tensor:
    if ql is not None:
        x = ql @ x
    if qr is not None:
        x = x @ qr.mT
    return x


def block_step(i, block, sides, g, m_orig, group, state, first, refresh, t, counts):
    """One SOAP block: (new entries, direction or None)."""
    codec, stats = Codec.of(group), group["statistics"]
    b1, b2 = group["betas"]
    beta, mbits, f = group["shampoo_beta"], group["moment_bits"], group["precondition_frequency"]
    factored = group["second_moment"] == "factored"
    rotated_m = group["first_moment_basis"] != "original"
    normalized = group["first_moment_basis"] == "normalized"
    shape = (block.rows, block.cols)
    new: dict[str, torch.Tensor] = {}
    views = []
    for side, k in zip("LR", sides):
        if k is None:
            views.append(None)
            continue
        prefix = f"{i}.{side}."
        views.append({key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)})
    qs = [None if v is None else codec.load_q(v, k, group["bjorck_steps"]) for v, k in zip(views, sides)]

    # Adam in the eigenbasis
    direction = None
    v_key, row_key, col_key, m_key = f"{i}.L.exp_avg_sq", f"{i}.L.exp_avg_sq", f"{i}.R.exp_avg_sq", f"{i}.L.exp_avg"
    if not first:
        gr = _rotate(g, *qs)
        if factored:
            sq = gr.square()
            row = state[row_key] * b2 + sq.sum(1) * (1 - b2)
            col = state[col_key] * b2 + sq.sum(0) * (1 - b2)
            v = _factored(row, col)
            new[row_key], new[col_key] = row, col
        else:
            v = moment_load(state, v_key, shape, mbits).mul(b2).addcmul_(gr, gr, value=1 - b2)
        if rotated_m:
            m = moment_load(state, m_key, shape, mbits)
            if normalized:  # stored divided by the root of the second moment it was stored with
                m = m * _moment_scale(state, i, shape, factored, mbits, group["eps"])
            m = torch.lerp(m, gr, 1 - b1)
        else:
            m = _rotate(m_orig, *qs)
        direction = _rotate_back(adam_direction(m, v, b1, b2, group["eps"], t), *qs)
    else:
        gr = _rotate(g, *qs)  # identity bases: the gradient itself
        v = m = None

    # statistics and (at the first step / a refresh) new eigenbases
    perms: list[torch.Tensor | None] = []
    new_qs: list[torch.Tensor | None] = []
    for side, k, view, q in zip("LR", sides, views, qs):
        if k is None:
            perms.append(None)
            new_qs.append(None)
            continue
        res = _side_update(side, k, view, q, g, gr, stats, codec, beta, f, first, refresh, counts,
                           group["bjorck_steps"])
        out, perm, q_new = res
        perms.append(perm)
        new_qs.append(q_new)
        new.update({f"{i}.{side}.{n}": v for n, v in out.items()})

    # moments follow a basis change: the second moment is permuted (as SOAP does), a rotated first
    # moment is carried into the new basis
    if not first:
        pl, pr = perms
        if factored:
            if pl is not None:
                new[row_key] = new[row_key][pl]
            if pr is not None:
                new[col_key] = new[col_key][pr]
        else:
            if pl is not None:
                v = v.index_select(0, pl)
            if pr is not None:
                v = v.index_select(1, pr)
            new.update(moment_store(v_key, v, mbits, torch.float32))
        if rotated_m:
            if any(q is not None for q in new_qs):
                ql = None if new_qs[0] is None else qs[0].mT @ new_qs[0]
                qr = None if new_qs[1] is None else qs[1].mT @ new_qs[1]
                m = _rotate(m, ql, qr)
            if normalized:
                m = m / _moment_scale(new, i, shape, factored, mbits, group["eps"])
            new.update(moment_store(m_key, m, mbits, torch.float32))
    return new, direction


def _factored(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Adafactor's second moment ``r c^T / sum(r)`` from its row and column sums."""
    return torch.outer(row, col) / row.sum().clamp(min=torch.finfo(torch.float32).tiny)


def _moment_scale(entries: Mapping[str, torch.Tensor], i: int, shape: tuple[int, int], factored: bool, mbits: int,
                  eps: float) -> torch.Tensor:
    """``sqrt(V) + eps`` of block ``i``'s second moment as stored in ``entries`` (after rounding):
    the scale a normalized first moment is stored in, so that its codes hold Adam's direction,
    whose entries are of one size, instead of a moment whose entries span the eigenvalues' range."""
    if factored:  # sqrt(r_i / sum(r)) sqrt(c_j): no product of two large sums that could overflow
        row, col = entries[f"{i}.L.exp_avg_sq"], entries[f"{i}.R.exp_avg_sq"]
        share = row / row.sum().clamp(min=torch.finfo(torch.float32).tiny)
        return torch.outer(share.sqrt(), col.sqrt()).add_(eps)
    return moment_load(entries, f"{i}.L.exp_avg_sq", shape, mbits).sqrt().add_(eps)


def _outer(x: torch.Tensor, side: str) -> torch.Tensor:
    return x @ x.mT if side == "L" else x.mT @ x


class _Refresh(NamedTuple):
    """One power iteration's result: the new order of the old basis' columns, the new basis, and
    what re-expressing the statistic in a basis needs (its ordered rotated form, the ordered old
    basis and that basis' LU factors, None when it is singular)."""

    perm: torch.Tensor
    q_new: torch.Tensor
    a_rot: torch.Tensor
    q: torch.Tensor
    lu: tuple[torch.Tensor, torch.Tensor] | None


def _lu(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    lu, pivots, info = torch.linalg.lu_factor_ex(q)
    return (lu, pivots) if int(info) == 0 else None


def _power_step(a_rot: torch.Tensor, q: torch.Tensor, counts) -> _Refresh | None:
    """One power iteration + QR on the statistic ``A`` given as ``a_rot = q^T A q`` for the stored
    (dequantized, so only nearly orthogonal) basis ``q``: the columns ordered by the estimated
    eigenvalues ``diag(a_rot)``, ``A q = q^-T a_rot``, new basis ``QR(A q)``. ``q`` is factored
    once for this and for :func:`_change_basis`. None on failure."""
    counts["refreshes"] += 1
    perm = torch.argsort(a_rot.diagonal(), descending=True)
    # index_select: the same gathers as a_rot[perm][:, perm], five times faster
    a_rot, q = a_rot.index_select(0, perm).index_select(1, perm), q.index_select(1, perm)
    lu = _lu(q)
    p = q @ a_rot if lu is None else torch.linalg.lu_solve(*lu, a_rot, adjoint=True)
    res = _qr(p)
    if res is None:
        counts["failed_updates"] += 1
        return None
    q_new, status = res
    counts["retried_updates"] += status == "retried"
    return _Refresh(perm, q_new, a_rot, q, lu)


def _change_basis(r: _Refresh, q_new: torch.Tensor) -> torch.Tensor:
    """``Q_new^T A Q_new`` for the statistic of ``r``: ``T^T a_rot T``, ``T = q^-1 Q_new``."""
    turn = r.q.mT @ q_new if r.lu is None else torch.linalg.lu_solve(*r.lu, q_new)
    return turn.mT @ r.a_rot @ turn


def _store_cholesky(a: torch.Tensor, codec: Codec, counts) -> dict[str, torch.Tensor]:
    """The entries of ``a``'s Cholesky factor; none (the previous factor kept) when it fails."""
    chol = _cholesky(a)
    if chol is None:
        counts["failed_updates"] += 1
        return {}
    counts["retried_updates"] += chol[1] == "retried"
    return codec.store_chol(chol[0])


def _side_update(side, k, view, q, g, gr, stats, codec, beta, f, first, refresh, counts, bjorck):
    """One factor's statistic and, at the first step or a refresh, its new eigenbasis: (entries,
    permutation of the old basis or None, new basis or None)."""
    out: dict[str, torch.Tensor] = {}
    if first:  # L = (1 - b) G G^T, its eigenbasis by eigh
        a = _outer(g, side) * (1 - beta)
        counts["refreshes"] += 1
        res = _eigh_desc(a + 1e-30 * torch.eye(k, device=a.device))
        if res is None:
            counts["failed_updates"] += 1
            lam, q_new = a.diagonal(), None
        else:
            lam, q_new, status = res
            counts["retried_updates"] += status == "retried"
        if stats == "dense":
            out["factor"] = a
        elif stats == "eigen":
            out["eigvals"] = lam.clamp(min=0)
        elif stats in _ROTATED_BITS:  # in the basis the next steps read: the stored one
            if q_new is not None:
                out.update(codec.store_q(q_new))
                stored = codec.load_q(out, k, bjorck)
                a = stored.mT @ a @ stored
            out.update(codec.store_rotated(a, _ROTATED_BITS[stats]))
        else:
            out.update(_store_cholesky(a, codec, counts))
        if q_new is not None and "eigvecs" not in out and "eigvecs_codes" not in out:
            out.update(codec.store_q(q_new))
        return out, None, q_new
    perm = q_new = None
    if stats in ("dense", "cholesky8"):  # the statistic in the parameter's basis
        gg = _outer(g, side)
        if stats == "dense":
            a = view["factor"] * beta + gg * (1 - beta)
            out["factor"] = a
        else:
            c = codec.load_chol(view, k)
            a = torch.addmm(gg, c, c.mT, beta=1 - beta, alpha=beta)
            out.update(_store_cholesky(a, codec, counts))
        if refresh:
            counts["refreshes"] += 1
            perm = torch.argsort((q * (a @ q)).sum(0), descending=True)
            res = _qr(a @ q.index_select(1, perm))
            if res is None:
                counts["failed_updates"] += 1
                perm = None
            else:
                q_new, status = res
                counts["retried_updates"] += status == "retried"
    elif stats == "eigen":  # Q diag(lambda) Q^T: the rotated gradient's diagonal every step
        rot = _outer(gr, side) if refresh else None
        diag = rot.diagonal() if refresh else (gr.square().sum(1) if side == "L" else gr.square().sum(0))
        lam = view["eigvals"] * beta + diag * (1 - beta)
        if refresh:  # this step's off-diagonal stands for the steps since the last refresh
            a_rot = rot * (1 - beta**f)
            a_rot.diagonal().copy_(lam)
            res = _power_step(a_rot, q, counts)
            if res is not None:
                perm, q_new = res.perm, res.q_new
                lam = _change_basis(res, q_new).diagonal()
        out["eigvals"] = lam.clamp(min=0)
    else:  # the statistic in its eigenbasis, Q^T L Q
        bits = _ROTATED_BITS[stats]
        gg = _outer(gr, side)
        if not refresh:  # S * beta + (G' G'^T) * (1 - beta), stored again without forming S
            out.update(codec.update_rotated(view, k, bits, gg, beta))
            return out, None, None
        a_rot = codec.load_rotated(view, k, bits) * beta + gg * (1 - beta)
        res = _power_step(a_rot, q, counts)
        if res is not None:  # the statistic in the basis the next steps will read: the stored one
            perm, q_new = res.perm, res.q_new
            entries = codec.store_q(q_new)
            out.update(entries)
            stored = codec.load_q(entries, k, bjorck)
            a_rot = _change_basis(res, stored)
        out.update(codec.store_rotated(a_rot, bits))
    if q_new is not None and not any(n.startswith("eigvecs") for n in out):
        out.update(codec.store_q(q_new))
    return out, perm, q_new
