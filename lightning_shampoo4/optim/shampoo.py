"""``Shampoo4bit``: Shampoo with 4-bit quantized preconditioners, grafted onto AdamW or SGD.

Per step and parameter (SPEC.md section 4): count the step; every ``stat_interval`` steps
update the Kronecker statistics (PU); every ``root_interval`` steps recompute the inverse
roots (PIRU); precondition ``L^-1/4 G R^-1/4`` block by block; rescale to the gradient's
norm (grafting); hand the result to AdamW or SGD as if it were the gradient.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch.optim import Optimizer

from .. import kernels
from .blocking import Block, blocks_for
from .factor import FAILED, RETRIED, Factor, FactorConfig
from .memory import memory_report
from .validation import validate_group

__all__ = ["COUNTERS", "Shampoo4bit"]

COUNTERS = (
    "steps",  # step() calls that updated at least one parameter (the optimizer's own steps)
    "stat_updates",  # factor statistics updated (PU)
    "root_updates",  # inverse roots recomputed (PIRU)
    "skipped_nonfinite",  # steps skipped whole because some gradient had inf/NaN
    "retried_updates",  # decompositions that succeeded only on retry (float64, or eigh after Newton)
    "failed_updates",  # decompositions that failed in float64 too; previous kept
)
TIMERS = ("time_stats_s", "time_roots_s")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Shampoo4bit(Optimizer):
    """Shampoo whose preconditioners are 4-bit eigenvector matrices plus fp32 eigenvalues.

    Args:
        params: iterable of parameters or of parameter-group dicts (any argument below can
            be overridden per group).
        lr: learning rate of the base optimizer.
        betas: AdamW moment coefficients (``base="adamw"``).
        eps: AdamW denominator epsilon.
        weight_decay: decoupled (AdamW) or coupled L2 (SGD) weight decay.
        momentum: SGD momentum (``base="sgd"``).
        nesterov: Nesterov momentum for SGD.
        base: the first-order optimizer fed with the preconditioned gradient, "adamw" or "sgd".
        bits: 4 or 8 for quantized state, 32 for plain 32-bit Shampoo.
        quantize: "eigenvectors" (the 4-bit Shampoo method) or "preconditioner" (the naive
            baseline that quantizes the factors and roots themselves).
        codebook: "linear2" (default), "dynamic" (dynamic tree) or "linear".
        block_size: elements per quantization block (one fp32 absmax each).
        min_quant_numel: factors with fewer elements stay fp32.
        max_order: largest factor order; larger dims are split into blocks.
        shampoo_beta: EMA coefficient of the Kronecker statistics.
        matrix_eps: relative damping of the inverse root, ``rho = matrix_eps * lambda_max``
            (1e-4 is the safer value late in training).
        stat_interval: optimizer steps between statistics updates (T1).
        root_interval: optimizer steps between inverse-root updates (T2, a multiple of T1).
        bjorck_steps: Björck steps applied to dequantized eigenvectors before a statistics
            update and before a root update.
        root_method: "eigen" (eigendecomposition) or "schur_newton" (coupled Newton);
            None picks the paper's choice: Schur-Newton for ``quantize="preconditioner"``,
            eigen otherwise.
        kernel_backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
        precondition_dtype: dtype of the per-step preconditioning matmuls ("float32",
            "bfloat16", "float16"); statistics and roots are always computed in fp32.
        start_preconditioning_step: no statistics or root updates before this step, so the
            optimizer runs as its base optimizer until then.
        precondition: False gives a group no Shampoo state at all, only the base update
            (for embeddings and other matrices where Shampoo does not pay).

    Rank <= 1 tensors (biases, norm weights) get the plain base update. Like a GradScaler,
    ``step()`` skips the whole step, and counts it, when any gradient has inf or NaN, so
    statistics are never poisoned and every parameter keeps the same step count.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        nesterov: bool = False,
        base: Literal["adamw", "sgd"] = "adamw",
        bits: Literal[4, 8, 32] = 4,
        quantize: Literal["eigenvectors", "preconditioner"] = "eigenvectors",
        codebook: Literal["linear2", "dynamic", "linear"] = "linear2",
        block_size: int = 64,
        min_quant_numel: int = 4096,
        max_order: int = 1200,
        shampoo_beta: float = 0.95,
        matrix_eps: float = 1e-6,
        stat_interval: int = 100,
        root_interval: int = 500,
        bjorck_steps: tuple[int, int] = (1, 4),
        root_method: Literal["eigen", "schur_newton"] | None = None,
        kernel_backend: Literal["auto", "triton", "torch"] = "auto",
        precondition_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        start_preconditioning_step: int = 0,
        precondition: bool = True,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            base=base,
            bits=bits,
            quantize=quantize,
            codebook=codebook,
            block_size=block_size,
            min_quant_numel=min_quant_numel,
            max_order=max_order,
            shampoo_beta=shampoo_beta,
            matrix_eps=matrix_eps,
            stat_interval=stat_interval,
            root_interval=root_interval,
            bjorck_steps=tuple(bjorck_steps),
            root_method=root_method,
            kernel_backend=kernel_backend,
            precondition_dtype=precondition_dtype,
            start_preconditioning_step=start_preconditioning_step,
            precondition=precondition,
        )
        validate_group(defaults)
        self.counters: dict[str, float] = {k: 0 for k in COUNTERS} | {k: 0.0 for k in TIMERS}
        super().__init__(params, defaults)

    # -- groups and state ----------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in ("betas", "bjorck_steps"):
            group[key] = tuple(group[key])
        validate_group(group)

    @staticmethod
    def _blocks(p: torch.Tensor, group: dict) -> tuple[tuple[int, int] | None, tuple[Block, ...]]:
        if not group["precondition"]:
            return None, ()
        return blocks_for(tuple(p.shape), group["max_order"])

    def _factors(self, p: torch.Tensor, group: dict) -> list[tuple[Block, Factor, Factor]]:
        state = self.state[p]
        _, blocks = self._blocks(p, group)
        out = []
        for i, b in enumerate(blocks):
            left = Factor(state, f"{i}.L", b.rows, FactorConfig.from_group(group, b.rows))
            right = Factor(state, f"{i}.R", b.cols, FactorConfig.from_group(group, b.cols))
            out.append((b, left, right))
        return out

    def _init_state(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        state["step"] = 0  # Python ints: exact at any count, and no device sync to read
        if group["base"] == "adamw":
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for _, left, right in self._factors(p, group):
            left.init(p.device)
            right.init(p.device)
        if self._blocks(p, group)[1]:
            state["last_root_step"] = 0  # step of the last root update; 0: none yet

    def init_state(self) -> None:
        """Create the state of every parameter now instead of at its first step."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self._init_state(p, group)

    def memory_report(self) -> dict[str, int]:
        """Exact bytes of the optimizer state by kind: moments, eigenvectors, eigenvalues,
        factors, roots, scales, other, plus ``second_order`` and ``total``."""
        return memory_report(self.state.values())

    def factors(self) -> Iterable[tuple[torch.Tensor, int, str, Factor]]:
        """``(param, block index, side, factor)`` for every Shampoo factor with state."""
        for group in self.param_groups:
            for p in group["params"]:
                if self.state[p]:
                    for i, (_, left, right) in enumerate(self._factors(p, group)):
                        yield p, i, "L", left
                        yield p, i, "R", right

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["counters"] = dict(self.counters)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like torch does, but keep every state tensor's saved dtype.

        torch casts floating state to the parameter's dtype; that would turn uint8 codes into
        floats and fp32 eigenvalues into bf16 for a bf16 model.
        """
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        by_id = dict(zip(saved_ids, params))
        for pid, pstate in saved_state.items():
            p = by_id[pid]
            self.state[p] = {
                k: v.detach().to(p.device, copy=True) if isinstance(v, torch.Tensor) else v for k, v in pstate.items()
            }
        self.counters.update(state_dict.get("counters", {}))

    # -- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step; ``closure`` (if given) is called once with grad enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            validate_group(group)
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("Shampoo4bit does not support sparse gradients")
                    work.append((p, group))
        if not work:
            return loss
        if not self._all_finite([p.grad for p, _ in work]):
            self.counters["skipped_nonfinite"] += 1
            return loss
        for p, group in work:
            if not self.state[p]:
                self._init_state(p, group)
            self._step_param(p, group)
        self.counters["steps"] += 1
        return loss

    @staticmethod
    def _all_finite(grads: list[torch.Tensor]) -> bool:
        """One device sync per device for the whole step."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(torch.isfinite(g).all())
        return all(bool(torch.stack(flags).all()) for flags in by_device.values())

    def _step_param(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        state["step"] += 1
        step = state["step"]
        grad = p.grad
        factors = self._factors(p, group)
        if factors:
            grad = self._precondition(p, group, factors, step)
        if group["base"] == "adamw":
            self._adamw(p, grad, state, group, step)
        else:
            self._sgd(p, grad, state, group)

    def _precondition(self, p: torch.Tensor, group: dict, factors: list, step: int) -> torch.Tensor:
        state = self.state[p]
        mshape, _ = self._blocks(p, group)
        g = p.grad.float().reshape(mshape)
        active = step >= group["start_preconditioning_step"]
        if active and step % group["stat_interval"] == 0:
            t0 = self._tick(p)
            for b, left, right in factors:
                gb = g[b.r0 : b.r1, b.c0 : b.c1]
                self._record(left.update_stats(gb @ gb.mT))
                self._record(right.update_stats(gb.mT @ gb))
            self.counters["stat_updates"] += 2 * len(factors)
            self.counters["time_stats_s"] += self._tick(p) - t0
        if active and step % group["root_interval"] == 0:
            t0 = self._tick(p)
            for _, left, right in factors:
                self._record(left.update_root())
                self._record(right.update_root())
            self.counters["root_updates"] += 2 * len(factors)
            state["last_root_step"] = step
            self.counters["time_roots_s"] += self._tick(p) - t0
        if state["last_root_step"] == 0:
            return p.grad  # roots are still the identity: exactly the base optimizer
        dtype = _DTYPES[group["precondition_dtype"]]
        out = torch.empty_like(g)
        for b, left, right in factors:
            out[b.r0 : b.r1, b.c0 : b.c1] = kernels.precondition(
                g[b.r0 : b.r1, b.c0 : b.c1], left.operand(), right.operand(), dtype=dtype, backend=group["kernel_backend"]
            )
        out.mul_(g.norm() / (out.norm() + 1e-12))  # graft onto the gradient's norm
        return out.view(p.shape).to(p.dtype)

    def _record(self, status: str) -> None:
        if status == RETRIED:
            self.counters["retried_updates"] += 1
        elif status == FAILED:
            self.counters["failed_updates"] += 1

    @staticmethod
    def _tick(p: torch.Tensor) -> float:
        if p.device.type == "cuda":
            torch.cuda.synchronize(p.device)
        return time.perf_counter()

    # -- base optimizers -----------------------------------------------------------------
    @staticmethod
    def _adamw(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, step: int) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1**step
        bias2_sqrt = (1 - beta2**step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-lr / bias1)

    @staticmethod
    def _sgd(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        if group["weight_decay"]:
            grad = grad.add(p, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(momentum).add_(grad)
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(grad, alpha=-group["lr"])
