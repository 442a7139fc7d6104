"""``QuantizedStateMonitor``: log what Shampoo4bit stores and how accurate its 4-bit state is."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from .. import kernels, linalg
from ..optim import COUNTERS, KINDS, Shampoo4bit, memory_report
from ..optim.distributed import is_dtensor
from ..optim.factor import Factor
from ..quant import get_codebook
from ._common import ShampooCallback, param_names, preconditioned_groups

__all__ = ["QuantizedStateMonitor", "factor_errors"]

TIMERS = ("time_stats_s", "time_roots_s")


def _nre(approx: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """``(||approx - exact||_F^2, ||exact||_F^2)`` in float64."""
    return float((approx.double() - exact.double()).pow(2).sum()), float(exact.double().pow(2).sum())


def factor_errors(factor: Factor, has_root: bool) -> dict[str, Any]:
    """Quantization diagnostics of one quantized factor (see :class:`QuantizedStateMonitor`).

    Returns a dict with ``orth``, ``orth_rectified``, ``eigvec_err2``/``eigvec_ref2`` (a factor
    that stores eigenvectors) and ``root_err2``/``root_ref2`` (when the root has been computed at
    least once; the reference is :meth:`Factor.exact_root`).
    """
    cfg = factor.cfg
    out: dict[str, Any] = {}
    if factor.stores_eigenvectors:
        v = factor.eigvecs(0)
        v_rect = linalg.bjorck(v, cfg.bjorck_root)
        out["orth"] = linalg.orthogonality_error(v)
        out["orth_rectified"] = linalg.orthogonality_error(v_rect)
        bits = cfg.statistic_bits or cfg.bits
        codebook = get_codebook(cfg.codebook, bits, v.device)
        q = kernels.quantize(
            v_rect, codebook, bits, cfg.block_size, transpose=True, scale_dtype=cfg.scale_dtype, backend=cfg.backend
        )
        requantized = kernels.dequantize(q, codebook, tuple(v.shape), bits, cfg.block_size, transpose=True,
                                         backend=cfg.backend)
        out["eigvec_err2"], out["eigvec_ref2"] = _nre(requantized, v_rect)
    if has_root:
        exact = factor.exact_root()
        if exact is not None:
            out["root_err2"], out["root_ref2"] = _nre(factor.root(), exact)
    return out


def _local_numel(p: torch.Tensor) -> int:
    """Elements this rank holds of ``p`` (a DTensor's local shard)."""
    return p.to_local().numel() if is_dtensor(p) else p.numel()


class QuantizedStateMonitor(ShampooCallback):
    """Every ``every_n_steps`` optimizer steps, log the state of each Shampoo4bit or SOAP4bit optimizer.

    For a ``SOAP4bit`` optimizer the metrics are the bytes by kind, ``memory_vs_adamw`` and its
    own counters (``steps``, ``refreshes``, ``skipped_nonfinite``, ``retried_updates``,
    ``failed_updates``); the Kronecker-factor metrics below are Shampoo4bit's.

    Logged with ``pl_module.log_dict`` (so they are in ``trainer.callback_metrics`` and
    ``EarlyStopping`` / ``ModelCheckpoint`` can monitor them) and written to every logger of the
    trainer at the step Lightning uses for the same batch's own metrics, under ``prefix``
    (``"shampoo/"``; a second Shampoo optimizer gets ``"shampoo_1/"``). Every rank computes them,
    so each rank's ``callback_metrics`` has them (a monitoring callback needs them on every DDP
    rank); loggers write from rank 0. Under DDP sharding (``distributed="auto"``) and FSDP2 the
    bytes, factor counts and errors are this rank's (the blocks it owns, its local shards), and
    so are ``retried_updates`` / ``failed_updates``. Between logging steps it costs one integer
    comparison per batch. The last values are also kept in :attr:`last_metrics`, and the worst
    factor of each ``*_max`` metric (``"layer.weight[block].L"``) in :attr:`worst`.

    Keys (all floats):

    * ``bytes/<kind>`` for ``moments, eigenvectors, eigenvalues, factors, roots, scales,
      other, second_order, total``: exact bytes of the state tensors (``memory_report()``);
      quantized moments (``moment_bits`` 8 / 4: ``exp_avg_codes``, ``exp_avg_absmax``, ...)
      count as ``moments``.
    * ``bytes/adamw_fp32``: what fp32 AdamW keeps for the optimizer's parameters, two fp32
      moments: ``2 x numel x 4`` bytes, whatever the parameters' dtype; ``memory_vs_adamw`` =
      ``bytes/total`` / ``bytes/adamw_fp32`` (below 1: less optimizer state than fp32 AdamW).
    * ``bytes/fp32_shampoo``: what 32-bit Shampoo stores for the same factors, an fp32 factor
      and an fp32 root, ``8 n^2`` bytes per factor of order n; ``compression_ratio`` =
      ``bytes/fp32_shampoo`` / the second-order bytes of the same parameters. ``factors``,
      ``quantized_factors``: counts. Groups with ``precondition=False`` have no factors
      (their moments still count in ``bytes/*``).
    * Quantization errors, over the quantized factors (none logged when no factor is
      quantized, e.g. all smaller than ``min_quant_numel``). With ``V = D(Q(U))`` the
      dequantized eigenvectors and ``V_r`` = ``V`` after the ``bjorck_steps[1]`` Björck steps
      that the root update applies:

      - ``eigvec_orth_error`` / ``eigvec_orth_error_rectified``: ``||V^T V - I||_F`` and
        ``||V_r^T V_r - I||_F``, mean over factors; ``*_max``: worst factor.
      - ``eigvec_nre``: ``||D(Q(V_r)) - V_r||_F / ||V_r||_F``, the error that quantizing the
        current eigenvectors introduces, pooled over factors (``sqrt(sum err^2 / sum ref^2)``);
        ``eigvec_nre_max``: worst factor.
      - ``root_nre``: ``||D(Q(root)) - R||_F / ||R||_F`` with ``R = V_r diag((lambda + rho)^-1/4) V_r^T``
        recomputed in fp32 from the stored eigenvalues (``rho = matrix_eps * max lambda``), pooled;
        ``root_nre_max``: worst factor. Only factors whose root has been computed. ``R`` uses
        the statistics as stored now, so when statistics were updated after the last root
        update the figure includes that staleness; logging on multiples of ``root_interval``
        gives the pure quantization error. For the Cholesky and naive storages ``R`` is the
        exact ``eigh`` root of the dequantized statistic.
    * ``eigval_min``, ``eigval_max``: extremes of the eigenvalues over all factors (stored
      Rayleigh quotients of the eigenvector storage, ``eigvalsh`` of the factor otherwise);
      ``condition_max``: largest ``(lambda_max + rho) / (max(lambda_min, 0) + rho)``, the
      condition number of the damped matrix whose root is taken.
    * ``steps, stat_updates, root_updates, skipped_nonfinite, retried_updates,
      failed_updates``: ``optimizer.counters``; ``time_stats_s``, ``time_roots_s``: seconds
      spent in statistics and root updates so far.
    * ``stat_interval``, ``root_interval``: the intervals in force (first Shampoo group).

    Args:
        every_n_steps: log every this many optimizer steps (``counters["steps"]``).
        errors: also compute the quantization errors and eigenvalue range (an eigen-solve
            per factor and logging step; bytes and counters are free).
        prefix: key prefix.
    """

    def __init__(self, every_n_steps: int = 100, errors: bool = True, prefix: str = "shampoo/") -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be an integer >= 1")
        if not isinstance(errors, bool):
            raise ValueError(f"errors={errors!r} must be True or False")
        if not isinstance(prefix, str):
            raise ValueError(f"prefix={prefix!r} must be a string")
        self.every_n_steps = every_n_steps
        self.errors = errors
        self.prefix = prefix
        self.last_metrics: dict[str, float] = {}
        self.worst: dict[str, str] = {}
        self._last_logged: list[int] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        # A new fit starts counting afresh (a resumed one gets its state back right after setup).
        self._last_logged = []
        if not trainer.loggers:
            rank_zero_warn(
                "QuantizedStateMonitor: the Trainer has no logger; metrics go to `trainer.callback_metrics` "
                "and `last_metrics` only"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        missing = len(self._optimizers) - len(self._last_logged)
        self._last_logged = self._last_logged[: len(self._optimizers)] + [-1] * max(0, missing)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for i, optimizer in enumerate(self._optimizers):
            steps = int(optimizer.counters["steps"])
            if steps % self.every_n_steps or steps == self._last_logged[i] or steps == 0:
                continue
            self._last_logged[i] = steps
            prefix = self.prefix if i == 0 else f"{self.prefix.rstrip('/')}_{i}/"
            metrics = self.collect(optimizer, param_names(pl_module), prefix)
            self.last_metrics.update(metrics)
            self._log(trainer, pl_module, metrics)

    @staticmethod
    def _log(trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float]) -> None:
        """Into ``trainer.callback_metrics`` (for EarlyStopping / ModelCheckpoint) and to the loggers.

        The loggers get the step Lightning gives the batch's own ``self.log`` metrics, whatever
        ``log_every_n_steps`` is (this callback has its own ``every_n_steps``).
        """
        values = {key: torch.tensor(value, dtype=torch.float64) for key, value in metrics.items()}  # exact byte counts
        pl_module.log_dict(values, on_step=True, on_epoch=False, logger=False)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    accepts = ("Shampoo4bit", "SOAP4bit")

    # -- measuring -----------------------------------------------------------------------
    def collect(self, optimizer: Any, names: dict[int, str], prefix: str = "shampoo/") -> dict[str, float]:
        """All metrics of ``optimizer`` now (see the class docstring), keys under ``prefix``."""
        m = self._bytes(optimizer, prefix)
        if not isinstance(optimizer, Shampoo4bit):  # SOAP4bit: bytes and its own counters
            m.update({f"{prefix}{key}": float(value) for key, value in optimizer.counters.items()})
            return m
        shampoo_params = {id(p) for _, g in preconditioned_groups(optimizer) for p in g["params"]}
        factors = [f for f in optimizer.factors() if id(f[0]) in shampoo_params]
        fp32_bytes = sum(8 * f.order**2 for *_, f in factors)
        used = memory_report(s for p, s in optimizer.state.items() if id(p) in shampoo_params)["second_order"]
        m[f"{prefix}bytes/fp32_shampoo"] = float(fp32_bytes)
        if used:
            m[f"{prefix}compression_ratio"] = fp32_bytes / used
        m[f"{prefix}factors"] = float(len(factors))
        m[f"{prefix}quantized_factors"] = float(sum(f.cfg.quantized for *_, f in factors))
        for key in COUNTERS:
            m[f"{prefix}{key}"] = float(optimizer.counters[key])
        for key in TIMERS:
            m[f"{prefix}{key}"] = float(optimizer.counters[key])
        group = next((g for _, g in preconditioned_groups(optimizer)), None)
        if group is not None:
            m[f"{prefix}stat_interval"] = float(group["stat_interval"])
            m[f"{prefix}root_interval"] = float(group["root_interval"])
        if self.errors and factors:
            device_type = factors[0][0].device.type
            with torch.no_grad(), torch.autocast(device_type, enabled=False):  # fp32, whatever the precision
                m.update(self._errors(optimizer, factors, names, prefix))
        return m

    @staticmethod
    def _bytes(optimizer: Any, prefix: str) -> dict[str, float]:
        """The state bytes by kind, and against fp32 AdamW's two moments."""
        m: dict[str, float] = {}
        report = optimizer.memory_report()
        for kind in (*KINDS, "second_order", "total"):
            m[f"{prefix}bytes/{kind}"] = float(report[kind])
        adamw = 2 * 4 * sum(_local_numel(p) for g in optimizer.param_groups for p in g["params"])
        m[f"{prefix}bytes/adamw_fp32"] = float(adamw)
        if adamw:
            m[f"{prefix}memory_vs_adamw"] = report["total"] / adamw
        return m

    def _errors(self, optimizer: Shampoo4bit, factors: list, names: dict[int, str], prefix: str) -> dict[str, float]:
        per: dict[str, list[tuple[float, str]]] = {"orth": [], "orth_rectified": []}
        pooled = {"eigvec": [0.0, 0.0], "root": [0.0, 0.0]}
        worst_nre: dict[str, tuple[float, str]] = {}
        lam_min, lam_max, cond = math.inf, -math.inf, 0.0
        for p, block, side, factor in factors:
            label = f"{names.get(id(p), 'param')}[{block}].{side}"
            lam = factor.eigvals().float()
            top = float(lam.max())
            lam_min, lam_max = min(lam_min, float(lam.min())), max(lam_max, top)
            rho = factor.cfg.eps * max(top, 0.0)
            if rho > 0:
                cond = max(cond, (top + rho) / (max(float(lam.min()), 0.0) + rho))
            if not factor.cfg.quantized:
                continue
            has_root = float(optimizer.state[p].get("last_root_step", 0)) > 0
            err = factor_errors(factor, has_root)
            for key in ("orth", "orth_rectified"):
                if key in err:
                    per[key].append((err[key], label))
            for kind in ("eigvec", "root"):
                if f"{kind}_err2" in err:
                    e2, r2 = err[f"{kind}_err2"], err[f"{kind}_ref2"]
                    pooled[kind][0] += e2
                    pooled[kind][1] += r2
                    nre = math.sqrt(e2 / r2) if r2 > 0 else 0.0
                    if nre >= worst_nre.get(kind, (-1.0, ""))[0]:
                        worst_nre[kind] = (nre, label)
        out = {f"{prefix}eigval_min": lam_min, f"{prefix}eigval_max": lam_max, f"{prefix}condition_max": cond}
        for key, values in per.items():
            if values:
                name = f"eigvec_{key.replace('orth', 'orth_error')}"
                worst = max(values)
                out[f"{prefix}{name}"] = sum(v for v, _ in values) / len(values)
                out[f"{prefix}{name}_max"] = worst[0]
                self.worst[f"{prefix}{name}_max"] = worst[1]
        for kind, (e2, r2) in pooled.items():
            if kind in worst_nre:
                out[f"{prefix}{kind}_nre"] = math.sqrt(e2 / r2) if r2 > 0 else 0.0
                out[f"{prefix}{kind}_nre_max"] = worst_nre[kind][0]
                self.worst[f"{prefix}{kind}_nre_max"] = worst_nre[kind][1]
        return out

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"last_logged_steps": list(self._last_logged)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_logged = [int(s) for s in state_dict.get("last_logged_steps", [])]
