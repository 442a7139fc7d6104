"""``SOAP4bit``: SOAP (Adam in Shampoo's eigenbasis) with its eigenvector matrices at 4 bits.

SOAP (Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv 2409.11321) keeps,
for every 2-D block G (m x n) of a parameter, the Kronecker statistics
``L = b L + (1 - b) G G^T`` and ``R = b R + (1 - b) G^T G`` and their eigenbases QL, QR, and runs
Adam on the rotated gradient ``G' = QL^T G QR``; the Adam direction is rotated back,
``QL U QR^T``. The bases come from ``eigh`` at the first step (which only sets up the
preconditioner, as in the paper, and changes no parameter) and then, every
``precondition_frequency`` Adam steps, from one power iteration and a QR decomposition, the columns
ordered by the estimated eigenvalues ``diag(Q^T L Q)`` with the second moment's rows / columns
permuted alike. 1-D parameters get plain Adam.

What ``bits=4`` keeps (``docs/soap.md`` has the measurements that chose each default):

* QL, QR as 4-bit codes, every eigenvector in blocks of ``block_size`` with one scale each (the
  paper's eigenvector quantization: Linear-2 map, the codec of the ``eigenvectors`` storage),
  dequantized at every step; ``bjorck_steps`` Björck steps after dequantizing.
* ``statistics="rotated8"`` (default at 4 / 8 bits): each statistic in its own eigenbasis,
  ``Q^T L Q`` (nearly diagonal): its fp32 diagonal beside the strict upper triangle at 8 bits,
  updated every step with the rotated gradient in one pass over its codes and re-expressed in
  the new basis at a refresh. ``"rotated4"``: the triangle at 4 bits; ``"eigen"``:
  ``Q diag(lambda) Q^T``, only the eigenvalues kept (this step's off-diagonal standing in at a
  refresh); ``"cholesky8"``: the statistic's lower Cholesky factor with 8-bit codes;
  ``"dense"``: the fp32 statistic (the reference).
* ``second_moment="factored"`` (default at 4 / 8 bits): Adafactor's row and column sums of the
  rotated second moment (m + n numbers per block, ``V = r c^T / sum(r)``); ``"full"``: Adam's
  m x n second moment at ``moment_bits``.
* the first moment at ``moment_bits`` (8 by default at 4 / 8 bits), in the parameter's own basis
  (``first_moment_basis="original"``, as the paper's code keeps it, so a basis change needs no
  rotation) or in the rotated one (carried across a refresh by ``QL_new^T QL_old M' QR_old^T QR_new``;
  ``"normalized"``: stored divided by ``sqrt(V) + eps``, so that its codes hold Adam's direction,
  whose entries are of one size). The compact choice ``first_moment_basis="normalized",
  moment_bits=4`` keeps about 0.06x of fp32 AdamW's bytes less (``docs/soap.md``: 0.39x instead of
  0.45x on the char-LM model) for a char-LM loss about 0.015 higher; in the parameter's basis
  4 bits cost 0.08.

``bits=32`` with the other settings left at ``None`` is the exact fp32 SOAP. ``bits=8`` keeps the
eigenvector matrices at 8 bits and the rest as at 4: on the char-LM benchmark it ties 32-bit SOAP
and Muon for about Muon's memory, where the 4-bit default trails them by about 0.008 of loss for
0.14-0.15x of AdamW's bytes less (``docs/soap.md``).

Dimensions above ``max_precondition_dim`` are cut into blocks as Shampoo4bit cuts them
(``large_dims="block"``), or left unrotated as in the paper's code (``"unrotated"``).

One step either completes or changes nothing: every new state entry and every direction is
computed first; a non-finite gradient, direction or new state entry (a huge gradient's statistic
overflowing) skips the step (counted in ``counters["skipped_nonfinite"]``), and an exception
leaves the state as it was. Under DDP each block has one owner rank that alone keeps its
second-order state and rotated moments, and the rotated-back directions are all-gathered
(:mod:`.distributed`). FSDP2 ``Shard(0)`` parameters, ``distributed="auto"`` (lossless): the
blocks are the whole parameter's, each with one owner rank as under DDP; every rank updates the
first moment of its own rows (kept per local shard, as one device would keep those rows), and the
gradient and that moment are gathered whole in one all-gather, so an owner rotates the whole
block; the directions are all-gathered and each rank applies its rows. The result is the one
device's. ``distributed="off"``: each rank preconditions its local shard as its own matrix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

import torch

from . import distributed as D
from .blocking import Block, blocks_for
from .block_optimizer import BlockOptimizer
from .soap_block import Codec, adam_direction, block_step, moment_init, moment_load, moment_store, side_init
from .settings import BASE_SETTINGS, SHAMPOO_SETTINGS, STORAGE_SETTINGS, Setting, SettingsTable, register

__all__ = ["COUNTERS", "SOAP4bit", "SOAP_SETTINGS"]

COUNTERS = (
    "steps",  # step() calls with at least one gradient
    "refreshes",  # eigenbasis updates (eigh at the first step, then power iteration + QR) of a factor
    "skipped_nonfinite",  # steps that changed nothing: a gradient, direction or new state entry had inf / NaN
    "retried_updates",  # decompositions that succeeded only in float64
    "failed_updates",  # decompositions that failed: the previous basis / statistic is kept
)


# -- settings -----------------------------------------------------------------------------
def _row(rows: tuple[Setting, ...], name: str, **changes: Any) -> Setting:
    row = next(s for s in rows if s.name == name)
    return dataclasses.replace(row, **changes) if changes else row


def _resolve_moment_bits(g: Mapping[str, Any]) -> int:
    return 32 if g["bits"] == 32 else 8


def _resolve_statistics(g: Mapping[str, Any]) -> str:
    return "dense" if g["bits"] == 32 else "rotated8"


def _resolve_second_moment(g: Mapping[str, Any]) -> str:
    return "full" if g["bits"] == 32 else "factored"


_SHARED = SHAMPOO_SETTINGS.settings  # rows shared with Shampoo4bit

SOAP_SETTINGS = register(SettingsTable(
    "SOAP4bit",
    "lightning_shampoo4.optim.soap.SOAP4bit",
    (
        _row(BASE_SETTINGS, "lr", default=3e-3, doc="learning rate"),
        _row(BASE_SETTINGS, "betas", default=(0.95, 0.95), doc="Adam moment coefficients (in the eigenbasis)"),
        _row(BASE_SETTINGS, "eps", doc="Adam denominator epsilon"),
        _row(BASE_SETTINGS, "weight_decay", doc="decoupled weight decay"),
        Setting.number("shampoo_beta", 0.95, "EMA coefficient of the Kronecker statistics L, R", 0.0, 1.0),
        Setting.integer("precondition_frequency", 10, "Adam steps between eigenbasis refreshes "
                        "(one power iteration + QR)", 1),
        Setting.integer("max_precondition_dim", 256, "largest factor order; larger dims are blocked or left "
                        "unrotated (large_dims)", 1, format=True),
        Setting.choice("large_dims", "block", ("block", "unrotated"),
                       "dims above max_precondition_dim: cut into blocks as Shampoo4bit does, or left unrotated",
                       format=True),
        _row(STORAGE_SETTINGS, "bits", doc="bits of the stored eigenvector matrices QL, QR; 32: fp32 SOAP"),
        Setting.choice("moment_bits", None, (None, 4, 8, 32),
                       "bits of Adam's moments (the second moment too when second_moment='full'); "
                       "None: 32 at bits=32, else 8", format=True, resolve=_resolve_moment_bits),
        Setting.choice("statistics", None, (None, "rotated8", "rotated4", "eigen", "cholesky8", "dense"),
                       "how L, R are kept: rotated8 / rotated4 (Q^T L Q: fp32 diagonal, 8- / 4-bit off-diagonal), "
                       "eigen (Q diag(lambda) Q^T), cholesky8 (8-bit Cholesky factor) or dense fp32; None: dense "
                       "at bits=32, else rotated8",
                       format=True, resolve=_resolve_statistics),
        Setting.choice("second_moment", None, (None, "full", "factored"),
                       "Adam's second moment in the eigenbasis: full (m x n) or factored over rows and columns "
                       "(Adafactor, m + n numbers); None: full at bits=32, else factored",
                       format=True, resolve=_resolve_second_moment),
        Setting.choice("first_moment_basis", "original", ("original", "rotated", "normalized"),
                       "the basis the first moment is kept in: the parameter's, the eigenbasis, or the eigenbasis "
                       "divided by the root of the second moment", format=True),
        Setting.integer("bjorck_steps", 0, "Björck steps on the dequantized eigenvector matrices", 0),
        Setting.choice("codebook", "linear2", ("linear2", "linear1.5", "dynamic", "linear"),
                       "quantization map of the eigenvector matrices", format=True),
        Setting.integer("block_size", 64, "elements per quantization block of an eigenvector", 1, format=True),
        _row(STORAGE_SETTINGS, "scale_dtype"),
        _row(STORAGE_SETTINGS, "min_quant_numel", doc="eigenvector matrices with fewer elements stay fp32"),
        _row(_SHARED, "kernel_backend"),
        _row(_SHARED, "distributed"),
        _row(_SHARED, "distributed_dtype"),
    ),
    label=lambda s: "32-bit SOAP" if s["bits"] == 32 else f"{s['bits']}-bit SOAP",
))

_KEYS = SOAP_SETTINGS.group_keys
_FORMAT = SOAP_SETTINGS.format_keys


# -- plans ----------------------------------------------------------------------------------
class _Plan(NamedTuple):
    """How one parameter maps onto SOAP blocks; ``sides`` holds each block's (left, right) factor
    order, None for an unrotated side. ``layout``: a ``Shard(0)`` DTensor's matrix (its local rows,
    or the whole parameter under lossless FSDP2)."""

    mshape: tuple[int, int] | None
    blocks: tuple[Block, ...]
    sides: tuple[tuple[int | None, int | None], ...]
    fmt: tuple
    layout: D.ShardLayout | D.WholeLayout | None = None


def make_plan(p: torch.Tensor, group: Mapping[str, Any], whole: bool = False) -> _Plan:
    """How ``p`` maps onto SOAP blocks: a ``Shard(0)`` DTensor by its local rows padded to the
    common shard size, or with ``whole`` (lossless FSDP2) by the whole parameter's blocks
    (:func:`.distributed.shard_layout`); anything else by its whole shape."""
    fmt = tuple(group[k] for k in _FORMAT)
    dim, block = group["max_precondition_dim"], group["large_dims"] == "block"
    layout = None
    if D.is_sharded(p):
        layout = D.shard_layout(p, dim if block else 1 << 62, whole)
        mshape, blocks = layout.mshape, layout.blocks
    else:
        mshape, blocks = blocks_for(tuple(p.shape), dim if block else 1 << 62)
    sides = tuple((b.rows if b.rows <= dim else None, b.cols if b.cols <= dim else None) for b in blocks)
    return _Plan(mshape, blocks, sides, fmt, layout)


# -- the optimizer ----------------------------------------------------------------------------
class SOAP4bit(BlockOptimizer):
    """SOAP whose eigenvector matrices are stored at 4 bits (``bits=32``: the fp32 reference).

    Args:
        params: parameters or parameter-group dicts (any setting below except ``distributed`` /
            ``distributed_dtype`` may be overridden per group).
        lr: learning rate.
        betas: Adam's (beta1, beta2) in the eigenbasis.
        eps: Adam's denominator epsilon.
        weight_decay: decoupled weight decay (``p *= 1 - lr * weight_decay``).
        shampoo_beta: EMA coefficient of the statistics L, R.
        precondition_frequency: Adam steps between eigenbasis refreshes.
        max_precondition_dim: largest factor order.
        large_dims: "block" (larger dims cut into blocks, as Shampoo4bit's ``max_order``) or
            "unrotated" (a larger dim gets no eigenbasis, as in the paper's code).
        bits: 4 or 8 for quantized eigenvector matrices, 32 for fp32 SOAP.
        moment_bits: 32, 8 or 4 for Adam's moments; None: 32 at ``bits=32``, 8 otherwise.
        statistics: "rotated8", "rotated4", "eigen", "cholesky8" or "dense" (see the module
            docstring); None: "dense" at ``bits=32``, "rotated8" otherwise.
        second_moment: "full" or "factored"; None: "full" at ``bits=32``, "factored" otherwise.
        first_moment_basis: "original" (the parameter's basis), "rotated" (the eigenbasis) or
            "normalized" (the eigenbasis, stored divided by ``sqrt(V) + eps``).
        bjorck_steps: Björck steps applied to dequantized eigenvector matrices.
        codebook: the eigenvector quantization map ("linear2", the paper's).
        block_size: elements per quantization block of an eigenvector.
        scale_dtype: dtype of the per-block scales.
        min_quant_numel: eigenvector matrices with fewer elements stay fp32.
        kernel_backend: "auto", "triton" or "torch" for the quantization kernels.
        distributed: "auto" (DDP, and FSDP2 lossless: every block of the whole parameters has one
            owner rank that keeps its state and computes its direction) or "off" (DDP: every rank
            every block; FSDP2: each rank its local shard's blocks).
        distributed_dtype: "float32" or "bfloat16": the dtype the directions travel in under DDP
            and lossless FSDP2.
    """

    SETTINGS = SOAP_SETTINGS
    COUNTERS = COUNTERS
    WHOLE_FSDP = True
    RESTART = "a fresh eigenbasis"

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        shampoo_beta: float = 0.95,
        precondition_frequency: int = 10,
        max_precondition_dim: int = 256,
        large_dims: Literal["block", "unrotated"] = "block",
        bits: Literal[4, 8, 32] = 4,
        moment_bits: Literal[4, 8, 32] | None = None,
        statistics: Literal["rotated8", "rotated4", "eigen", "cholesky8", "dense"] | None = None,
        second_moment: Literal["full", "factored"] | None = None,
        first_moment_basis: Literal["original", "rotated", "normalized"] = "original",
        bjorck_steps: int = 0,
        codebook: Literal["linear2", "linear1.5", "dynamic", "linear"] = "linear2",
        block_size: int = 64,
        scale_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
        min_quant_numel: int = 4096,
        kernel_backend: Literal["auto", "triton", "torch"] = "auto",
        distributed: Literal["auto", "off"] | bool = "auto",
        distributed_dtype: Literal["float32", "bfloat16"] = "float32",
    ):
        args = dict(locals())
        defaults = {k: args[k] for k in _KEYS}
        SOAP_SETTINGS.validate(defaults, resolve=False)
        super().__init__(params, defaults, distributed, distributed_dtype)

    def _make_plan(self, p: torch.Tensor, group: dict) -> _Plan:
        return make_plan(p, group, self._layer.lossless)

    # -- state ---------------------------------------------------------------------------------
    def _new_state(self, p: torch.Tensor, group: dict, device=None, blocks: Iterable[int] | None = None) -> dict:
        """A fresh state for ``p`` (not stored); ``device="meta"`` only describes it. ``blocks``:
        the blocks to include (a DDP rank's own); None: all."""
        t = D.local_view(p)[0]
        device = t.device if device is None else torch.device(device)
        plan = make_plan(p, group, self._layer.lossless)
        mbits, codec = group["moment_bits"], Codec.of(group)
        state: dict[str, Any] = {"step": torch.zeros((), dtype=torch.float32, device=device)}
        shape = tuple(t.shape)
        if plan.mshape is None:  # plain Adam
            state.update(moment_init("exp_avg", shape, mbits, t.dtype, device))
            state.update(moment_init("exp_avg_sq", shape, mbits, t.dtype, device))
            return state
        if group["first_moment_basis"] == "original":
            state.update(moment_init("exp_avg", shape, mbits, t.dtype, device))
        keep = None if blocks is None else set(blocks)
        for i, (block, sides) in enumerate(zip(plan.blocks, plan.sides)):
            if keep is not None and i not in keep:
                continue
            state.update(self._block_init(i, block, sides, group, codec, device))
        return state

    @staticmethod
    def _block_init(i, block, sides, group, codec, device) -> dict[str, torch.Tensor]:
        mbits, f32 = group["moment_bits"], torch.float32
        out: dict[str, torch.Tensor] = {}
        for side, k in zip("LR", sides):
            if k is not None:
                out.update({f"{i}.{side}.{n}": v for n, v in side_init(codec, group["statistics"], k, device).items()})
        shape = (block.rows, block.cols)
        # the block's moments in the eigenbasis live under its left side ("{i}.L."); a factored second
        # moment keeps its row sums there and its column sums under the right side
        if group["first_moment_basis"] != "original":
            out.update(moment_init(f"{i}.L.exp_avg", shape, mbits, f32, device))
        if group["second_moment"] == "factored":
            out[f"{i}.L.exp_avg_sq"] = torch.zeros(block.rows, dtype=f32, device=device)
            out[f"{i}.R.exp_avg_sq"] = torch.zeros(block.cols, dtype=f32, device=device)
        else:
            out.update(moment_init(f"{i}.L.exp_avg_sq", shape, mbits, f32, device))
        return out

    def _block_state(self, group: dict, plan: _Plan, i: int, device: torch.device) -> dict[str, torch.Tensor]:
        return self._block_init(i, plan.blocks[i], plan.sides[i], group, Codec.of(group), device)

    def _block_weight(self) -> Callable[[torch.Tensor, Block], int]:
        """A block's exact state bytes (its bases, statistics and moments in the eigenbasis: what
        the block owners balance)."""
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        meta = torch.device("meta")

        def weigh(p: torch.Tensor, block: Block) -> int:
            group = groups[id(p)]
            dim = group["max_precondition_dim"]
            sides = tuple(k if k <= dim else None for k in (block.rows, block.cols))
            return D.nbytes(self._block_init(0, block, sides, group, Codec.of(group), meta))

        return weigh

    def eigenbases(self) -> Iterable[tuple[torch.Tensor, int, str, torch.Tensor]]:
        """``(param, block, side, Q)`` for every stored eigenvector matrix on this rank, as fp32
        columns after dequantizing (and the group's Björck steps)."""
        for group in self.param_groups:
            codec = Codec.of(group)
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for i, sides in enumerate(self._plan(p, group).sides):
                    for side, k in zip("LR", sides):
                        prefix = f"{i}.{side}."
                        if k is not None and any(key.startswith(prefix) for key in state):
                            view = {key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)}
                            yield p, i, side, codec.load_q(view, k, group["bjorck_steps"])

    # -- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step; ``closure`` (if given) is called once with grad enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            self._check_group(group)
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("SOAP4bit does not support sparse gradients")
                    work.append((p, group, self._plan(p, group)))
        if not work:
            return loss
        layout = self._distribute(work)
        fsdp = layout.fsdp
        views = [D.local_view(p) for p, _, _ in work]
        clock = self._clock + 1
        if not self._finite([g for _, g in views], fsdp):
            return self._skip(clock, loss)

        # 1. compute: new entries and directions, nothing written yet
        new_states: dict[torch.Tensor, dict] = {}
        updates: list[tuple[torch.Tensor, dict, dict, dict, torch.Tensor | None]] = []  # (tensor, group, state, entries, direction)
        gathered: list[tuple[int, int, torch.Tensor]] = []
        counts = dict.fromkeys(("refreshes", "retried_updates", "failed_updates"), 0)
        for (p, group, plan), (t, grad) in zip(work, views):
            owned = layout.owned(p, len(plan.blocks))
            state = self.state.get(p)
            if not state:
                state = new_states[p] = self._new_state(p, group, blocks=owned)
            entries, direction = self._compute(t, grad, group, plan, state, owned, counts, gathered,
                                               layout.param_index(p))
            updates.append((t, group, state, entries, direction))
        if gathered:
            layout.gather(gathered)
        # a non-finite direction or new state entry (a huge gradient's statistic or second moment
        # overflowing) would poison every later step: skip this one whole. Under block owners the
        # ranks hold different entries, so they agree on the answer.
        dirs = [d for *_, d in updates if d is not None]
        floats = [v for *_, entries, _ in updates for v in entries.values()
                  if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if not self._finite(dirs + floats, fsdp or layout.index is not None):
            return self._skip(clock, loss)

        # 2. commit
        for p, state in new_states.items():
            self.state[p] = state
        for t, group, state, entries, direction in updates:
            state.update(entries)
            if direction is not None:
                lr, wd = group["lr"], group["weight_decay"]
                if wd:
                    t.mul_(1 - lr * wd)
                t.add_(direction.to(t.dtype), alpha=-lr)
        for k, v in counts.items():
            self._counts[k] += v
        self._commit_clock(clock)
        self._skip_run = 0
        return loss

    def _finite(self, tensors: list[torch.Tensor], everywhere: bool) -> bool:
        """Whether every tensor is finite (one host sync); ``everywhere``: on every rank (the
        ranks hold different tensors)."""
        tensors = [t for t in tensors if t is not None and t.numel()]
        if tensors:  # one L1 norm per tensor in a few fused calls: inf / NaN make it non-finite (and so
            # does a sum of magnitudes beyond fp32's range, values near 1e38, which would overflow the step)
            ok = torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(tensors, 1)])).all()
        else:
            ok = torch.tensor(True)
        return D.all_true(ok, self._layer.group) if everywhere else bool(ok)

    def _compute(self, t, grad, group, plan, state, owned, counts, gathered, pid):
        """New state entries of one parameter and its direction (None at its first step)."""
        b1, b2 = group["betas"]
        mbits = group["moment_bits"]
        first = float(state["step"]) == 0  # the first step only sets up the eigenbases
        step = float(state["step"]) + 1
        entries: dict[str, torch.Tensor] = {"step": state["step"] + 1}
        t_adam = step - 1  # Adam steps including this one
        if plan.mshape is None:  # plain Adam
            g = grad.float()
            if first:
                return entries, None
            m = torch.lerp(moment_load(state, "exp_avg", g.shape, mbits), g, 1 - b1)
            v = moment_load(state, "exp_avg_sq", g.shape, mbits).mul(b2).addcmul_(g, g, value=1 - b2)
            entries.update(moment_store("exp_avg", m, mbits, t.dtype))
            entries.update(moment_store("exp_avg_sq", v, mbits, t.dtype))
            return entries, adam_direction(m, v, b1, b2, group["eps"], t_adam)
        m_local = None  # this rank's first moment (its rows under FSDP2), in the parameter's basis
        if group["first_moment_basis"] == "original" and not first:
            m_local = torch.lerp(moment_load(state, "exp_avg", tuple(t.shape), mbits), grad.float(), 1 - b1)
            entries.update(moment_store("exp_avg", m_local, mbits, t.dtype))
        g, m_full = _matrices(plan, grad.float(), m_local)
        direction = None if first else torch.zeros(plan.mshape, dtype=torch.float32, device=g.device)
        refresh = not first and t_adam % group["precondition_frequency"] == 0
        for i, (block, sides) in enumerate(zip(plan.blocks, plan.sides)):
            if owned is not None and i not in owned:
                if direction is not None:
                    gathered.append((pid, i, direction[block.r0:block.r1, block.c0:block.c1]))
                continue
            whole = len(plan.blocks) == 1
            gb = g if whole else g[block.r0:block.r1, block.c0:block.c1]
            mb = None
            if m_full is not None:
                mb = m_full if whole else m_full[block.r0:block.r1, block.c0:block.c1]
            new, d = block_step(i, block, sides, gb, mb, group, state, first, refresh, t_adam, counts)
            entries.update(new)
            if d is not None:
                direction[block.r0:block.r1, block.c0:block.c1] = d
                if owned is not None:
                    gathered.append((pid, i, direction[block.r0:block.r1, block.c0:block.c1]))
        if direction is not None:
            direction = direction.reshape(t.shape) if plan.layout is None else plan.layout.from_matrix(direction)
        return entries, direction


def _matrices(plan: _Plan, grad: torch.Tensor, moment: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradient and the first moment (None: none this step) as the plan's matrices: the local
    tensors reshaped, zero padded to the common shard (per shard), or gathered whole (lossless
    FSDP2, both in one all-gather)."""
    local = [grad] if moment is None else [grad, moment]
    if plan.layout is None:
        mats = [x.reshape(plan.mshape) for x in local]
    elif plan.layout.whole:
        mats = plan.layout.to_matrices(local)
    else:
        mats = [plan.layout.to_matrix(x) for x in local]
    return mats[0], (mats[1] if moment is not None else None)
