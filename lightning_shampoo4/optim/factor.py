"""One Kronecker factor of one block: its stored state and its two updates.

A :class:`Factor` is a view over entries ``"{block}.{side}.*"`` of a parameter's state dict;
it keeps nothing itself, so the optimizer state stays plain tensors. Three storage modes:

``eigen``  (bits 4 / 8, ``quantize="eigenvectors"``, the 4-bit Shampoo of the paper)
    ``eigvals`` fp32, eigenvectors U stored as quantized U^T (``eigvecs_codes``,
    ``eigvecs_absmax``), inverse root stored diag-real (``root_diag``, ``root_codes``,
    ``root_absmax``). PU: Björck-rectify U, EMA, one warm-started subspace iteration.
    PIRU: Björck-rectify U, ``U diag((lambda + rho)^-1/4) U^T``.
``dense``  (bits 32: 32-bit Shampoo)
    ``factor`` and ``root`` in fp32. PU: EMA. PIRU: exact ``eigh`` or Schur-Newton.
``naive``  (bits 4 / 8, ``quantize="preconditioner"``, the naive baseline)
    the factor and root themselves stored diag-real quantized. PU: dequantize, EMA,
    requantize. PIRU: coupled Schur-Newton (or ``eigh``).

Factors smaller than ``min_quant_numel`` elements keep the same mode with fp32 storage
(``eigvecs``, ``factor``, ``root`` entries instead of codes).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import kernels, linalg
from ..kernels import QuantizedMatrix
from ..quant import Quantized, get_codebook

OK, RETRIED, FAILED = "ok", "retried", "failed"


class FactorConfig(NamedTuple):
    """Settings of one factor, derived from its parameter group."""

    mode: str
    quantized: bool
    bits: int
    codebook: str
    block_size: int
    beta: float
    eps: float
    bjorck_stats: int
    bjorck_root: int
    root_method: str
    backend: str

    @classmethod
    def from_group(cls, group: dict, order: int) -> FactorConfig:
        bits = group["bits"]
        if bits == 32:
            mode = "dense"
        else:
            mode = "eigen" if group["quantize"] == "eigenvectors" else "naive"
        root_method = group["root_method"] or ("schur_newton" if mode == "naive" else "eigen")
        return cls(
            mode=mode,
            quantized=bits != 32 and order * order >= group["min_quant_numel"],
            bits=bits,
            codebook=group["codebook"],
            block_size=group["block_size"],
            beta=group["shampoo_beta"],
            eps=group["matrix_eps"],
            bjorck_stats=group["bjorck_steps"][0],
            bjorck_root=group["bjorck_steps"][1],
            root_method=root_method,
            backend=group["kernel_backend"],
        )


class Factor:
    """The state of one factor of order ``order`` under key prefix ``prefix``."""

    def __init__(self, state: dict, prefix: str, order: int, cfg: FactorConfig):
        self.state = state
        self.prefix = prefix
        self.order = order
        self.cfg = cfg

    # -- storage -------------------------------------------------------------------------
    def _key(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def _codebook(self, device: torch.device) -> torch.Tensor:
        return get_codebook(self.cfg.codebook, self.cfg.bits, device)

    def _put(self, key: str, value: torch.Tensor) -> None:
        old = self.state.get(key)
        if old is not None and old.shape == value.shape and old.dtype == value.dtype:
            old.copy_(value)
        else:
            self.state[key] = value.clone()

    def _store(self, name: str, x: torch.Tensor, *, offdiag: bool = False, transpose: bool = False) -> None:
        """Store matrix ``x`` as ``name`` (quantized when this factor is quantized)."""
        if not self.cfg.quantized:
            self._put(self._key(name), x.float().contiguous())
            return
        cfg = self.cfg
        q = kernels.quantize(
            x, self._codebook(x.device), cfg.bits, cfg.block_size, offdiag=offdiag, transpose=transpose, backend=cfg.backend
        )
        self._put(self._key(f"{name}_codes"), q.codes)
        self._put(self._key(f"{name}_absmax"), q.absmax)
        if offdiag:
            self._put(self._key(f"{name}_diag"), q.diag)

    def _parts(self, name: str, offdiag: bool) -> Quantized:
        diag = self.state[self._key(f"{name}_diag")] if offdiag else None
        return Quantized(self.state[self._key(f"{name}_codes")], self.state[self._key(f"{name}_absmax")], diag)

    def _load(self, name: str, *, offdiag: bool = False, transpose: bool = False) -> torch.Tensor:
        """Matrix ``name`` as dense fp32."""
        if not self.cfg.quantized:
            return self.state[self._key(name)]
        q = self._parts(name, offdiag)
        cfg = self.cfg
        n = self.order
        return kernels.dequantize(
            q, self._codebook(q.codes.device), (n, n), cfg.bits, cfg.block_size, transpose=transpose, backend=cfg.backend
        )

    # -- lifecycle -----------------------------------------------------------------------
    def init(self, device: torch.device) -> None:
        """L0 = eps I: eigenvalues eps with U = I, or factor eps I; root = I."""
        eye = torch.eye(self.order, dtype=torch.float32, device=device)
        if self.cfg.mode == "eigen":
            self.state[self._key("eigvals")] = torch.full((self.order,), self.cfg.eps, dtype=torch.float32, device=device)
            self._store("eigvecs", eye, transpose=True)
        else:
            self._store("factor", self.cfg.eps * eye, offdiag=True)
        self._store("root", eye, offdiag=True)

    def eigvecs(self, bjorck_steps: int = 0) -> torch.Tensor:
        """The stored eigenvectors (columns), dequantized and Björck-rectified (eigen mode)."""
        return linalg.bjorck(self._load("eigvecs", transpose=True), bjorck_steps)

    def eigvals(self) -> torch.Tensor:
        return self.state[self._key("eigvals")]

    def factor(self) -> torch.Tensor:
        """The statistic itself as dense fp32 (reconstructed from U, lambda in eigen mode)."""
        if self.cfg.mode == "eigen":
            v = self.eigvecs(self.cfg.bjorck_stats)
            return (v * self.eigvals()) @ v.mT
        return self._load("factor", offdiag=True)

    def root(self) -> torch.Tensor:
        """The stored inverse root as dense fp32."""
        return self._load("root", offdiag=True)

    def operand(self) -> torch.Tensor | QuantizedMatrix:
        """The root in the form the preconditioning kernel takes."""
        if not self.cfg.quantized:
            return self.state[self._key("root")]
        q = self._parts("root", offdiag=True)
        cfg = self.cfg
        return QuantizedMatrix(q.codes, q.absmax, q.diag, self.order, self._codebook(q.codes.device), cfg.bits, cfg.block_size)

    # -- PU ------------------------------------------------------------------------------
    def update_stats(self, m: torch.Tensor) -> str:
        """Fold ``m`` (G G^T or G^T G of this step, fp32) into the statistic."""
        beta = self.cfg.beta
        if self.cfg.mode != "eigen":
            self._store("factor", beta * self._load("factor", offdiag=True) + (1 - beta) * m, offdiag=True)
            return OK
        v = self.eigvecs(self.cfg.bjorck_stats)
        a = beta * ((v * self.eigvals()) @ v.mT) + (1 - beta) * m
        status = OK
        eigvals, eigvecs = linalg.subspace_iteration(a, v)
        if not (linalg.is_finite(eigvals) and linalg.is_finite(eigvecs)):
            eigvals, eigvecs = linalg.subspace_iteration(a.double(), v.double())
            status = RETRIED
            if not (linalg.is_finite(eigvals) and linalg.is_finite(eigvecs)):
                return FAILED
        self._put(self._key("eigvals"), eigvals.float())
        self._store("eigvecs", eigvecs.float(), transpose=True)
        return status

    # -- PIRU ----------------------------------------------------------------------------
    def update_root(self) -> str:
        """Recompute the inverse 4th root from the statistic; keep the old one on failure."""
        cfg = self.cfg
        if cfg.mode == "eigen":
            v = self.eigvecs(cfg.bjorck_root)
            result = None
            for dtype in (torch.float32, torch.float64):
                root = linalg.eigen_inverse_root(self.eigvals().to(dtype), v.to(dtype), 4, cfg.eps)
                if linalg.is_finite(root):
                    result = linalg.RootResult(root.float(), dtype == torch.float64)
                    break
        else:
            a = self._load("factor", offdiag=True)
            if cfg.root_method == "eigen":
                result = linalg.eigh_inverse_root(a, 4, cfg.eps)
            else:  # falls back to eigh itself (e.g. for an indefinite quantized factor)
                result = linalg.coupled_newton_inverse_root(a, 4, cfg.eps)
        if result is None:
            return FAILED
        self._store("root", result.root, offdiag=True)
        return RETRIED if result.retried else OK
