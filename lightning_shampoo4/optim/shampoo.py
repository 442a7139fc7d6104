"""``Shampoo4bit``: Shampoo with 4-bit quantized preconditioners, grafted onto AdamW or SGD.

One step (SPEC.md section 4), in three phases so that it either completes or leaves no trace:

1. **compute**: for every parameter with a gradient, the due statistics (PU) and inverse-root
   (PIRU) updates of its blocks, each *returning* new state entries, then the preconditioned,
   grafted direction ``L^-1/4 G R^-1/4 * ||G|| / ||L^-1/4 G R^-1/4||``;
2. **check**: one device-side flag for "some direction is inf/NaN";
3. **commit**: write the new entries, advance the counters and run the base optimizer (fused
   AdamW or SGD) with that flag, so a non-finite step changes nothing.

Steps without a PU or PIRU (the steady state) never wait on the device: the flag stays on the
device and the count of skipped steps is read only when :attr:`Shampoo4bit.counters` is.
Steps with a PU or PIRU check the gradients on the host first, since their linear algebra
synchronizes anyway.
"""

from __future__ import annotations

import time
import warnings
from collections import ChainMap
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple

import torch
from torch.optim import Optimizer

from . import base_update, preconditioning
from .blocking import Block, blocks_for
from .checkpoint import load_optimizer_state
from .factor import Factor, PrefixView
from .memory import memory_report
from .storage import FAILED, RETRIED, FactorConfig, Storage, Update, storage_for
from .validation import FORMAT_KEYS, validate_group

__all__ = ["COUNTERS", "Shampoo4bit"]

COUNTERS = (
    "steps",  # step() calls with at least one gradient: the clock of stat_interval / root_interval
    "stat_updates",  # factor statistics updated (PU)
    "root_updates",  # inverse roots recomputed (PIRU)
    "skipped_nonfinite",  # steps that changed nothing because a gradient or direction had inf/NaN
    "retried_updates",  # decompositions that succeeded only on retry (float64, or eigh after Newton)
    "failed_updates",  # updates that failed (non-finite result, linear-algebra error); previous kept
)
TIMERS = ("time_stats_s", "time_roots_s")
SKIP_WARN_AFTER = 50  # consecutive skipped steps after which the optimizer warns, once

# every per-group hyper-parameter (the constructor's arguments after params)
HYPER_KEYS = (
    "lr", "betas", "eps", "weight_decay", "momentum", "nesterov", "base", "bits", "moment_bits", "quantize",
    "codebook", "block_size", "root_block_size", "scale_dtype", "min_quant_numel", "max_order", "shampoo_beta", "matrix_eps", "stat_interval",
    "root_interval", "bjorck_steps", "root_method", "kernel_backend", "precondition_dtype",
    "start_preconditioning_step", "precondition",
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Side(NamedTuple):
    prefix: str
    order: int


class _Plan(NamedTuple):
    """How one parameter maps onto blocks and factors; fixed once the parameter has state."""

    mshape: tuple[int, int] | None
    blocks: tuple[Block, ...]
    sides: tuple[tuple[_Side, _Side], ...]
    fmt: tuple


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
        moment_bits: 32 (the parameter's dtype), 8 or 4: storage of the base optimizer's moments.
        quantize: "eigenvectors" (the 4-bit Shampoo method) or "preconditioner" (the naive
            baseline that quantizes the factors and roots themselves).
        codebook: "linear2" (default), "dynamic" (dynamic tree) or "linear".
        block_size: elements per quantization block of the eigenvectors (one scale each).
        root_block_size: elements per quantization block of a stored inverse root (and of the
            naive baseline's statistic); these are symmetric, so only their strict upper
            triangle is stored, beside an fp32 diagonal.
        scale_dtype: dtype of the per-block scales ("bfloat16", "float16" or "float32").
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
            None picks the paper's choice: its early-stopped Newton for
            ``quantize="preconditioner"``, eigen otherwise.
        kernel_backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
        precondition_dtype: dtype of the per-step preconditioning matmuls ("float32",
            "bfloat16", "float16"); statistics and roots are always computed in fp32.
        start_preconditioning_step: no statistics or root updates before this step, so the
            optimizer runs as its base optimizer until then.
        precondition: False gives a group no Shampoo state at all, only the base update
            (for embeddings and other matrices where Shampoo does not pay).

    Rank <= 1 tensors (biases, norm weights) get the plain base update. Intervals count the
    optimizer's own ``step()`` calls that had gradients (``counters["steps"]``), whichever
    parameters had them. A step whose gradients or preconditioned directions hold inf / NaN
    changes no parameter and no state, and is counted in ``counters["skipped_nonfinite"]``.
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
        moment_bits: Literal[4, 8, 32] = 32,
        quantize: Literal["eigenvectors", "preconditioner"] = "eigenvectors",
        codebook: Literal["linear2", "dynamic", "linear"] = "linear2",
        block_size: int = 64,
        root_block_size: int = 256,
        scale_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
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
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            base=base,
            bits=bits,
            moment_bits=moment_bits,
            quantize=quantize,
            codebook=codebook,
            block_size=block_size,
            root_block_size=root_block_size,
            scale_dtype=scale_dtype,
            min_quant_numel=min_quant_numel,
            max_order=max_order,
            shampoo_beta=shampoo_beta,
            matrix_eps=matrix_eps,
            stat_interval=stat_interval,
            root_interval=root_interval,
            bjorck_steps=bjorck_steps,
            root_method=root_method,
            kernel_backend=kernel_backend,
            precondition_dtype=precondition_dtype,
            start_preconditioning_step=start_preconditioning_step,
            precondition=precondition,
        )
        validate_group(defaults)
        self._init_bookkeeping()
        super().__init__(params, defaults)

    def _init_bookkeeping(self) -> None:
        """Counters and caches: everything here besides the counts is derived and rebuilt."""
        self._counts: dict[str, float] = {k: 0 for k in COUNTERS} | {k: 0.0 for k in TIMERS}
        self._skips: dict[torch.device, torch.Tensor] = {}  # device-side skipped-step counts
        self._skip_mark = (0, 0)  # (clock, skipped steps) when the host last looked
        self._skip_run = 0  # consecutive skipped steps seen so far
        self._skip_warned = False
        self._plans: dict[int, _Plan] = {}
        self._group_cache: dict[int, tuple[tuple, dict[int, Storage]]] = {}
        self.sync_timers = False  # synchronize CUDA around PU / PIRU so the timers are exact

    # -- counters ------------------------------------------------------------------------
    @property
    def counters(self) -> dict[str, float]:
        """Event counts and timers (see ``COUNTERS``); reading it waits for pending skips."""
        self._fold_skips()
        return dict(self._counts)

    def _fold_skips(self) -> None:
        """Add the device-side skip counts to the host counts (waits for them: call it only
        where the host synchronizes anyway), then warn once if every recent step was skipped."""
        for flag in self._skips.values():
            self._counts["skipped_nonfinite"] += int(flag.item())
        self._skips.clear()
        clock, skipped = self._counts["steps"], self._counts["skipped_nonfinite"]
        last_clock, last_skipped = self._skip_mark
        self._skip_mark = (clock, skipped)
        if clock == last_clock:
            return
        self._skip_run = self._skip_run + clock - last_clock if skipped - last_skipped == clock - last_clock else 0
        if self._skip_run >= SKIP_WARN_AFTER and not self._skip_warned:
            self._skip_warned = True
            warnings.warn(
                f"Shampoo4bit skipped each of the last {self._skip_run} steps because a gradient or a preconditioned "
                f"direction held inf / NaN (counters['skipped_nonfinite'] = {skipped}): nothing is being trained. "
                "Check the loss and the parameters for inf / NaN.",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- groups and state ----------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if p.is_complex():
                raise ValueError(
                    f"complex parameters are not supported (got one of shape {tuple(p.shape)}); "
                    "optimize torch.view_as_real(p) as a real parameter instead"
                )
        validate_group(group)
        group.setdefault("clock", self.param_groups[0].get("clock", 0))

    @property
    def _clock(self) -> int:
        return self.param_groups[0]["clock"] if self.param_groups else 0

    def _group_storages(self, group: dict) -> dict[int, Storage]:
        """The group's storages by factor order; revalidates the group when it changed."""
        sig = tuple(group[k] for k in HYPER_KEYS)
        cached = self._group_cache.get(id(group))
        if cached is not None and cached[0] == sig:
            return cached[1]
        validate_group(group)
        storages: dict[int, Storage] = {}
        self._group_cache[id(group)] = (tuple(group[k] for k in HYPER_KEYS), storages)
        return storages

    def _storage(self, group: dict, order: int) -> Storage:
        storages = self._group_storages(group)
        st = storages.get(order)
        if st is None:
            st = storages[order] = storage_for(FactorConfig.from_group(group, order))
        return st

    def _plan(self, p: torch.Tensor, group: dict) -> _Plan:
        """The parameter's plan; raises if a format setting changed after its state existed."""
        fmt = tuple(group[k] for k in FORMAT_KEYS)
        plan = self._plans.get(id(p))
        if plan is not None and plan.fmt == fmt:
            return plan
        if plan is not None and self.state.get(p):
            changed = [f"{k} {a!r} -> {b!r}" for k, a, b in zip(FORMAT_KEYS, plan.fmt, fmt) if a != b]
            raise ValueError(
                f"the storage format of a parameter of shape {tuple(p.shape)} changed after its state was "
                f"created ({', '.join(changed)}); the stored state cannot be reinterpreted. Keep these settings "
                "fixed, or start a new optimizer (or clear its state) to change them"
            )
        plan = self._plans[id(p)] = make_plan(p, group)
        return plan

    def _new_state(self, p: torch.Tensor, group: dict, device: torch.device | str | None = None) -> dict[str, Any]:
        """A fresh state for ``p`` (not yet stored); ``device="meta"`` only describes it."""
        device = p.device if device is None else torch.device(device)
        plan = make_plan(p, group)
        state: dict[str, Any] = {"step": torch.zeros((), dtype=torch.float32, device=device)}
        like = p if device == p.device else torch.empty_like(p, device=device)
        state.update(base_update.init_moments(like, group))
        for left, right in plan.sides:
            for side in (left, right):
                for name, t in self._storage(group, side.order).init(device).items():
                    state[f"{side.prefix}.{name}"] = t
        if plan.sides:
            state["last_root_step"] = 0  # optimizer step of the last root update; 0: none yet
        return state

    def init_state(self) -> None:
        """Create the state of every parameter now instead of at its first step."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state.get(p):
                    self.state[p] = self._new_state(p, group)

    def memory_report(self) -> dict[str, int]:
        """Exact bytes of the optimizer state by kind: moments, eigenvectors, eigenvalues,
        factors, roots, scales, other, plus ``second_order`` and ``total``."""
        return memory_report(self.state.values())

    def factors(self) -> Iterable[tuple[torch.Tensor, int, str, Factor]]:
        """``(param, block index, side, factor)`` for every Shampoo factor with state."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for i, (left, right) in enumerate(self._plan(p, group).sides):
                    yield p, i, "L", Factor(state, left.prefix, self._storage(group, left.order))
                    yield p, i, "R", Factor(state, right.prefix, self._storage(group, right.order))

    # -- checkpointing and copies --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["counters"] = self.counters
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint after checking it fits (keys, shapes, dtypes, finite values).

        Unlike torch, the saved dtype of every second-order tensor is kept (uint8 codes stay
        codes, fp32 eigenvalues stay fp32 for a bf16 model); moments follow the parameter's
        dtype as in torch. Nothing changes when the check fails.
        """
        load_optimizer_state(self, state_dict, super().load_state_dict)
        self._plans.clear()
        self._group_cache.clear()
        self._skips.clear()
        self._counts = {k: 0 for k in COUNTERS} | {k: 0.0 for k in TIMERS}
        self._counts.update({k: v for k, v in state_dict.get("counters", {}).items() if k in self._counts})
        self._skip_mark, self._skip_run = (self._counts["steps"], self._counts["skipped_nonfinite"]), 0
        for group in self.param_groups:
            group.setdefault("clock", 0)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_counts": self.counters, "sync_timers": self.sync_timers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        counts, sync_timers = state.pop("_counts", None), state.pop("sync_timers", False)
        super().__setstate__(state)
        self._init_bookkeeping()
        if counts:
            self._counts.update(counts)
            self._skip_mark = (self._counts["steps"], self._counts["skipped_nonfinite"])
        self.sync_timers = sync_timers

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
            self._group_storages(group)  # validates the group if it changed
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("Shampoo4bit does not support sparse gradients")
                    work.append((p, group, self._plan(p, group)))
        if not work:
            return loss
        clock = self._clock + 1
        due = {}
        for group in self.param_groups:
            active = group["precondition"] and clock >= group["start_preconditioning_step"]
            due[id(group)] = (active and clock % group["stat_interval"] == 0, active and clock % group["root_interval"] == 0)
        updates_due = any(s or r for s, r in due.values())
        if updates_due and not _all_finite([p.grad for p, _, _ in work]):
            self._commit_clock(clock)
            self._counts["skipped_nonfinite"] += 1
            self._fold_skips()
            return loss

        # 1. compute
        counts = dict.fromkeys(("stat_updates", "root_updates", "retried_updates", "failed_updates"), 0)
        timers = dict.fromkeys(TIMERS, 0.0)
        pending: list[tuple[dict, str, dict]] = []  # (state, key prefix, new entries)
        new_states: dict[torch.Tensor, dict] = {}
        directions: list[torch.Tensor] = []
        jobs: list[preconditioning.Job] = []
        preconditioned: list[tuple[int, torch.Tensor, _Plan, int]] = []  # (direction index, G, plan, first job)
        for p, group, plan in work:
            state = self.state.get(p)
            if not state:
                state = new_states[p] = self._new_state(p, group)
            if not plan.sides:
                directions.append(p.grad)
                continue
            stats_due, roots_due = due[id(group)]
            g = p.grad.float().reshape(plan.mshape)
            operands = self._update_factors(p, group, plan, state, g, stats_due, roots_due, clock, pending, counts, timers)
            if operands is None:
                directions.append(p.grad)
                continue
            dtype, backend = _DTYPES[group["precondition_dtype"]], group["kernel_backend"]
            preconditioned.append((len(directions), g, plan, len(jobs)))
            directions.append(p.grad)  # replaced below
            for block, (lo, ro) in zip(plan.blocks, operands):
                gb = g if len(plan.blocks) == 1 else g[block.r0 : block.r1, block.c0 : block.c1]
                jobs.append(preconditioning.Job(gb, lo, ro, dtype, backend))
        results = preconditioning.run(jobs)
        graft = []
        for index, g, plan, first in preconditioned:
            if len(plan.blocks) == 1:
                hat = results[first]
            else:
                hat = torch.empty_like(g)
                for j, block in enumerate(plan.blocks):
                    hat[block.r0 : block.r1, block.c0 : block.c1] = results[first + j]
            graft.append((index, g, hat))
            directions[index] = hat
        self._graft(graft)
        for i, p_work in enumerate(work):
            p = p_work[0]
            if directions[i] is not p.grad:
                directions[i] = directions[i].view(p.shape).to(p.dtype)

        # 2. check
        found_inf = _non_finite_flags(directions, [p for p, _, _ in work])
        if updates_due and any(bool(f) for f in found_inf.values()):
            self._commit_clock(clock)
            self._counts["skipped_nonfinite"] += 1
            self._fold_skips()
            return loss

        # 3. commit: the base update first, the one part left that can raise (out of memory);
        # it changes nothing when it does, and the new states it needed are taken back
        for p, state in new_states.items():
            self.state[p] = state
        try:
            base_update.apply(self, work, directions, found_inf)
        except BaseException:
            for p in new_states:
                del self.state[p]
            raise
        for state, prefix, entries in pending:
            for name, t in entries.items():
                state[f"{prefix}.{name}" if prefix else name] = t
        for k, v in counts.items():
            self._counts[k] += v
        for k, v in timers.items():
            self._counts[k] += v
        self._commit_clock(clock)
        if updates_due:
            self._fold_skips()  # the flags were read above: no extra wait
        else:
            for dev, flag in found_inf.items():
                self._skips[dev] = self._skips[dev] + flag if dev in self._skips else flag.clone()
        return loss

    def _commit_clock(self, clock: int) -> None:
        for group in self.param_groups:
            group["clock"] = clock
        self._counts["steps"] = clock

    def _update_factors(self, p, group, plan, state, g, stats_due, roots_due, clock, pending, counts, timers):
        """Due PU / PIRU of every block (new entries into ``pending``); the ``(left, right)``
        root operands per block, or None while no root exists (the base optimizer then runs
        on the raw gradient)."""
        if roots_due:
            pending.append((state, "", {"last_root_step": clock}))
        operands = []
        for block, (left, right) in zip(plan.blocks, plan.sides):
            gb = g if len(plan.blocks) == 1 else g[block.r0 : block.r1, block.c0 : block.c1]
            pair = []
            for side, is_left in ((left, True), (right, False)):
                storage = self._storage(group, side.order)
                new: dict[str, torch.Tensor] = {}
                view = ChainMap(new, PrefixView(state, side.prefix))
                fresh = None
                if stats_due:
                    t0 = self._tick(p)
                    upd = _guarded(storage.update_stats, view, gb @ gb.mT if is_left else gb.mT @ gb)
                    new.update(upd.entries)
                    fresh = upd.fresh
                    _record(upd.status, counts)
                    counts["stat_updates"] += 1
                    timers["time_stats_s"] += self._tick(p) - t0
                if roots_due:
                    t0 = self._tick(p)
                    upd = _guarded(storage.update_root, view, fresh)
                    new.update(upd.entries)
                    _record(upd.status, counts)
                    counts["root_updates"] += 1
                    timers["time_roots_s"] += self._tick(p) - t0
                if new:
                    pending.append((state, side.prefix, new))
                pair.append(storage.operand(view))
            operands.append(pair)
        if not roots_due and state["last_root_step"] == 0:
            return None
        return operands

    @staticmethod
    def _graft(graft: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Rescale every preconditioned matrix to its gradient's norm, in place.

        Norms are taken in float64, so a huge but finite gradient cannot overflow them.
        """
        if not graft:
            return
        _, grads, hats = zip(*graft)
        gn = torch._foreach_norm(list(grads), 2, dtype=torch.float64)
        hn = torch._foreach_norm(list(hats), 2, dtype=torch.float64)
        torch._foreach_add_(hn, 1e-12)
        torch._foreach_div_(gn, hn)
        torch._foreach_mul_(list(hats), gn)

    def _tick(self, p: torch.Tensor) -> float:
        if self.sync_timers and p.device.type == "cuda":
            torch.cuda.synchronize(p.device)
        return time.perf_counter()


def make_plan(p: torch.Tensor, group: dict) -> _Plan:
    """How ``p`` maps onto Shampoo blocks under ``group``'s settings."""
    fmt = tuple(group[k] for k in FORMAT_KEYS)
    mshape, blocks = blocks_for(tuple(p.shape), group["max_order"]) if group["precondition"] else (None, ())
    sides = tuple((_Side(f"{i}.L", b.rows), _Side(f"{i}.R", b.cols)) for i, b in enumerate(blocks))
    return _Plan(mshape, blocks, sides, fmt)


def _guarded(update: Callable[..., Update], *args) -> Update:
    """Run a PU / PIRU; a linear-algebra error is a failed update (previous state kept)."""
    try:
        return update(*args)
    except torch.linalg.LinAlgError:
        return Update({}, FAILED)


def _record(status: str, counts: dict[str, int]) -> None:
    if status == RETRIED:
        counts["retried_updates"] += 1
    elif status == FAILED:
        counts["failed_updates"] += 1


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Host check, one sync per device."""
    return not any(bool(f) for f in _non_finite_flags(tensors, tensors).values())


def _non_finite_flags(tensors: list[torch.Tensor], like: list[torch.Tensor]) -> dict[torch.device, torch.Tensor]:
    """Per device, a 0-dim fp32 tensor: 1.0 if any tensor there holds inf / NaN (no host sync)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t, ref in zip(tensors, like):
        by_device.setdefault(ref.device, []).append(t)
    flags = {}
    for dev, ts in by_device.items():
        flag = torch.zeros((), dtype=torch.float32, device=dev)
        # one fused check for all tensors of a device (it also multiplies them by 1, a no-op)
        torch._amp_foreach_non_finite_check_and_unscale_(ts, flag, torch.ones((), device=dev))
        flags[dev] = flag
    if len(flags) > 1:  # one step: a non-finite value anywhere skips it everywhere
        first = next(iter(flags))
        anyflag = torch.stack([f.to(first) for f in flags.values()]).amax()
        flags = {dev: anyflag.to(dev, non_blocking=True) for dev in flags}
    return flags
