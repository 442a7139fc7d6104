"""The interface every storage mode implements, and the matrix codec they share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from ... import kernels, linalg
from ...kernels import QuantizedMatrix
from ...quant import Quantized, get_codebook, packed_numel

OK, RETRIED, FAILED = "ok", "retried", "failed"
SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Entries = dict[str, torch.Tensor]


class FactorConfig(NamedTuple):
    """Settings of one factor of order ``order``, derived from its parameter group.

    ``storage``, ``quantized``, ``bits``, ``statistic_bits``, ``error_feedback``, ``codebook``,
    ``block_size``, ``root_block_size``, ``scale_dtype`` fix the stored format; the rest only steer
    the updates and may change between steps.
    """

    order: int
    storage: str  # "cholesky", "eigenvectors", "naive" or "dense" (bits=32)
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
    scale_dtype: torch.dtype = torch.float32
    root_block_size: int = 64
    statistic_bits: int | None = None  # None: ``bits``
    error_feedback: bool = False

    @classmethod
    def from_group(cls, group: Mapping, order: int) -> FactorConfig:
        """The factor's settings from a validated (resolved) parameter group."""
        bits = group["bits"]
        storage = "dense" if bits == 32 else group["storage"]
        root_method = group["root_method"] or ("schur_newton" if storage == "naive" else "eigen")
        return cls(
            order=order,
            storage=storage,
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
            scale_dtype=SCALE_DTYPES[group["scale_dtype"]],
            root_block_size=group["root_block_size"],
            statistic_bits=group["statistic_bits"],
            error_feedback=bool(group["error_feedback"]),
        )


class Update(NamedTuple):
    """What an update computed: entries to commit (empty on failure), its status, and
    ``fresh`` fp32 tensors a following update of the same step may reuse (never stored)."""

    entries: Entries
    status: str
    fresh: Entries | None = None


class Storage:
    """One storage mode for factors of one configuration. Holds no state of its own."""

    def __init__(self, cfg: FactorConfig):
        self.cfg = cfg

    # -- the interface -------------------------------------------------------------------
    def init(self, device: torch.device) -> Entries:
        """Entries of a fresh factor: statistic ``eps I``, root ``I``."""
        raise NotImplementedError

    def update_stats(self, st: Mapping[str, torch.Tensor], m: torch.Tensor) -> Update:
        """Fold ``m`` (this step's G G^T or G^T G, fp32) into the statistic."""
        raise NotImplementedError

    def update_root(self, st: Mapping[str, torch.Tensor], fresh: Entries | None = None) -> Update:
        """Recompute the inverse 4th root; ``fresh`` is what ``update_stats`` just returned."""
        raise NotImplementedError

    def statistic(self, st: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The statistic as dense fp32."""
        raise NotImplementedError

    # -- diagnostics (callbacks, benchmarks) ---------------------------------------------
    stores_eigenvectors = False  # whether the state holds an eigenvector matrix (``eigvecs``)

    def eigenvalues(self, st: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The statistic's eigenvalues (fp32): ``eigvalsh`` of the stored statistic."""
        a = self.statistic(st)
        return torch.linalg.eigvalsh((a + a.mT) / 2)

    def exact_root(self, st: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The inverse 4th root the stored statistic gives when computed exactly (``eigh``,
        fp32, no quantization), for comparison with the stored root; None if it fails."""
        result = linalg.eigh_inverse_root(self.statistic(st), 4, self.cfg.eps)
        return None if result is None else result.root

    # -- shared by every mode ------------------------------------------------------------
    # the ``linalg`` function of ``root_method="schur_newton"`` (the naive baseline: the
    # paper's early-stopped variant)
    newton_root: str = "coupled_newton_inverse_root"

    def root_update(self, a: torch.Tensor) -> Update:
        """The root entries of statistic ``a``: its exact ``eigh`` inverse 4th root (float64
        retry), or with ``root_method="schur_newton"`` the Newton iteration ``newton_root``."""
        if self.cfg.root_method == "eigen":
            result = linalg.eigh_inverse_root(a, 4, self.cfg.eps)
        else:
            result = getattr(linalg, self.newton_root)(a, 4, self.cfg.eps)
        if result is None:
            return Update({}, FAILED)
        return Update(self.store("root", result.root, symmetric=True), RETRIED if result.retried else OK)

    def root(self, st: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The stored inverse root as dense fp32."""
        return self.load(st, "root", symmetric=True)

    def operand(self, st: Mapping[str, torch.Tensor]) -> torch.Tensor | QuantizedMatrix:
        """The root in the form the preconditioning kernel takes."""
        if not self.cfg.quantized:
            return st["root"]
        cfg = self.cfg
        codes, absmax, diag = st["root_codes"], st["root_absmax"], st["root_diag"]
        return QuantizedMatrix(
            codes, absmax, diag, cfg.order, self.codebook(codes.device), cfg.bits, cfg.root_block_size, symmetric=True
        )

    def codebook(self, device: torch.device) -> torch.Tensor:
        return get_codebook(self.cfg.codebook, self.cfg.bits, device)

    def store(self, name: str, x: torch.Tensor, *, symmetric: bool = False, transpose: bool = False) -> Entries:
        """Entries holding matrix ``x`` as ``name``: fp32, or quantized when the factor is.

        ``symmetric``: a symmetric matrix (a statistic or a root), stored as its fp32 diagonal
        plus the quantized strict upper triangle in blocks of ``root_block_size``; otherwise
        every row (of ``x^T`` with ``transpose``: every eigenvector) in blocks of ``block_size``.
        """
        cfg = self.cfg
        if not cfg.quantized:
            return {name: x.float().contiguous()}
        if x.device.type == "meta":  # shapes only (checkpoint checks, memory estimates)
            return self._describe(name, symmetric)
        codebook = self.codebook(x.device)
        if symmetric:
            q = kernels.quantize_symmetric(x, codebook, cfg.bits, cfg.root_block_size, scale_dtype=cfg.scale_dtype,
                                           backend=cfg.backend)
            return {f"{name}_codes": q.codes, f"{name}_absmax": q.absmax, f"{name}_diag": q.diag}
        q = kernels.quantize(
            x, codebook, cfg.bits, cfg.block_size, transpose=transpose, scale_dtype=cfg.scale_dtype, backend=cfg.backend
        )
        return {f"{name}_codes": q.codes, f"{name}_absmax": q.absmax}

    def _describe(self, name: str, symmetric: bool) -> Entries:
        cfg, n = self.cfg, self.cfg.order
        meta = dict(device="meta")
        if symmetric:
            numel, nblocks = n * (n - 1) // 2, sum(-(-(n - 1 - i) // cfg.root_block_size) for i in range(n - 1))
            return {
                f"{name}_codes": torch.empty(packed_numel(numel, cfg.bits), dtype=torch.uint8, **meta),
                f"{name}_absmax": torch.empty(nblocks, dtype=cfg.scale_dtype, **meta),
                f"{name}_diag": torch.empty(n, dtype=torch.float32, **meta),
            }
        return {
            f"{name}_codes": torch.empty(packed_numel(n * n, cfg.bits), dtype=torch.uint8, **meta),
            f"{name}_absmax": torch.empty(n, -(-n // cfg.block_size), dtype=cfg.scale_dtype, **meta),
        }

    def load(
        self, st: Mapping[str, torch.Tensor], name: str, *, symmetric: bool = False, transpose: bool = False
    ) -> torch.Tensor:
        """Matrix ``name`` as dense fp32."""
        cfg = self.cfg
        if not cfg.quantized:
            return st[name]
        n = cfg.order
        codebook = self.codebook(st[f"{name}_codes"].device)
        if symmetric:
            stored = QuantizedMatrix(st[f"{name}_codes"], st[f"{name}_absmax"], st[f"{name}_diag"], n,
                                     codebook, cfg.bits, cfg.root_block_size, symmetric=True)
            return kernels.materialize(stored, backend=cfg.backend)
        q = Quantized(st[f"{name}_codes"], st[f"{name}_absmax"], None)
        return kernels.dequantize(q, codebook, (n, n), cfg.bits, cfg.block_size, transpose=transpose, backend=cfg.backend)

    def statistic_codec(self, **changes) -> Storage:
        """A plain :class:`Storage` that stores and loads matrices at ``statistic_bits``
        (``changes``: further settings of the codec, e.g. its block size)."""
        return Storage(self.cfg._replace(bits=self.cfg.statistic_bits or self.cfg.bits, **changes))

    def eye(self, device: torch.device) -> torch.Tensor:
        return torch.eye(self.cfg.order, dtype=torch.float32, device=device)


def all_finite(*tensors: torch.Tensor) -> bool:
    """One host sync for several tensors (the updates that call this sync anyway)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
