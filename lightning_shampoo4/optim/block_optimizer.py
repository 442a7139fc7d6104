"""``BlockOptimizer``: what ``Shampoo4bit`` and ``SOAP4bit`` share besides their algorithm.

Both keep per-parameter state cut into 2-D blocks (``"{block}.{side}.{name}"`` entries,
:mod:`.state_keys`), both are distributed by :class:`.distributed.DistributedLayer` (block owners
under DDP, local shards or owners under FSDP2), and both skip a step whose gradients or
directions hold inf / NaN. This base class holds that plumbing once, so a fix in it (a mode kept
across ``load_state_dict``, a checkpoint check) reaches both optimizers:

* the optimizer-wide settings ``distributed`` / ``distributed_dtype`` and the step's layout;
* parameter groups: complex parameters refused, settings validated (:attr:`SETTINGS`), a format
  setting frozen once a parameter has state (:meth:`_plan`);
* the clock (``group["clock"]``, ``counters["steps"]``) and the counters;
* checkpoints: :meth:`state_dict`, :meth:`consolidate_state_dict`, :meth:`load_state_dict`,
  pickling;
* the DDP owner assignment and the fresh state of blocks a rank newly computes;
* a skipped (non-finite) step and the warning when every recent step was skipped.

A subclass supplies :attr:`SETTINGS`, :attr:`COUNTERS`, :meth:`_make_plan` (how a parameter
maps onto blocks), :meth:`_new_state` and :meth:`_block_state` (fresh state), and its step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from . import distributed as D
from .checkpoint import CheckpointMismatchError, load_optimizer_state
from .memory import memory_report
from .settings import SettingsTable
from .state_keys import SIDES, StateKey, block_of

__all__ = ["SKIP_WARN_AFTER", "BlockOptimizer"]

SKIP_WARN_AFTER = 50  # consecutive skipped steps after which an optimizer warns, once


class BlockOptimizer(Optimizer):
    """Base class of the block-wise second-order optimizers (see the module docstring).

    A plan (``self._make_plan(p, group)``) is any object with ``fmt`` (the group's format
    settings), ``blocks`` (:class:`.blocking.Block` per block, empty for an unblocked
    parameter) and per-block entries; it is fixed once the parameter has state.
    """

    SETTINGS: ClassVar[SettingsTable]
    COUNTERS: ClassVar[tuple[str, ...]]  # integer event counts; "steps" and "skipped_nonfinite" among them
    TIMERS: ClassVar[tuple[str, ...]] = ()  # float counters (seconds)
    WHOLE_FSDP: ClassVar[bool] = False  # FSDP2 parameters preconditioned whole under "auto"
    SPLIT_FACTORS: ClassVar[bool] = False  # a block's two factors may be kept by two ranks (their roots travel)
    RESTART: ClassVar[str] = "a fresh state"  # what a block without state restarts from (warning text)

    _SIGNATURE_KEYS: ClassVar[tuple[str, ...]] = ()  # the per-group settings, including deprecated ones

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "SETTINGS" in cls.__dict__:
            cls._SIGNATURE_KEYS = tuple(s.name for s in cls.SETTINGS.settings if s.per_group)

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], distributed: Any, distributed_dtype: Any):
        wide = {k: self.SETTINGS[k].check(k, v) for k, v in
                (("distributed", distributed), ("distributed_dtype", distributed_dtype))}
        self._layer = D.DistributedLayer(wide["distributed"], wide["distributed_dtype"], whole_fsdp=self.WHOLE_FSDP,
                                         split_factors=self.SPLIT_FACTORS)
        self._has_sharded = False  # some parameter is a Shard(0) DTensor (checkpoint form)
        self._init_bookkeeping()
        super().__init__(params, defaults)

    # -- hooks ------------------------------------------------------------------------------
    def _make_plan(self, p: torch.Tensor, group: dict) -> Any:
        raise NotImplementedError

    def _new_state(self, p: torch.Tensor, group: dict, device: Any = None,
                   blocks: Iterable[int | tuple[int, str]] | None = None) -> dict[str, Any]:
        """A fresh state for ``p``; ``blocks``: the block state to include, as block indices or,
        with ``SPLIT_FACTORS``, ``(block, side)`` pairs (a rank's own); None: all."""
        raise NotImplementedError

    def _block_state(self, group: dict, plan: Any, i: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The fresh entries of block ``i`` of a parameter (full state keys)."""
        raise NotImplementedError

    def _block_weight(self) -> Callable[[torch.Tensor, Any], int | tuple[int, int]] | None:
        """``weigh(param, block)`` for the owner assignment: the block's state bytes (with
        ``SPLIT_FACTORS``: its ``(left, right)`` factors'), or None."""
        return None

    # -- settings and layout ------------------------------------------------------------------
    @property
    def distributed(self) -> str:
        """The ``distributed`` argument ("auto" or "off")."""
        return self._layer.mode

    @property
    def distributed_dtype(self) -> str:
        """The ``distributed_dtype`` argument ("float32" or "bfloat16")."""
        return next(k for k, v in D.COMM_DTYPES.items() if v == self._layer.dtype)

    @property
    def layout(self) -> str | None:
        """The parallel layout the steps use: None (every rank computes every block), "ddp"
        (blocks sharded over the ranks) or "fsdp2"; None until the first step has decided it."""
        return self._layer.kind

    # -- bookkeeping ----------------------------------------------------------------------------
    def _fresh_counts(self) -> dict[str, float]:
        return dict.fromkeys(self.COUNTERS, 0) | dict.fromkeys(self.TIMERS, 0.0)

    def _init_bookkeeping(self) -> None:
        """Counters and caches: everything here besides the counts is derived and rebuilt."""
        self._counts: dict[str, float] = self._fresh_counts()
        self._skip_run = 0  # consecutive skipped steps seen so far
        self._skip_warned = False
        self._plans: dict[int, Any] = {}
        self._checked: dict[int, tuple] = {}  # id(group) -> its settings when last validated
        self._partial = False  # loaded a rank-local state: fill in missing blocks at the next step
        self._consolidated: tuple[int, dict] | None = None  # (clock, full state) on the gathering rank

    @property
    def counters(self) -> dict[str, float]:
        """Event counts (see ``COUNTERS``)."""
        self._fold_skips()
        return dict(self._counts)

    def _fold_skips(self) -> None:
        """Bring skip counts kept elsewhere (on the device) into the counts; none here."""

    # -- groups -------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if p.is_complex():
                raise ValueError(
                    f"complex parameters are not supported (got one of shape {tuple(p.shape)}); "
                    "optimize torch.view_as_real(p) as a real parameter instead"
                )
        self.SETTINGS.validate(group)
        self._layer.check(group["params"])  # refuses FSDP1, ZeRO and other DTensor layouts
        self._has_sharded = self._has_sharded or any(D.is_sharded(p) for p in group["params"])
        group.setdefault("clock", self.param_groups[0].get("clock", 0))

    def _check_group(self, group: dict) -> bool:
        """Revalidate ``group`` if a setting changed since it was last checked (a deprecated
        key set on it is translated anew); True when it did."""
        keys = self._SIGNATURE_KEYS
        if self._checked.get(id(group)) == tuple(group.get(k) for k in keys):
            return False
        self.SETTINGS.validate(group)
        self._checked[id(group)] = tuple(group.get(k) for k in keys)
        return True

    def _plan(self, p: torch.Tensor, group: dict) -> Any:
        """The parameter's plan; raises if a format setting changed after its state existed."""
        keys = self.SETTINGS.format_keys
        fmt = tuple(group[k] for k in keys)
        plan = self._plans.get(id(p))
        if plan is not None and plan.fmt == fmt:
            return plan
        if plan is not None and self.state.get(p):
            changed = [f"{k} {a!r} -> {b!r}" for k, a, b in zip(keys, plan.fmt, fmt) if a != b]
            raise ValueError(
                f"the storage format of a parameter of shape {tuple(p.shape)} changed after its state was "
                f"created ({', '.join(changed)}); the stored state cannot be reinterpreted. Keep these settings "
                "fixed, or start a new optimizer (or clear its state) to change them"
            )
        plan = self._plans[id(p)] = self._make_plan(p, group)
        return plan

    def _params(self) -> list[torch.Tensor]:
        """Every parameter, in the order of the state dict's parameter ids."""
        return [p for group in self.param_groups for p in group["params"]]

    # -- the clock and skipped steps ------------------------------------------------------------
    @property
    def _clock(self) -> int:
        return self.param_groups[0]["clock"] if self.param_groups else 0

    def _commit_clock(self, clock: int) -> None:
        for group in self.param_groups:
            group["clock"] = clock
        self._counts["steps"] = clock

    def _skip(self, clock: int, loss: Any) -> Any:
        """A step that changes nothing but the clock (a gradient or direction held inf / NaN)."""
        self._commit_clock(clock)
        self._counts["skipped_nonfinite"] += 1
        self._note_skip()
        return loss

    def _note_skip(self) -> None:
        """Count one more consecutive skipped step (a committed step sets the run back to 0)."""
        self._skip_run += 1
        self._warn_skipped()

    def _warn_skipped(self) -> None:
        """Warn once when each of the last ``SKIP_WARN_AFTER`` steps was skipped."""
        if self._skip_run >= SKIP_WARN_AFTER and not self._skip_warned:
            self._skip_warned = True
            warnings.warn(
                f"{type(self).__name__} skipped each of the last {self._skip_run} steps because a gradient or a "
                f"direction held inf / NaN (counters['skipped_nonfinite'] = {self._counts['skipped_nonfinite']}): "
                "nothing is being trained. Check the loss and the parameters for inf / NaN.",
                RuntimeWarning,
                stacklevel=5,
            )

    # -- state ------------------------------------------------------------------------------------
    def init_state(self) -> None:
        """Create the state of every parameter now instead of at its first step."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state.get(p):
                    self.state[p] = self._new_state(p, group)

    def memory_report(self) -> dict[str, int]:
        """Exact bytes of the optimizer state by kind (moments, eigenvectors, eigenvalues,
        factors, roots, scales, other) plus ``second_order`` and ``total``. Under DDP sharding
        or FSDP2 these are this rank's bytes (its own blocks, its local shards)."""
        return memory_report(self.state.values())

    # -- distribution -------------------------------------------------------------------------------
    def _distribute(self, work: list[tuple[torch.Tensor, dict, Any]]) -> D.StepLayout:
        """The step's layout (:meth:`.distributed.DistributedLayer.begin_step`); blocks this rank
        newly computes get a fresh state (after a rank-local load, or when blocks changed owner)."""
        params = self._params()
        groups = [g for g in self.param_groups for _ in g["params"]]
        blocks = [(p, i, self._plan(p, g).blocks) for i, (p, g) in enumerate(zip(params, groups))]
        layout = self._layer.begin_step(params, blocks, self.state, self._block_weight())
        if self._partial or layout.moved:
            self._fill_missing(layout)
        return layout

    def _fill_missing(self, layout: D.StepLayout | None) -> None:
        """Give a fresh state to every block this rank computes but holds no state for (after
        loading a rank-local state, or when blocks changed owner); warns once the layout is
        decided, since those blocks restart."""
        restarted = 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                plan = self._plan(p, group)
                if not plan.blocks:
                    continue
                present = {(k.block, k.side) for k in map(StateKey.parse, state) if k.block is not None}
                device = next(v.device for v in state.values() if isinstance(v, torch.Tensor))
                held = None if layout is None else layout.held(p, len(plan.blocks))
                wanted = set(held) if held is not None else {(i, s) for i in range(len(plan.blocks)) for s in SIDES}
                for i in range(len(plan.blocks)):
                    missing = {s for s in SIDES if (i, s) in wanted and (i, s) not in present}
                    if not missing:
                        continue
                    fresh = {k: v for k, v in self._block_state(group, plan, i, device).items()
                             if StateKey.parse(k).side in missing}  # a side may have no entries (unrotated)
                    restarted += bool(fresh)
                    state.update(fresh)
        if self._layer.resolved:
            self._partial = False
            if restarted:
                warnings.warn(
                    f"{type(self).__name__}: {restarted} block(s) this rank computes had no state (a rank-local "
                    "state loaded under another layout, or blocks that changed owner); they restart from "
                    f"{self.RESTART}",
                    RuntimeWarning,
                    stacklevel=4,
                )

    # -- checkpoints and copies -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, plus ``counters``.

        Under DDP sharding this rank's blocks only, marked ``"rank_local"`` (loadable by the same
        rank of the same world size), unless :meth:`consolidate_state_dict` ran just before on
        this rank: then every block. Under FSDP2 the state of ``Shard(0)`` parameters is in the
        DTensor form ``torch.distributed.checkpoint`` needs (:func:`.distributed.export_state`);
        the clock stays in ``param_groups``, since DCP keeps no other top-level key.
        """
        consolidated, self._consolidated = self._consolidated, None
        if consolidated is not None and consolidated[0] == self._clock:
            return consolidated[1]
        sd = super().state_dict()
        sd["counters"] = self.counters
        if self._layer.kind == "ddp" and self._layer.pruned is not None:
            sd["rank_local"] = {"rank": D.world(self._layer.group)[1], "world_size": self._layer.pruned.world_size}
        if self._has_sharded:
            params = self._params()
            state = self._layer.shared_blocks(sd["state"])  # lossless: every block on every rank
            sd["state"] = {pid: D.export_state(params[pid], st, self._layer.lossless) for pid, st in state.items()}
        return sd

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Collect every rank's blocks on rank ``to`` under DDP sharding (every rank must call
        it); the next :meth:`state_dict` there returns the full state, the same keys as one
        process. Lightning's ``DDPStrategy`` calls it before rank 0 saves a checkpoint, so its
        checkpoints load under any layout. A no-op otherwise."""
        self._consolidated = None
        if self._layer.kind != "ddp" or self._layer.pruned is None:
            return
        sd = super().state_dict()
        sd["state"] = {pid: dict(st) for pid, st in sd["state"].items()}  # torch's are the live dicts
        sd["counters"] = self.counters
        mine = {pid: {k: v for k, v in st.items() if block_of(k) is not None} for pid, st in sd["state"].items()}
        merged = D.gather_block_state(mine, dst=to, group=self._layer.group)
        if merged is not None:
            for pid, entries in merged.items():
                sd["state"].setdefault(pid, {}).update(entries)
            self._consolidated = (self._clock, sd)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint after checking it fits (keys, shapes, dtypes, finite values).

        Unlike torch, the saved dtype of every second-order tensor is kept (uint8 codes stay
        codes, fp32 eigenvalues stay fp32 for a bf16 model); moments follow the parameter's
        dtype as in torch. Nothing changes when the check fails
        (:class:`.checkpoint.CheckpointMismatchError`).

        A full state (one process, "off", or consolidated) loads under any layout: under DDP
        sharding each rank drops the blocks it does not own at its next step. A rank-local state
        (``"rank_local"``) loads only into the same rank of the same world size. Under FSDP2 the
        DTensor form of :meth:`state_dict` is turned back into local shards (keys may be
        parameter names, as ``torch.distributed.checkpoint`` passes them).
        """
        rank_local = state_dict.get("rank_local") if isinstance(state_dict, Mapping) else None
        if rank_local is not None:
            here = {"rank": D.world(self._layer.group)[1], "world_size": D.world(self._layer.group)[0]}
            if dict(rank_local) != here:
                raise CheckpointMismatchError(
                    f"this state holds only the blocks of rank {rank_local.get('rank')} of "
                    f"{rank_local.get('world_size')} (DDP sharding); this is rank {here['rank']} of "
                    f"{here['world_size']}. Save with consolidate_state_dict() first (Lightning's DDPStrategy "
                    "does) for a state any layout can load"
                )
        if self._has_sharded and isinstance(state_dict, Mapping) and isinstance(state_dict.get("state"), Mapping):
            saved = [pid for g in state_dict.get("param_groups", ()) for pid in g.get("params", ())]
            params = dict(zip(saved, self._params()))
            bits = dict(zip(saved, (g["moment_bits"] for g in self.param_groups for _ in g["params"])))
            state = {pid: D.import_state(params[pid], st, bits[pid]) if pid in params and isinstance(st, Mapping)
                     else st for pid, st in state_dict["state"].items()}
            state_dict = {**state_dict, "state": state}
        # a rank of a layout with block owners may hold only its own blocks (rank-local, or read
        # from a checkpoint keyed by block through torch.distributed.checkpoint)
        partial = rank_local is not None or self._layer.pruned is not None
        load_optimizer_state(self, state_dict, super().load_state_dict, partial_blocks=partial)
        self._plans.clear()
        self._checked.clear()
        self._layer.forget_assignment()
        self._partial, self._consolidated = partial, None
        self._counts = self._fresh_counts()
        self._counts.update({k: type(self._counts[k])(v) for k, v in state_dict.get("counters", {}).items()
                             if k in self._counts})
        for group in self.param_groups:
            group.setdefault("clock", 0)
        if "counters" not in state_dict:  # e.g. through torch.distributed.checkpoint: the clock is all there is
            self._counts["steps"] = self._clock

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_counts": self.counters, "distributed": self.distributed,
                "distributed_dtype": self.distributed_dtype}

    def __setstate__(self, state: dict[str, Any]) -> None:
        counts = state.pop("_counts", None)
        kept = getattr(self, "_layer", None) is not None  # torch's load_state_dict calls this too: keep the mode
        mode = state.pop("distributed", self.distributed if kept else "auto")
        dtype = state.pop("distributed_dtype", self.distributed_dtype if kept else "float32")
        super().__setstate__(state)
        self._layer = D.DistributedLayer(mode, dtype, whole_fsdp=self.WHOLE_FSDP, split_factors=self.SPLIT_FACTORS)
        self._has_sharded = any(D.is_sharded(p) for p in self._params())
        self._init_bookkeeping()
        if counts:
            self._counts.update(counts)
