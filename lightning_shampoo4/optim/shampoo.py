"""``Shampoo4bit``: Shampoo with 4-bit quantized preconditioners, grafted onto AdamW or SGD.

One step (``docs/algorithms.md``) is a short sequence of named phases, so that it either
completes or leaves no trace:

1. **plan blocks** (``_plan_blocks``, ``_distribute``): the parameters with gradients, their
   blocks, and under several processes which rank computes which (:mod:`.distributed`);
2. **statistics and roots** (``_statistics_and_roots``): the due statistics (PU) and
   inverse-root (PIRU) updates of every block, each *returning* new state entries;
3. **precondition** (``_precondition``): ``L^-1/4 G R^-1/4`` per block, batched, grafted to the
   gradient's norm;
4. **check**: one device-side flag for "some direction is inf/NaN";
5. **commit** (``_commit``): the base optimizer (fused AdamW or SGD) with that flag, then the new
   entries and counters, so a non-finite step changes nothing.

Steps without a PU or PIRU (the steady state) never wait on the device: the flag stays on the
device and the count of skipped steps is read only when :attr:`Shampoo4bit.counters` is.
Steps with a PU or PIRU check the gradients on the host first, since their linear algebra
synchronizes anyway.

Under several processes the step goes through :mod:`.distributed` (``distributed=`` argument):
under DDP each rank keeps the state of, and preconditions, only the blocks it owns, and one
all-gather before grafting hands every rank every preconditioned block (a block heavier than a
rank's share is kept factor by factor by two ranks; the root the preconditioning rank lacks is
sent to it at each step, as stored codes); under FSDP2 (``Shard(0)``
DTensors) "auto" does the same with the whole parameters' blocks (their gradients gathered, each
rank applying its own rows), "off" preconditions each rank's local shard, padded to equal blocks,
without communication.
With one process nothing of this runs (one attribute check per step).
"""

from __future__ import annotations

import functools
import time
from collections import ChainMap
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple

import torch

from . import base_update, preconditioning
from . import distributed as D
from .blocking import Block, blocks_for
from .block_optimizer import SKIP_WARN_AFTER, BlockOptimizer  # noqa: F401  (SKIP_WARN_AFTER: re-exported)
from .distributed import UnsupportedStrategyError
from .factor import Factor, PrefixView
from .storage import FAILED, RETRIED, FactorConfig, Storage, Update, storage_for
from .settings import SHAMPOO_SETTINGS
from .state_keys import SIDES, StateKey

__all__ = ["COUNTERS", "Shampoo4bit", "UnsupportedStrategyError"]

COUNTERS = (
    "steps",  # step() calls with at least one gradient: the clock of stat_interval / root_interval
    "stat_updates",  # factor statistics updated (PU)
    "root_updates",  # inverse roots recomputed (PIRU)
    "skipped_nonfinite",  # steps that changed nothing because a gradient or direction had inf/NaN
    "retried_updates",  # decompositions that succeeded only on retry (float64, or eigh after Newton)
    "failed_updates",  # updates that failed (non-finite result, linear-algebra error); previous kept
)
TIMERS = ("time_stats_s", "time_roots_s")

# every per-group hyper-parameter (the constructor's arguments after params, less the optimizer-wide ones)
HYPER_KEYS = SHAMPOO_SETTINGS.group_keys
FORMAT_KEYS = SHAMPOO_SETTINGS.format_keys

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Side(NamedTuple):
    prefix: str  # of the factor's state keys (:class:`.state_keys.StateKey`)
    order: int
    name: str  # "L" or "R"


class _Plan(NamedTuple):
    """How one parameter maps onto blocks and factors; fixed once the parameter has state.

    ``layout`` is set for a ``Shard(0)`` DTensor only: its local rows, padded to the shard size
    every rank uses, are the matrix ``mshape``."""

    mshape: tuple[int, int] | None
    blocks: tuple[Block, ...]
    sides: tuple[tuple[_Side, _Side], ...]
    fmt: tuple
    layout: D.ShardLayout | None = None


class _StepWork:
    """What one step computes before it commits: the parameters with gradients, their gradient
    matrices, the new state entries and counts (written only by the commit phase)."""

    def __init__(self, work, layout: D.StepLayout, tensors, grads, clock: int, due: dict) -> None:
        self.work, self.layout, self.tensors, self.grads = work, layout, tensors, grads
        self.clock, self.due = clock, due
        self.matrices: dict[torch.Tensor, torch.Tensor] = {}  # param -> its gradient as the matrix its blocks cut
        self.pending: list[tuple[dict, str, dict]] = []  # (state, key prefix, new entries)
        self.new_states: dict[torch.Tensor, dict] = {}  # states of parameters stepped for the first time
        self.counts = dict.fromkeys(("stat_updates", "root_updates", "retried_updates", "failed_updates"), 0)
        self.timers = dict.fromkeys(TIMERS, 0.0)
        # roots of factors kept by another rank than their block's direction owner (split blocks):
        # ((param, block, side), to, storage, view) sent; ((param, block, side), from, storage, pair) received
        self.outgoing: list[tuple[tuple[int, int, str], int, Storage, Any]] = []
        self.incoming: list[tuple[tuple[int, int, str], int, Storage, list]] = []


class _LocalStates(NamedTuple):
    """What :func:`base_update.apply` reads of the optimizer, keyed by local shards (FSDP2)."""

    state: dict


class Shampoo4bit(BlockOptimizer):
    """Shampoo whose preconditioner state is stored at about 4 bits per element.

    By default (``storage="cholesky"``) each Kronecker statistic is kept as its lower Cholesky
    factor with 8-bit codes and its inverse root at 4 bits (one triangle each); with
    ``storage="eigenvectors"`` it is the paper's 4-bit eigenvector matrix plus fp32 eigenvalues.
    ``docs/algorithms.md`` describes every storage and the measurements behind the defaults; the
    settings are declared in :data:`.settings.SHAMPOO_SETTINGS`.

    Args:
        params: iterable of parameters or of parameter-group dicts (any argument below can
            be overridden per group, except ``distributed`` and ``distributed_dtype``).
        lr: learning rate of the base optimizer.
        betas: AdamW moment coefficients (``base="adamw"``).
        eps: AdamW denominator epsilon.
        weight_decay: decoupled (AdamW) or coupled L2 (SGD) weight decay.
        momentum: SGD momentum (``base="sgd"``).
        nesterov: Nesterov momentum for SGD.
        base: the first-order optimizer fed with the preconditioned gradient, "adamw" or "sgd".
        bits: bits of the stored inverse root (and of the eigenvectors): 4 or 8; 32 for plain
            32-bit Shampoo (every matrix fp32, whatever ``storage``).
        moment_bits: 32 (the parameter's dtype), 8 or 4: storage of the base optimizer's moments.
        storage: what each factor keeps. "cholesky" (default): the statistic's lower Cholesky
            factor at ``statistic_bits`` (8 by default), the inverse root at ``bits``; about 1 %
            fewer bytes than "eigenvectors" and 4-7x closer to 32-bit Shampoo
            (``benchmarks/drift.py``). "eigenvectors": the paper's 4-bit Shampoo (Wang et al.
            2024), quantized eigenvectors plus fp32 eigenvalues. "naive": the baseline that
            quantizes the statistic and the root themselves.
        statistic_bits: bits of the stored statistic: the Cholesky factor, the eigenvector
            matrix or the naive statistic. None (default): 8 for "cholesky", ``bits`` otherwise.
        error_feedback: "cholesky" only: carry each re-quantization's rounding error into the
            next one (Li et al., arXiv 2412.10663). None (default): on at a 4-bit statistic.
            ``storage="cholesky", statistic_bits=4`` is that paper's method.
        quantize: deprecated (removed in the next release): the pre-0.3 spelling. "cholesky8"
            is ``storage="cholesky", statistic_bits=8``; "cholesky" is ``storage="cholesky",
            statistic_bits=bits, error_feedback=True``; "eigenvectors" is
            ``storage="eigenvectors"``; "preconditioner" is ``storage="naive"``.
        codebook: the quantization map: "linear2", "linear1.5", "dynamic" (dynamic tree) or
            "linear". None (default): "linear1.5" for the default storage (Cholesky, 8-bit
            statistic, no error feedback), "linear2" otherwise.
        block_size: elements per quantization block of the eigenvectors, or of a column of a
            Cholesky factor (one scale each). None (default): 1200 for the default storage
            (one scale per column of a factor up to ``max_order``), 64 otherwise.
        root_block_size: elements per quantization block of a stored inverse root (and of the
            naive baseline's statistic); these are symmetric, so only their strict upper
            triangle is stored, beside an fp32 diagonal. None (default): 40 for the default
            storage, 256 otherwise.
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
            ``storage="naive"``, eigen otherwise.
        kernel_backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
        precondition_dtype: dtype of the per-step preconditioning matmuls ("float32",
            "bfloat16", "float16"); statistics and roots are always computed in fp32.
        start_preconditioning_step: no statistics or root updates before this step, so the
            optimizer runs as its base optimizer until then.
        precondition: False gives a group no Shampoo state at all, only the base update
            (for embeddings and other matrices where Shampoo does not pay).
        distributed: "auto" (default) or "off"; optimizer-wide, not per group. Under DDP
            (a process group of several ranks, plain parameters with identical gradients,
            confirmed at the first step) "auto" gives every block one owner rank that alone
            keeps its second-order state and computes its PU / PIRU and preconditioned block
            (a block heavier than a rank's share of the state: one rank per factor, the other
            factor's root sent to the block's rank at each step); the blocks are all-gathered
            before grafting, so every rank applies the same update.
            With a float32 gather that update is bit-identical to "off" on CPU (each block is
            computed as in "off"; on CUDA the torch backend's batched matmuls of other batch
            sizes may round differently, so there it is equal up to rounding). Ranks whose
            gradients differ are never sharded. "off": every rank computes every block (replicated). FSDP2 parameters
            (``Shard(0)`` DTensors): "auto" gives the whole parameters' blocks owners as under DDP
            (lossless: the directions of one device); "off" preconditions each local shard.
            FSDP1, DeepSpeed ZeRO and other DTensor layouts raise
            :class:`UnsupportedStrategyError`. Nothing changes with one process. False / True
            (a bare ``off`` in YAML) mean "off" / "auto".
        distributed_dtype: "float32" (exact) or "bfloat16" (half the bytes, rounded alike on
            every rank): the dtype the preconditioned blocks travel in under DDP sharding.

    Rank <= 1 tensors (biases, norm weights) get the plain base update. Intervals count the
    optimizer's own ``step()`` calls that had gradients (``counters["steps"]``), whichever
    parameters had them. A step whose gradients or preconditioned directions hold inf / NaN
    changes no parameter and no state, and is counted in ``counters["skipped_nonfinite"]``.
    """

    SETTINGS = SHAMPOO_SETTINGS  # every argument after ``params``, declared once (:mod:`.settings`)
    COUNTERS, TIMERS = COUNTERS, TIMERS
    WHOLE_FSDP = True
    SPLIT_FACTORS = True
    RESTART = "a fresh statistic"

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
        storage: Literal["cholesky", "eigenvectors", "naive"] = "cholesky",
        statistic_bits: Literal[4, 8, 32] | None = None,
        error_feedback: bool | None = None,
        codebook: Literal["linear2", "linear1.5", "dynamic", "linear"] | None = None,
        block_size: int | None = None,
        root_block_size: int | None = None,
        scale_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
        min_quant_numel: int = 4096,
        quantize: Literal["eigenvectors", "preconditioner", "cholesky", "cholesky8"] | None = None,
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
        distributed: Literal["auto", "off"] | bool = "auto",
        distributed_dtype: Literal["float32", "bfloat16"] = "float32",
    ):
        given = dict(locals())
        defaults = {k: given[k] for k in SHAMPOO_SETTINGS.names if SHAMPOO_SETTINGS[k].per_group}
        SHAMPOO_SETTINGS.validate(defaults, resolve=False)  # each group resolves its own storage's settings
        super().__init__(params, defaults, distributed, distributed_dtype)

    def _init_bookkeeping(self) -> None:
        """Counters and caches (:meth:`.BlockOptimizer._init_bookkeeping`), plus the device-side
        skip counts and the storages by group."""
        super()._init_bookkeeping()
        self._skips: dict[torch.device, torch.Tensor] = {}  # device-side skipped-step counts
        self._skip_mark = (0, 0)  # (clock, skipped steps) when the host last looked
        self._group_cache: dict[int, dict[int, Storage]] = {}
        self.sync_timers = False  # synchronize CUDA around PU / PIRU so the timers are exact
        self._stand_ins: dict[tuple[int, torch.device], tuple[Storage, Any]] = {}

    # -- counters ------------------------------------------------------------------------
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
        self._warn_skipped()

    def _note_skip(self) -> None:
        self._fold_skips()

    # -- groups and state ----------------------------------------------------------------
    def _group_storages(self, group: dict) -> dict[int, Storage]:
        """The group's storages by factor order; revalidates the group when it changed."""
        storages = self._group_cache.get(id(group))
        if self._check_group(group) or storages is None:
            storages = self._group_cache[id(group)] = {}
        return storages

    def _storage(self, group: dict, order: int) -> Storage:
        storages = self._group_storages(group)
        st = storages.get(order)
        if st is None:
            st = storages[order] = storage_for(FactorConfig.from_group(group, order))
        return st

    def _make_plan(self, p: torch.Tensor, group: dict) -> _Plan:
        return make_plan(p, group, self._layer.lossless)

    def _new_state(
        self,
        p: torch.Tensor,
        group: dict,
        device: torch.device | str | None = None,
        blocks: Iterable[int] | None = None,
    ) -> dict[str, Any]:
        """A fresh state for ``p`` (not yet stored); ``device="meta"`` only describes it.

        ``blocks``: the factors to include as ``(block, side)`` pairs (a rank's own under DDP or
        lossless FSDP2); None: all of them, which is also what a checkpoint is checked against. A
        DTensor's moments are those of its local shard."""
        t = D.local_view(p)[0]
        device = t.device if device is None else torch.device(device)
        plan = make_plan(p, group, self._layer.lossless)
        state: dict[str, Any] = {"step": torch.zeros((), dtype=torch.float32, device=device)}
        like = t if device == t.device else torch.empty_like(t, device=device)
        state.update(base_update.init_moments(like, group))
        keep = None if blocks is None else set(blocks)
        for i, (left, right) in enumerate(plan.sides):
            for side in (left, right):
                if keep is not None and i not in keep and (i, side.name) not in keep:
                    continue
                for name, t in self._storage(group, side.order).init(device).items():
                    state[str(StateKey(i, side.name, name))] = t
        if plan.sides:
            state["last_root_step"] = 0  # optimizer step of the last root update; 0: none yet
        return state

    def factors(self) -> Iterable[tuple[torch.Tensor, int, str, Factor]]:
        """``(param, block index, side, factor)`` for every Shampoo factor with state on this
        rank (under DDP sharding: the blocks it owns)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                sides = self._plan(p, group).sides
                present = {(k.block, k.side) for k in map(StateKey.parse, state)} if sides else ()
                for i, pair in enumerate(sides):
                    for side in pair:
                        if (i, side.name) in present:
                            yield p, i, side.name, Factor(state, side.prefix, self._storage(group, side.order))

    def _block_state(self, group: dict, plan: _Plan, i: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {str(StateKey(i, side.name, name)): t for side in plan.sides[i]
                for name, t in self._storage(group, side.order).init(device).items()}

    def _block_weight(self) -> Callable[[torch.Tensor, Block], tuple[int, int]]:
        """A block's second-order state bytes, per factor ``(left, right)``: what the owners
        balance (a block heavier than a rank's share is kept factor by factor)."""
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        meta = torch.device("meta")
        return lambda p, b: tuple(D.nbytes(self._storage(groups[id(p)], n).init(meta)) for n in (b.rows, b.cols))

    # -- checkpointing and copies --------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._skips.clear()
        self._group_cache.clear()
        self._skip_mark, self._skip_run = (self._counts["steps"], self._counts["skipped_nonfinite"]), 0

    load_state_dict.__doc__ = BlockOptimizer.load_state_dict.__doc__

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "sync_timers": self.sync_timers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        sync_timers = state.pop("sync_timers", getattr(self, "sync_timers", False))
        super().__setstate__(state)
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
        work = self._plan_blocks()
        if not work:
            return loss
        layout = self._distribute(work)
        tensors, grads = layout.local([p for p, _, _ in work])
        clock = self._clock + 1
        due = self._due(clock)
        updates_due = any(s or r for s, r in due.values())
        if updates_due and not layout.all_true(_all_finite(grads)):
            return self._skip(clock, loss)
        step = _StepWork(work, layout, tensors, grads, clock, due)
        operands = self._statistics_and_roots(step)
        directions = self._precondition(step, operands)
        found_inf = layout.any_flag(_non_finite_flags(directions, tensors))
        if updates_due and any(bool(f) for f in found_inf.values()):
            return self._skip(clock, loss)
        self._commit(step, directions, found_inf, updates_due)
        return loss

    # -- its phases ----------------------------------------------------------------------
    def _plan_blocks(self) -> list[tuple[torch.Tensor, dict, _Plan]]:
        """``(param, group, plan)`` of every parameter with a gradient (groups revalidated if changed)."""
        work = []
        for group in self.param_groups:
            self._group_storages(group)  # validates the group if it changed
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("Shampoo4bit does not support sparse gradients")
                    work.append((p, group, self._plan(p, group)))
        return work

    def _due(self, clock: int) -> dict[int, tuple[bool, bool]]:
        """Per group: whether statistics (PU) and roots (PIRU) are due at ``clock``."""
        due = {}
        for group in self.param_groups:
            active = group["precondition"] and clock >= group["start_preconditioning_step"]
            due[id(group)] = (active and clock % group["stat_interval"] == 0, active and clock % group["root_interval"] == 0)
        return due

    def _statistics_and_roots(self, step: _StepWork) -> list[list | None]:
        """Due PU / PIRU of every block (new entries into ``step.pending``, nothing written);
        per parameter the ``(left, right)`` root operands of its blocks, or None for a parameter
        that is not preconditioned (yet)."""
        operands = []
        for (p, group, plan), grad in zip(step.work, step.grads):
            state = self.state.get(p)
            held = step.layout.held(p, len(plan.blocks))
            if not state:
                state = step.new_states[p] = self._new_state(p, group, blocks=held)
            if not plan.sides:
                operands.append(None)
                continue
            g = grad.float().reshape(plan.mshape) if plan.layout is None else plan.layout.to_matrix(grad.float())
            step.matrices[p] = g
            operands.append(self._update_factors(p, group, plan, state, g, *step.due[id(group)], step, held))
        self._exchange_roots(step)
        return operands

    def _exchange_roots(self, step: _StepWork) -> None:
        """Roots of factors kept by another rank than the one that preconditions their block:
        each sent as its stored entries (the codes themselves, so the result is exactly the one
        device's) and put into the receiving block's operands in place of the stand-in."""
        if not step.outgoing and not step.incoming:
            return
        outgoing, incoming = sorted(step.outgoing, key=lambda x: x[0]), sorted(step.incoming, key=lambda x: x[0])
        sends = [(to, [view[n] for n in _root_names(storage)]) for _, to, storage, view in outgoing]
        recvs = [(frm, [(tuple(t.shape), t.dtype) for t in _root_template(storage).values()])
                 for _, frm, storage, _ in incoming]
        device = next(iter(step.matrices.values())).device
        for (key, _, storage, pair), tensors in zip(incoming, step.layout.exchange(sends, recvs, device)):
            pair[SIDES.index(key[2])] = storage.operand(dict(zip(_root_names(storage), tensors)))

    def _precondition(self, step: _StepWork, operands: list[list | None]) -> list[torch.Tensor]:
        """The grafted direction of every parameter: ``L^-1/4 G R^-1/4`` per block, batched
        (:func:`preconditioning.run`), other ranks' blocks gathered (DDP), rescaled to the
        gradient's norm; the raw gradient where there is no root."""
        layout, jobs, skip = step.layout, [], []
        placed = []  # (parameter slot, G, plan, first job, parameter index, owned blocks or None: all)
        for slot, ((p, group, plan), pair) in enumerate(zip(step.work, operands)):
            if pair is None:
                continue
            g, owned = step.matrices[p], layout.owned(p, len(plan.blocks))
            dtype, backend = _DTYPES[group["precondition_dtype"]], group["kernel_backend"]
            placed.append((slot, g, plan, len(jobs), layout.param_index(p), owned))
            for i, (block, (lo, ro)) in enumerate(zip(plan.blocks, pair)):
                gb = g if len(plan.blocks) == 1 else g[block.r0 : block.r1, block.c0 : block.c1]
                jobs.append(preconditioning.Job(gb, lo, ro, dtype, backend))
                skip.append(owned is not None and i not in owned)
        results = preconditioning.run(jobs, skip) if any(skip) else preconditioning.run(jobs)
        directions = list(step.grads)
        graft, gathered = [], []
        for slot, g, plan, first, pid, owned in placed:
            hat = whole = _assemble(g, plan, results[first : first + len(plan.blocks)], owned, pid, gathered)
            if plan.layout is not None:
                hat = plan.layout.from_matrix(hat)  # the data rows (a view): padding is neither applied nor grafted
            if plan.layout is not None and plan.layout.whole:  # lossless FSDP2: grafted whole, this rank's rows applied
                graft.append((slot, g, whole, False))
            else:
                graft.append((slot, g, hat, plan.layout is not None))
            directions[slot] = hat
        layout.gather(gathered)  # every rank's blocks, before grafting
        self._graft(graft, layout)
        for i, t in enumerate(step.tensors):
            if directions[i] is not step.grads[i]:
                directions[i] = directions[i].view(t.shape).to(t.dtype)
        return directions

    def _commit(self, step: _StepWork, directions: list[torch.Tensor], found_inf: dict, updates_due: bool) -> None:
        """The base update first, the one part left that can raise (out of memory): it changes
        nothing when it does, and the new states it needed are taken back. Then the new
        entries, the counters and the clock."""
        for p, state in step.new_states.items():
            self.state[p] = state
        try:
            if step.layout.fsdp:  # the base update runs on the local shards
                local = [(t, group, plan) for t, (_, group, plan) in zip(step.tensors, step.work)]
                states = _LocalStates({t: self.state[p] for t, (p, _, _) in zip(step.tensors, step.work)})
                base_update.apply(states, local, directions, found_inf)
            else:
                base_update.apply(self, step.work, directions, found_inf)
        except BaseException:
            for p in step.new_states:
                del self.state[p]
            raise
        for state, prefix, entries in step.pending:
            for name, t in entries.items():
                state[f"{prefix}.{name}" if prefix else name] = t
        for k, v in (step.counts | step.timers).items():
            self._counts[k] += v
        self._commit_clock(step.clock)
        if updates_due:
            self._fold_skips()  # the flags were read above: no extra wait
        else:
            for dev, flag in found_inf.items():
                self._skips[dev] = self._skips[dev] + flag if dev in self._skips else flag.clone()

    def _update_factors(self, p, group, plan, state, g, stats_due, roots_due, step: _StepWork, held=None):
        """Due PU / PIRU of every factor of one parameter this rank keeps (``held``: ``(block,
        side)`` pairs, None: all; new entries into ``step.pending``); the ``(left, right)`` root
        operands per block, or None while no root exists (the base optimizer then runs on the
        raw gradient). Factors another rank keeps get stand-in operands of the same format,
        without data (replaced by the travelling root where this rank preconditions the block:
        ``step.incoming``). Their updates are counted too, so counts agree across ranks (except
        retried and failed ones, which only the owner sees)."""
        counts, layout = step.counts, step.layout
        if roots_due:
            step.pending.append((state, "", {"last_root_step": step.clock}))
        operands, outgoing, incoming = [], [], []
        pid = layout.param_index(p)
        for i, (block, sides) in enumerate(zip(plan.blocks, plan.sides)):
            gb = g if len(plan.blocks) == 1 else g[block.r0 : block.r1, block.c0 : block.c1]
            travel = layout.travel(p, i)
            pair = []
            for side in sides:
                if held is not None and (i, side.name) not in held:
                    counts["stat_updates"] += stats_due
                    counts["root_updates"] += roots_due
                    pair.append(self._stand_in(group, side.order, g.device))
                    if travel is not None and travel[0] == side.name and travel[2] == layout.rank:
                        incoming.append(((pid, i, side.name), travel[1], self._storage(group, side.order), pair))
                    continue
                view = self._update_side(p, group, side, state, _gram(gb, side.name) if stats_due else None,
                                         stats_due, roots_due, step)
                pair.append(self._storage(group, side.order).operand(view))
                if travel is not None and travel[0] == side.name and travel[1] == layout.rank:
                    outgoing.append(((pid, i, side.name), travel[2], self._storage(group, side.order), view))
            operands.append(pair)
        if not roots_due and state["last_root_step"] == 0:
            return None
        step.outgoing += outgoing
        step.incoming += incoming
        return operands

    def _update_side(self, p, group, side: _Side, state: dict, m: torch.Tensor | None, stats_due: bool, roots_due: bool,
                     step: _StepWork) -> ChainMap:
        """One factor: its PU (``m``: this step's G G^T or G^T G, None when no PU is due) and PIRU
        when due; the factor's entries as they are after them (new over stored)."""
        storage = self._storage(group, side.order)
        new: dict[str, torch.Tensor] = {}
        view = ChainMap(new, PrefixView(state, side.prefix))
        fresh = None
        if stats_due:
            t0 = self._tick(p)
            upd = _guarded(storage.update_stats, view, m)
            new.update(upd.entries)
            fresh = upd.fresh
            _record(upd.status, step.counts)
            step.counts["stat_updates"] += 1
            step.timers["time_stats_s"] += self._tick(p) - t0
        if roots_due:
            t0 = self._tick(p)
            upd = _guarded(storage.update_root, view, fresh)
            new.update(upd.entries)
            _record(upd.status, step.counts)
            step.counts["root_updates"] += 1
            step.timers["time_roots_s"] += self._tick(p) - t0
        if new:
            step.pending.append((state, side.prefix, new))
        return view

    def _stand_in(self, group: dict, order: int, device: torch.device):
        """An operand with the format of a real root of this order but no data: it places another
        rank's block in the same batch of :func:`preconditioning.run` as when every block runs."""
        storage = self._storage(group, order)
        cached = self._stand_ins.get((id(storage), device))
        if cached is None or cached[0] is not storage:
            empty = {k: torch.empty((0, *t.shape[1:]), dtype=t.dtype, device=device)
                     for k, t in storage.init(torch.device("meta")).items()}
            cached = self._stand_ins[(id(storage), device)] = (storage, storage.operand(empty))
        return cached[1]

    def _graft(self, graft: list[tuple[int, torch.Tensor, torch.Tensor, bool]], layout: D.StepLayout) -> None:
        """Rescale every preconditioned matrix to its gradient's norm, in place.

        Norms are taken in float64, so a huge but finite gradient cannot overflow them. Under
        FSDP2 (entries whose last item is True are local shards) the norms are the whole
        parameter's (:meth:`.distributed.StepLayout.whole_norms`), so every rank scales its
        shard alike, as one device would.
        """
        if not graft:
            return
        _, grads, hats, sharded = zip(*graft)
        gn = torch._foreach_norm(list(grads), 2, dtype=torch.float64)
        hn = torch._foreach_norm(list(hats), 2, dtype=torch.float64)
        gn, hn = layout.whole_norms(list(gn), list(hn), list(sharded))
        torch._foreach_add_(hn, 1e-12)
        torch._foreach_div_(gn, hn)
        torch._foreach_mul_(list(hats), gn)

    def _tick(self, p: torch.Tensor) -> float:
        if self.sync_timers and p.device.type == "cuda":
            torch.cuda.synchronize(p.device)
        return time.perf_counter()


def make_plan(p: torch.Tensor, group: dict, whole: bool = False) -> _Plan:
    """How ``p`` maps onto Shampoo blocks under ``group``'s settings: a ``Shard(0)`` DTensor by
    its local rows padded to the common shard size (:func:`.distributed.shard_layout`), or with
    ``whole`` (lossless FSDP2) by the whole parameter's blocks; anything else by its whole shape."""
    fmt = tuple(group[k] for k in FORMAT_KEYS)
    layout = None
    if not group["precondition"]:
        mshape, blocks = None, ()
    elif D.is_sharded(p):
        layout = D.shard_layout(p, group["max_order"], whole)
        mshape, blocks = layout.mshape, layout.blocks
    else:
        mshape, blocks = blocks_for(tuple(p.shape), group["max_order"])
    sides = tuple((_Side(StateKey.prefix(i, "L"), b.rows, "L"), _Side(StateKey.prefix(i, "R"), b.cols, "R"))
                  for i, b in enumerate(blocks))
    return _Plan(mshape, blocks, sides, fmt, layout)


def _root_names(storage: Storage) -> list[str]:
    """The entries :meth:`.storage.base.Storage.operand` reads: the root (fp32, or its codes,
    scales and diagonal)."""
    return list(_root_template(storage))


@functools.lru_cache(maxsize=256)
def _root_template(storage: Storage) -> dict[str, torch.Tensor]:
    """A fresh factor's root entries as meta tensors (their names, shapes and dtypes; read only)."""
    entries = storage.init(torch.device("meta"))
    return {n: t for n, t in entries.items() if n == "root" or n.startswith("root_")}


def _assemble(g: torch.Tensor, plan: _Plan, results: list, owned: list[int] | None, pid: int | None,
              gathered: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    """One parameter's preconditioned matrix from its blocks' results; under DDP the blocks
    another rank computed (result None) are listed in ``gathered`` to be filled in."""
    if len(plan.blocks) == 1 and owned is None:
        return results[0]
    hat = torch.empty_like(g)
    for i, block in enumerate(plan.blocks):
        dst = hat if len(plan.blocks) == 1 else hat[block.r0 : block.r1, block.c0 : block.c1]
        if results[i] is not None:
            dst.copy_(results[i])
        if owned is not None:
            gathered.append((pid, i, dst))
    return hat


def _gram(gb: torch.Tensor, side: str) -> torch.Tensor:
    """A block's statistic for one side: G G^T (left, "L") or G^T G (right)."""
    return gb @ gb.mT if side == "L" else gb.mT @ gb


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
