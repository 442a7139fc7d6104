"""The distribution layer of ``Shampoo4bit`` and ``SOAP4bit``: which rank computes which block,
and how the preconditioned blocks come back. The per-block work itself knows nothing of it.

Three layouts (:func:`detect`):

``None``   one process, or ``distributed="off"`` under DDP: every rank computes every block of
           the parameters it holds (the single-device step, replicated under DDP).
``"ddp"``  plain parameters whose gradients are identical on every rank (after DDP's
           all-reduce): each block has one owner rank (:func:`plan_for`, balanced by the
           blocks' state bytes or by their work, computed identically on every rank without
           communication) that alone keeps its second-order state and preconditions it; one
           collective per step (:func:`gather_blocks`) hands every rank all preconditioned
           blocks, so every rank applies the same update. Confirmed once by
           :func:`check_replicated`. An optimizer whose factors update independently
           (``split_factors``: Shampoo4bit) may have a block heavier than a rank's share kept
           factor by factor by two ranks: each updates its factor's statistic and root from the
           gradient every rank holds, and the root the block's owner lacks travels to it at
           each step (:func:`exchange`, the stored codes: the result is unchanged).
``"fsdp2"`` DTensor parameters on a 1-D mesh, ``Shard(0)`` (FSDP2's ``fully_shard``) or
           ``Replicate``. Lossless (``"auto"`` in an optimizer built with ``whole_fsdp``): the
           whole parameters' blocks have owners as under DDP; a sharded gradient is gathered
           whole (:class:`WholeLayout`) and each rank applies its own rows of the gathered
           direction. Per shard (``"off"``): each rank preconditions its local shard as its own
           matrix (:func:`shard_layout`); no blocks travel; blocks never straddle shards.

The checkpoint form (:func:`export_state`, :meth:`DistributedLayer.shared_blocks`) keys block
state by parameter, block and side, so DDP and lossless FSDP2 checkpoints resume at any world
size.

Anything else (FSDP1 flat parameters, DeepSpeed ZeRO-3, other DTensor layouts) raises
:class:`UnsupportedStrategyError`. This module depends on torch only.
"""

from __future__ import annotations

import functools
import heapq
import math
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from .blocking import Block, blocks_for, matrix_shape, split
from .memory import kind_of
from .state_keys import StateKey, block_of

__all__ = [
    "COMM_DTYPES",
    "MODES",
    "SUPPORTED",
    "BALANCES",
    "BlockRef",
    "DistributedLayer",
    "Plan",
    "ShardLayout",
    "StepLayout",
    "WholeLayout",
    "UnsupportedStrategyError",
    "all_true",
    "block_bytes",
    "block_cost",
    "block_index",
    "check_comm_dtype",
    "check_mode",
    "check_replicated",
    "detect",
    "exchange",
    "export_state",
    "factor_costs",
    "gather_block_state",
    "gather_blocks",
    "import_state",
    "is_dtensor",
    "is_sharded",
    "local_view",
    "max_across",
    "nbytes",
    "plan_for",
    "prune_state",
    "shard_layout",
    "sum_across",
]

MODES = ("auto", "off")
COMM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SUPPORTED = (
    "one device; DDP (plain parameters with identical gradients on every rank); "
    "FSDP2 / DTensor parameters on a 1-D device mesh with Shard(0) or Replicate placements"
)


class UnsupportedStrategyError(ValueError, RuntimeError):
    """The parameters (or the Lightning strategy) come from a parallel layout Shampoo4bit cannot
    precondition correctly. A ``ValueError`` (as the strategy check always raised) and a
    ``RuntimeError`` (as the layout check raised)."""


def _refuse(what: str) -> UnsupportedStrategyError:
    return UnsupportedStrategyError(f"Shampoo4bit does not support {what}. Supported: {SUPPORTED}.")


def check_mode(mode: str) -> str:
    """Validate the ``distributed`` argument."""
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    return mode


def check_comm_dtype(name: str) -> torch.dtype:
    """Validate the dtype the preconditioned blocks travel in (``"float32"`` or ``"bfloat16"``)."""
    if name not in COMM_DTYPES:
        raise ValueError(f"distributed_dtype must be one of {', '.join(map(repr, COMM_DTYPES))}, got {name!r}")
    return COMM_DTYPES[name]


# -- detection ----------------------------------------------------------------------------
def _dtensor_cls() -> type | None:
    if not dist.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def _is_dtensor(t: Any) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (FSDP2 and tensor-parallel parameters are)."""
    return _is_dtensor(t)


def _placement(p: torch.Tensor) -> str:
    """``"shard0"`` or ``"replicate"`` for a supported DTensor; raise for any other layout."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or len(placements) != 1:
        raise _refuse(f"DTensor parameters on a {mesh.ndim}-D device mesh with placements {placements} (HSDP, 2-D)")
    pl = placements[0]
    if type(pl) is Shard and pl.dim in (0, -p.ndim):
        return "shard0"
    if type(pl) is Replicate:
        return "replicate"
    raise _refuse(f"DTensor parameters with placement {pl!r} (tensor parallel shards other than dim 0, partial values)")


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DTensor sharded on dim 0 (its local tensor holds only some rows)."""
    return _is_dtensor(p) and _placement(p) == "shard0"


def world(group: Any = None) -> tuple[int, int]:
    """``(world size, rank)`` of ``group``; ``(1, 0)`` without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


def detect(params: Iterable[torch.Tensor], mode: str = "auto") -> str | None:
    """The layout of ``params``: ``None``, ``"ddp"`` (a candidate until :func:`check_replicated`
    confirms it) or ``"fsdp2"``. Raises :class:`UnsupportedStrategyError` for refused layouts,
    whatever ``mode``: those parameters cannot be preconditioned correctly at all."""
    check_mode(mode)
    has_dtensor = False
    for p in params:
        if getattr(p, "_is_flat_param", False) or getattr(p, "_fsdp_flattened", False):
            raise _refuse("FSDP1 (FullyShardedDataParallel) flat parameters; use FSDP2 (fully_shard)")
        if hasattr(p, "ds_id") or hasattr(p, "ds_tensor"):
            raise _refuse("DeepSpeed ZeRO partitioned parameters")
        if _is_dtensor(p):
            _placement(p)
            has_dtensor = True
    if has_dtensor:
        return "fsdp2"
    world_size, _ = world()
    return "ddp" if mode == "auto" and world_size > 1 else None


def _all_gather_flat(out: torch.Tensor, t: torch.Tensor, group: Any = None) -> None:
    """``all_gather_into_tensor`` under its current name (torch 2.13 deprecates the old one)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, t, group=group)


def _comm_device(tensor_device: torch.device, group: Any = None) -> torch.device:
    """NCCL needs CUDA tensors; every other backend here gets CPU tensors."""
    return tensor_device if "nccl" in str(dist.get_backend(group)) else torch.device("cpu")


def check_replicated(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], group: Any = None
) -> bool | None:
    """Whether every rank holds the same parameters and gradients: one all_gather of a small
    signature (count, shapes, which have gradients, weighted sums of values and gradients).

    ``None`` means not decidable this step (all gradients zero, or some non-finite): ask again
    at the next step. A host sync; meant for the first steps only."""
    world = dist.get_world_size(group)
    device = next((p.device for p in params), torch.device("cpu"))
    device = _comm_device(device, group)
    shapes = zlib.crc32(repr([tuple(p.shape) for p in params]).encode())
    present = zlib.crc32(bytes(g is not None for g in grads))
    zero = torch.zeros((), dtype=torch.float64, device=device)
    s_p, s_g, s_g2 = zero.clone(), zero.clone(), zero.clone()
    for k, (p, g) in enumerate(zip(params, grads)):
        w = float(k + 1)
        s_p += w * p.detach().double().sum().to(device)
        if g is not None:
            gd = g.detach().double()
            s_g += w * gd.sum().to(device)
            s_g2 += gd.square().sum().to(device)
    head = torch.tensor([len(params), shapes, present], dtype=torch.float64, device=device)
    sig = torch.cat([head, torch.stack([s_p, s_g, s_g2])])
    table = torch.empty(world * sig.numel(), dtype=sig.dtype, device=device)
    _all_gather_flat(table, sig, group=group)
    table = table.view(world, -1).cpu()
    if not torch.isfinite(table).all():
        return None
    if not torch.equal(table[:, :3], table[:1, :3].expand_as(table[:, :3])):
        return False
    if not torch.allclose(table[:, 3:], table[:1, 3:].expand_as(table[:, 3:]), rtol=1e-6, atol=0.0):
        return False
    return None if float(table[0, 5]) == 0.0 else True


def all_true(flag: torch.Tensor, group: Any = None) -> bool:
    """``flag`` (a bool scalar) is true on every rank: one all_reduce and one host sync."""
    t = flag.to(device=_comm_device(flag.device, group), dtype=torch.int32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def sum_across(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum ``t`` over the ranks of ``group`` (e.g. squared norms of local shards, for grafting on
    the whole parameter's norm): one all_reduce, no host sync on NCCL."""
    return _reduce(t, dist.ReduceOp.SUM, group)


def max_across(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Elementwise maximum of ``t`` over the ranks (e.g. a device-side "found inf" flag that must
    skip the step on every rank): one all_reduce, no host sync on NCCL."""
    return _reduce(t, dist.ReduceOp.MAX, group)


def _reduce(t: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    buf = t.to(_comm_device(t.device, group), copy=True)
    dist.all_reduce(buf, op=op, group=group)
    return buf.to(t.device)


# -- local views and shard layouts --------------------------------------------------------
def local_view(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(tensor, grad)`` as plain tensors: a DTensor's local shard (in-place updates of it update
    ``p``), a plain tensor itself. A gradient whose layout differs from its parameter's is refused."""
    if not _is_dtensor(p):
        return p, p.grad
    grad = p.grad
    if grad is not None:
        if _is_dtensor(grad):
            if tuple(grad.placements) != tuple(p.placements):
                got, want = tuple(grad.placements), tuple(p.placements)
                raise _refuse(f"a gradient with placements {got} for a parameter with placements {want}")
            grad = grad.to_local()
        elif grad.shape != p.to_local().shape:
            raise _refuse("a plain gradient that is not the parameter's local shard")
    return p.to_local(), grad


class ShardLayout(NamedTuple):
    """How this rank's part of a parameter maps onto Shampoo blocks.

    ``padded_shape`` is the local tensor's shape with dim 0 padded to the shard size every rank
    of the mesh uses (``ceil(n / world)``), so all ranks have the same blocks and the same state
    shapes; ``rows`` of its dim 0 hold data, the rest are zeros (they add zero rows to the
    statistics, which leaves the data rows' preconditioner unchanged in exact arithmetic).
    Plain and replicated tensors: the parameter itself, no padding.
    """

    mshape: tuple[int, int] | None
    blocks: tuple[Block, ...]
    padded_shape: tuple[int, ...]
    rows: int

    def to_matrix(self, t: torch.Tensor) -> torch.Tensor:
        """The local tensor ``t`` as the ``mshape`` matrix (zero padded where needed)."""
        if t.shape[0] != self.padded_shape[0]:
            padded = t.new_zeros(self.padded_shape)
            padded[: t.shape[0]] = t
            t = padded
        return t.reshape(self.mshape)

    def from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_matrix`: the data rows of ``m`` in the local tensor's shape."""
        return m.reshape(self.padded_shape)[: self.rows]

    whole = False  # the matrix is the local shard's (see :class:`WholeLayout`)


class WholeLayout(NamedTuple):
    """A ``Shard(0)`` parameter seen whole (lossless FSDP2): its blocks are those of the full
    parameter, as on one device. :meth:`to_matrix` gathers the full gradient from the shards
    (one all-gather); :meth:`from_matrix` gives this rank's rows of a full matrix (a view)."""

    mshape: tuple[int, int] | None
    blocks: tuple[Block, ...]
    shape: tuple[int, ...]  # of the whole parameter
    start: int  # this rank's first row
    rows: int  # this rank's rows
    chunk: int  # rows per rank (ceil(n / world)); the last ranks hold fewer
    group: Any

    whole = True

    def to_matrix(self, t: torch.Tensor) -> torch.Tensor:
        return self.to_matrices([t])[0]

    def to_matrices(self, ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Several local tensors of this parameter (its gradient, a moment) gathered whole as
        ``mshape`` matrices in one all-gather: each rank's rows side by side, one row block per
        rank."""
        world = dist.get_world_size(self.group)
        device = _comm_device(ts[0].device, self.group)
        width = math.prod(self.shape[1:])
        send = torch.zeros((self.chunk, len(ts), width), dtype=ts[0].dtype, device=device)
        for k, t in enumerate(ts):
            send[: t.shape[0], k] = t.reshape(t.shape[0], width)
        recv = torch.empty((world * self.chunk, len(ts), width), dtype=send.dtype, device=device)
        _all_gather_flat(recv, send, group=self.group)
        return [recv[: self.shape[0], k].to(t.device).reshape(self.mshape) for k, t in enumerate(ts)]

    def from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        return m.reshape(self.shape)[self.start : self.start + self.rows]


@functools.lru_cache(maxsize=4096)
def _layout(shape: tuple[int, ...], max_order: int, world: int, local_rows: int | None) -> ShardLayout:
    if local_rows is None:  # plain or replicated
        mshape, blocks = blocks_for(shape, max_order)
        return ShardLayout(mshape, blocks, shape, shape[0] if shape else 0)
    n0 = shape[0]
    chunk = -(-n0 // world)  # torch.chunk / FSDP2 / DTensor Shard: ceil(n / world) rows per rank
    padded = (chunk, *shape[1:])
    if matrix_shape(shape) is None:
        return ShardLayout(None, (), padded, local_rows)
    mshape = matrix_shape(padded) if n0 == 1 else (chunk, math.prod(shape[1:]))
    rows, cols = mshape
    blocks = tuple(Block(r0, r1, c0, c1) for r0, r1 in split(rows, max_order) for c0, c1 in split(cols, max_order))
    return ShardLayout(mshape, blocks, padded, local_rows)


def shard_layout(p: torch.Tensor, max_order: int, whole: bool = False) -> ShardLayout | WholeLayout:
    """The blocks this rank preconditions for ``p``: the whole parameter when it is plain or
    replicated, its local rows when it is a ``Shard(0)`` DTensor (the left factor shrinks with the
    shard, the right one does not). ``whole``: a ``Shard(0)`` DTensor gets the blocks of the whole
    parameter (:class:`WholeLayout`, lossless FSDP2)."""
    if is_sharded(p):
        if whole:
            mshape, blocks = blocks_for(tuple(p.shape), max_order)
            mesh = p.device_mesh
            n, world, rank = p.shape[0], mesh.size(), mesh.get_local_rank()
            chunk = -(-n // world)
            start = min(rank * chunk, n)
            return WholeLayout(mshape, blocks, tuple(p.shape), start, p.to_local().shape[0], chunk, mesh.get_group())
        return _layout(tuple(p.shape), max_order, p.device_mesh.size(), p.to_local().shape[0])
    return _layout(tuple(p.shape), max_order, 1, None)


# -- the DDP plan -------------------------------------------------------------------------
class BlockRef(NamedTuple):
    """One block of one parameter: ``param`` is its position in the optimizer's parameter list."""

    param: int
    block: int
    rows: int
    cols: int


def block_cost(rows: int, cols: int) -> int:
    """Work of one block, exact integer: preconditioning and statistics (``L G`` and ``G R``,
    ``G G^T`` and ``G^T G``: ``r c (r + c)``) plus one inverse root of each factor (``r^3 + c^3``)."""
    return rows * cols * (rows + cols) + rows**3 + cols**3


def factor_costs(rows: int, cols: int) -> tuple[int, int]:
    """:func:`block_cost` shared between the block's two factors: each its statistic, its root and
    its side of the preconditioning (``k^2 n + k^3`` for order ``k`` beside ``n``)."""
    return rows * rows * cols + rows**3, cols * cols * rows + cols**3


def block_bytes(rows: int, cols: int) -> int:
    """What a block's second-order state grows with when its exact bytes are not given: one
    matrix per factor, ``r^2 + c^2`` (the optimizer passes the exact bytes of its storages)."""
    return rows * rows + cols * cols


def nbytes(entries: Mapping[str, Any]) -> int:
    """Bytes of the tensors in ``entries`` (meta tensors count as they would be stored)."""
    return sum(v.numel() * v.element_size() for v in entries.values() if isinstance(v, torch.Tensor))


BALANCES = ("bytes", "work")
DEFAULT_BALANCE = "bytes"  # benchmarks/distributed.py: the lower per-rank state at equal step time
SIDES = ("L", "R")


class Plan:
    """Which rank owns each block; identical on every rank. ``costs``: what the assignment
    balanced (bytes or work) per block.

    ``owners`` are the blocks' *direction* owners (the rank that preconditions the block).
    ``factor_owners`` holds, per block, the ranks that keep its left and right factor: both the
    direction owner, except for a block split between two ranks (:func:`plan_for`'s ``split``),
    whose other factor's root then travels to the direction owner at every step
    (:meth:`travelling`). ``side_costs``: a split block's cost per factor."""

    __slots__ = ("_index", "_sides", "blocks", "costs", "factor_owners", "owners", "side_costs", "world_size")

    def __init__(self, blocks: tuple[BlockRef, ...], owners: tuple[int, ...], world_size: int,
                 costs: tuple[int, ...] | None = None, factor_owners: tuple[tuple[int, int], ...] | None = None,
                 side_costs: tuple[tuple[int, int] | None, ...] | None = None):
        self.blocks, self.owners, self.world_size = blocks, owners, world_size
        self.costs = tuple(block_cost(b.rows, b.cols) for b in blocks) if costs is None else costs
        self.factor_owners = tuple((o, o) for o in owners) if factor_owners is None else factor_owners
        self.side_costs = (None,) * len(blocks) if side_costs is None else side_costs
        self._index = {(b.param, b.block): o for b, o in zip(blocks, owners)}
        self._sides = {(b.param, b.block): f for b, f in zip(blocks, self.factor_owners)}

    def owner(self, param: int, block: int) -> int:
        """The rank that preconditions the block."""
        return self._index[(param, block)]

    def factor_owner(self, param: int, block: int, side: str) -> int:
        """The rank that keeps the block's ``side`` (``"L"`` or ``"R"``) factor."""
        return self._sides[(param, block)][SIDES.index(side)]

    def has(self, param: int, block: int) -> bool:
        return (param, block) in self._index

    def owned(self, rank: int) -> frozenset[tuple[int, int]]:
        """``(param, block)`` pairs whose direction ``rank`` computes."""
        return frozenset(k for k, o in self._index.items() if o == rank)

    def travelling(self) -> list[tuple[int, int, str, int, int]]:
        """``(param, block, side, from, to)`` for every factor kept by another rank than its
        block's direction owner: the root that rank sends at each step, in plan order."""
        out = []
        for b, owner, sides in zip(self.blocks, self.owners, self.factor_owners):
            out += [(b.param, b.block, side, o, owner) for side, o in zip(SIDES, sides) if o != owner]
        return out

    def loads(self) -> list[int]:
        """Total cost (what the plan balanced) per rank; a split block's by factor."""
        out = [0] * self.world_size
        for cost, owner, sides, split in zip(self.costs, self.owners, self.factor_owners, self.side_costs):
            if split is None:
                out[owner] += cost
            else:
                for o, c in zip(sides, split):
                    out[o] += c
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and (self.blocks, self.owners, self.world_size, self.factor_owners) == (
            other.blocks, other.owners, other.world_size, other.factor_owners
        )

    def __hash__(self) -> int:
        return hash((self.blocks, self.owners, self.world_size, self.factor_owners))

    def __repr__(self) -> str:
        split = sum(lo != ro for lo, ro in self.factor_owners)
        return f"Plan({len(self.blocks)} blocks, {split} split, world_size={self.world_size}, loads={self.loads()})"


@functools.lru_cache(maxsize=64)
def _plan(blocks: tuple[BlockRef, ...], world_size: int, costs: tuple[int, ...],
          sides: tuple[tuple[int, int], ...] | None = None) -> Plan:
    """Largest cost first, each to the least loaded rank. ``sides``: per block its factors'
    costs; a block costlier than a rank's fair share (the total over the ranks) is then placed
    as its two factors, and its direction goes with its costlier factor (left on a tie), so the
    cheaper root is the one that travels."""
    fair = sum(costs) / world_size
    split = tuple(sides is not None and world_size > 1 and c > fair for c in costs)
    items = []  # (cost, block, side index or None)
    for i, c in enumerate(costs):
        items += [(sides[i][0], i, 0), (sides[i][1], i, 1)] if split[i] else [(c, i, None)]
    heap = [(0, rank) for rank in range(world_size)]  # (load, rank): ties go to the lower rank
    placed: dict[tuple[int, int | None], int] = {}
    for c, i, side in sorted(items, key=lambda it: (-it[0], it[1], -1 if it[2] is None else it[2])):
        load, rank = heapq.heappop(heap)
        placed[(i, side)] = rank
        heapq.heappush(heap, (load + c, rank))
    owners, factor_owners, side_costs = [], [], []
    for i in range(len(blocks)):
        if not split[i]:
            owners.append(placed[(i, None)])
            factor_owners.append((owners[-1], owners[-1]))
            side_costs.append(None)
            continue
        lo, ro = placed[(i, 0)], placed[(i, 1)]
        owners.append(lo if sides[i][0] >= sides[i][1] else ro)
        factor_owners.append((lo, ro))
        side_costs.append(sides[i])
    return Plan(blocks, tuple(owners), world_size, costs, tuple(factor_owners), tuple(side_costs))


def plan_for(
    blocks: Iterable[BlockRef | tuple[int, int, int, int]],
    world_size: int,
    balance: str = "work",
    costs: Sequence[int | tuple[int, int]] | None = None,
    split: bool = False,
) -> Plan:
    """Assign every block to a rank: largest cost first, each to the least loaded rank (ties: the
    lower rank, then the earlier block). Pure and deterministic, so every rank computes the same
    plan without communicating; cached per layout.

    ``balance``: ``"work"`` (:func:`block_cost`) or ``"bytes"`` (``costs``, the exact state bytes
    per block, else :func:`block_bytes`). ``split``: a block costlier than a rank's fair share
    (total / world) may have its two factors kept by two ranks (its largest block would
    otherwise bound what one rank keeps); ``costs`` then gives each block's ``(left, right)``
    factor bytes (without them: ``r^2`` and ``c^2``; for work, :func:`factor_costs`)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {', '.join(map(repr, BALANCES))}, got {balance!r}")
    refs = tuple(BlockRef(*b) for b in blocks)
    if costs is not None and len(costs) != len(refs):
        raise ValueError(f"{len(costs)} costs for {len(refs)} blocks")
    pairs: tuple[tuple[int, int], ...] | None = None
    if balance == "work":
        pairs = tuple(factor_costs(b.rows, b.cols) for b in refs)
    elif costs is not None and all(isinstance(c, tuple) for c in costs):
        pairs = tuple((int(c[0]), int(c[1])) for c in costs)  # type: ignore[index]
    elif costs is not None:
        if split:
            raise ValueError("split needs each block's (left, right) factor costs")
        weights = tuple(int(c) for c in costs)  # type: ignore[arg-type]
    else:
        pairs = tuple((b.rows * b.rows, b.cols * b.cols) for b in refs)
    if pairs is not None:
        weights = tuple(lc + rc for lc, rc in pairs)
    return _plan(refs, world_size, weights, pairs if split else None)


def gather_blocks(
    blocks: Sequence[tuple[torch.Tensor, int]], dtype: torch.dtype = torch.float32, group: Any = None
) -> None:
    """Give every rank every preconditioned block, in place: one all_gather of a flat buffer.

    ``blocks`` is ``(destination, owner)`` for every block preconditioned this step, in the same
    order and with the same shapes on every rank; the owner's destination holds the result on
    entry. On return every destination holds the owner's result, rounded through ``dtype`` on
    every rank alike (the owner's own copy too), so all ranks apply the same update."""
    if not blocks:
        return
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = [0] * world
    for dst, owner in blocks:
        sizes[owner] += dst.numel()
    length = max(sizes)
    if length == 0:
        return
    device = _comm_device(blocks[0][0].device, group)
    send = torch.zeros(length, dtype=dtype, device=device)
    mine = [dst.reshape(-1) for dst, owner in blocks if owner == rank]
    if mine:
        send[: sizes[rank]] = torch.cat(mine)
    recv = torch.empty(world * length, dtype=dtype, device=device)
    _all_gather_flat(recv, send, group=group)
    offsets = [r * length for r in range(world)]
    for dst, owner in blocks:
        n = dst.numel()
        dst.copy_(recv[offsets[owner] : offsets[owner] + n].view(dst.shape), non_blocking=True)
        offsets[owner] += n


def _p2p(ops: list[Any]) -> None:
    """Run point-to-point sends and receives together (one place, so that benchmarks can count
    their bytes)."""
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def exchange(sends: Sequence[tuple[int, Sequence[torch.Tensor]]],
             recvs: Sequence[tuple[int, Sequence[tuple[tuple[int, ...], torch.dtype]]]],
             group: Any = None, device: torch.device | None = None) -> list[list[torch.Tensor]]:
    """Send tensors to single ranks and receive others' (block roots that travel to the rank
    that preconditions the block): ``sends`` is ``(to, tensors)``, ``recvs`` ``(from, [(shape,
    dtype)])``, both listed in the same order on the sending and the receiving rank. Everything
    for one peer travels as one byte buffer; returns the received tensors per ``recvs`` entry,
    on ``device``. Ranks are ranks of ``group``."""
    dev = _comm_device(device or torch.device("cpu"), group)
    out_bufs: dict[int, list[torch.Tensor]] = {}
    for to, tensors in sends:
        out_bufs.setdefault(to, []).extend(t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors)
    sizes: dict[int, int] = {}
    for frm, templates in recvs:
        sizes[frm] = sizes.get(frm, 0) + sum(math.prod(sh) * torch.empty((), dtype=dt).element_size()
                                             for sh, dt in templates)
    in_bufs = {frm: torch.empty(n, dtype=torch.uint8, device=dev) for frm, n in sizes.items()}
    ops = [dist.P2POp(dist.isend, torch.cat(parts).to(dev), group=group, group_peer=to)
           for to, parts in sorted(out_bufs.items())]
    ops += [dist.P2POp(dist.irecv, buf, group=group, group_peer=frm) for frm, buf in sorted(in_bufs.items())]
    if ops:
        _p2p(ops)
    offsets = dict.fromkeys(in_bufs, 0)
    received = []
    for frm, templates in recvs:
        tensors = []
        for shape, dtype in templates:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            raw = in_bufs[frm][offsets[frm] : offsets[frm] + n]
            offsets[frm] += n
            tensors.append(raw.clone().view(dtype).reshape(shape).to(device or raw.device))  # clone: aligned
        received.append(tensors)
    return received


# -- state: ownership, consolidation, checkpoint form ---------------------------------------
def block_index(key: str) -> int | None:
    """The block a state key belongs to (``"3.L.eigvals"`` -> 3), ``None`` for per-parameter keys."""
    return block_of(key)


def prune_state(state: dict[str, Any], keep: Iterable[int | tuple[int, str]]) -> int:
    """Delete the entries of blocks not in ``keep`` (a rank keeps only the blocks it owns);
    ``keep`` holds block indices (every factor of the block) or ``(block, side)`` pairs (one
    factor). Returns how many were deleted."""
    keep = set(keep)
    drop = [k for k in state if (key := StateKey.parse(k)).block is not None
            and key.block not in keep and (key.block, key.side) not in keep]
    for k in drop:
        del state[k]
    return len(drop)


def gather_block_state(
    local: Mapping[int, Mapping[str, torch.Tensor]], dst: int = 0, group: Any = None, device: Any = "cpu"
) -> dict[int, dict[str, torch.Tensor]] | None:
    """Collect every rank's block state on rank ``dst`` (for a full checkpoint under ``"ddp"``).

    ``local`` maps parameter index to the state entries of the blocks this rank owns. Returns the
    union on ``dst`` (tensors on ``device``), ``None`` elsewhere. Every rank must call it."""
    payload = {pid: {k: v.detach().cpu() for k, v in s.items()} for pid, s in local.items()}
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    received: list[Any] | None = [None] * world if rank == dst else None
    dist.gather_object(payload, received, group=group, group_dst=dst)
    if received is None:
        return None
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for part in received:
        for pid, s in part.items():
            merged.setdefault(pid, {}).update({k: v.to(device) for k, v in s.items()})
    return merged


def _stacked(t: torch.Tensor, p: torch.Tensor) -> Any:
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(t.unsqueeze(0), p.device_mesh, [Shard(0)], run_check=False)


_MOMENT_NAMES = ("exp_avg", "exp_avg_sq", "momentum_buffer")


def _quantized_moments(state: Mapping[str, Any]) -> list[str]:
    return [n for n in _MOMENT_NAMES if f"{n}_codes" in state and f"{n}_absmax" in state]


def export_state(p: torch.Tensor, state: Mapping[str, Any], whole: bool = False) -> dict[str, Any]:
    """The checkpoint form of a ``Shard(0)`` parameter's state, for ``torch.distributed.checkpoint``.

    Moments become DTensors laid out like ``p``, so DCP reshards them to any number of ranks;
    quantized moments (``moment_bits`` 8 / 4, whose codes are sized by the local shard) are
    stored dequantized, in fp32, under the moment's own name. Block state:

    * ``whole`` (lossless FSDP2): the blocks are the whole parameter's and each rank holds only
      the blocks it owns, so they stay plain tensors keyed by block: DCP writes each once, from
      its owner, and every rank of any world size reads the blocks it owns there;
    * per-shard blocks (``distributed="off"``): each becomes a ``(world, *shape)`` DTensor, one
      row per rank (DCP would keep a single copy of a plain tensor), which resumes only at the
      same world size.

    Other parameters' state is returned as is."""
    if not is_sharded(p):
        return dict(state)
    local = p.to_local()
    out: dict[str, Any] = {}
    quantized = _quantized_moments(state)
    for name in quantized:
        codes, absmax = state[f"{name}_codes"], state[f"{name}_absmax"]
        bits = 8 if codes.numel() == local.numel() else 4
        out[name] = _moment_dtensor(_dequantized(name, codes, absmax, local, bits), p)
    for key, v in state.items():
        if key.endswith(("_codes", "_absmax")) and key.rsplit("_", 1)[0] in quantized:
            continue
        if not isinstance(v, torch.Tensor) or _is_dtensor(v):
            out[key] = v
        elif kind_of(key) == "moments" and block_index(key) is None and v.shape == local.shape:
            out[key] = _moment_dtensor(v, p)
        elif whole:  # contiguous: a full state dict is broadcast into these as raw memory
            out[key] = v.contiguous()
        else:
            out[key] = _stacked(v, p)
    return out


def _moment_dtensor(v: torch.Tensor, p: torch.Tensor) -> Any:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _dequantized(name: str, codes: torch.Tensor, absmax: torch.Tensor, local: torch.Tensor, bits: int) -> torch.Tensor:
    from ..quant import moments

    spec = moments.moment_spec(local.numel(), bits)
    book = moments.moment_codebook(name, bits, codes.device)
    flat = moments.dequantize_moment(codes, absmax, book, spec.numel, bits, spec.block_size)
    return flat.reshape(local.shape)


def _unscaled(flat: torch.Tensor, book: torch.Tensor, block_size: int) -> torch.Tensor:
    """A dequantized moment, each quantization block divided by the code value its largest
    element was stored as (the map's largest or smallest value, by its sign): quantizing it
    gives back the saved scales, and the saved codes, on the same shards."""
    n = flat.numel()
    blocks = flat.new_zeros(-(-n // block_size) * block_size)
    blocks[:n] = flat
    blocks = blocks.view(-1, block_size)
    top = blocks.gather(1, blocks.abs().argmax(1, keepdim=True))
    return (blocks / torch.where(top >= 0, book.max(), -book.min())).reshape(-1)[:n]


def import_state(p: torch.Tensor, state: Mapping[str, Any], moment_bits: int = 32) -> dict[str, Any]:
    """The inverse of :func:`export_state`: local tensors for this rank (moments re-quantized
    where this rank stores them at ``moment_bits``)."""
    out: dict[str, Any] = {}
    for key, v in state.items():
        if not _is_dtensor(v):
            out[key] = v
        elif kind_of(key) == "moments" and block_index(key) is None and tuple(v.shape) == tuple(p.shape):
            out[key] = v.to_local()
        else:
            local = v.to_local()
            if local.shape[0] != 1:
                raise RuntimeError(f"state {key!r}: expected one row per rank, got local shape {tuple(local.shape)}")
            out[key] = local[0]
    if moment_bits != 32 and is_sharded(p):
        from ..quant import moments

        spec = moments.moment_spec(p.to_local().numel(), moment_bits)
        for name in _MOMENT_NAMES:
            if spec.quantized and isinstance(out.get(name), torch.Tensor):
                book = moments.moment_codebook(name, moment_bits, out[name].device)
                x = _unscaled(out.pop(name).float().reshape(-1), book, spec.block_size)
                codes, absmax = moments.quantize_moment(x, book, moment_bits, spec.block_size)
                out[f"{name}_codes"], out[f"{name}_absmax"] = codes, absmax
    return out


# -- one object per optimizer -------------------------------------------------------------
class DistributedLayer:
    """What one optimizer keeps of the distribution layer: the mode, the layout once resolved,
    the cached plan, the dtype blocks travel in.

    Per step: :meth:`resolve` (the layout; a collective only until DDP is confirmed), then
    :meth:`plan` over the optimizer's blocks, :meth:`owns` to skip other ranks' blocks,
    :meth:`gather` after preconditioning."""

    def __init__(self, mode: str = "auto", dtype: str = "float32", group: Any = None, balance: str = DEFAULT_BALANCE,
                 whole_fsdp: bool = False, split_factors: bool = False):
        self.mode = check_mode(mode)
        self.whole_fsdp = whole_fsdp  # the optimizer preconditions FSDP2 parameters whole under "auto"
        self.split_factors = split_factors  # a block's two factors may be kept by two ranks (plan_for's split)
        self.dtype = check_comm_dtype(dtype)
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(map(repr, BALANCES))}, got {balance!r}")
        self.balance = balance  # what the block owners balance: "bytes" (state per rank) or "work"
        self.group = group
        self._plan_group = group  # DDP: group; lossless FSDP2: the parameters' mesh
        self.kind: str | None = None
        self._resolved = False
        self._plan: Plan | None = None
        self._pruned: Plan | None = None  # the assignment the state was last pruned to
        self._travel: dict[tuple[int, int], tuple[str, int, int]] = {}  # (param, block) -> (side, from, to)
        self._rank = 0

    @property
    def resolved(self) -> bool:
        """Whether :meth:`resolve` has decided the layout for good (it no longer communicates)."""
        return self._resolved

    def check(self, params: Iterable[torch.Tensor]) -> None:
        """Refuse unsupported layouts (at construction): raises :class:`UnsupportedStrategyError`."""
        detect(params, self.mode)

    def resolve(self, params: Sequence[torch.Tensor]) -> str | None:
        """The layout for this step. Under a DDP candidate the first steps compare a signature
        of parameters and gradients across ranks until it is decidable; if ranks differ, fall
        back to ``None`` (every rank its own update) with a warning."""
        if self._resolved:
            return self.kind
        kind = detect(params, self.mode)
        if kind == "ddp":
            same = check_replicated(params, [p.grad for p in params], self.group)
            if same is None:
                return None  # undecidable this step: replicated work, decide again next step
            if not same:
                warnings.warn(
                    "Shampoo4bit(distributed='auto'): parameters or gradients differ across ranks (not plain "
                    "data parallel), so every rank preconditions its own parameters without sharing work",
                    stacklevel=3,
                )
                kind = None
        self.kind, self._resolved = kind, True
        if kind == "fsdp2" and self.lossless:
            mesh = next(p.device_mesh for p in params if _is_dtensor(p))
            self._plan_group = mesh.get_group()
        if self.owners_planned:
            self._rank = dist.get_rank(self._plan_group)
        return kind

    @property
    def lossless(self) -> bool:
        """FSDP2 ``Shard(0)`` parameters are preconditioned whole, block by block on owner ranks
        (``"auto"`` in an optimizer that supports it: ``whole_fsdp``), instead of per local shard
        (``"off"``)."""
        return self.whole_fsdp and self.mode == "auto"

    @property
    def owners_planned(self) -> bool:
        """Whether blocks have owner ranks: DDP sharding, or lossless FSDP2."""
        return self.kind == "ddp" or (self.kind == "fsdp2" and self.lossless)

    def plan(self, blocks: Iterable[BlockRef], weigh: Callable[[BlockRef], int | tuple[int, int]] | None = None
             ) -> Plan | None:
        """The owner of every block under ``"ddp"`` and lossless ``"fsdp2"`` (``None`` otherwise:
        this rank computes all). ``weigh``: the exact state bytes of a block, or of its
        ``(left, right)`` factors where ``split_factors`` (balanced when ``balance`` is
        ``"bytes"``; called only when the blocks change)."""
        if not self.owners_planned:
            self._plan = None
            return None
        blocks = tuple(blocks)
        if self._plan is None or self._plan.blocks != blocks:
            costs = [weigh(b) for b in blocks] if weigh is not None and self.balance == "bytes" else None
            self._plan = plan_for(blocks, dist.get_world_size(self._plan_group), self.balance, costs,
                                  split=self.split_factors)
            self._travel = {(pid, i): (side, src, dst) for pid, i, side, src, dst in self._plan.travelling()}
        return self._plan

    def owns(self, param: int, block: int) -> bool:
        """Whether this rank preconditions the block (computes its direction)."""
        return self._plan is None or not self._plan.has(param, block) or self._plan.owner(param, block) == self._rank

    def owned_blocks(self, param: int, n_blocks: int) -> list[int]:
        return [i for i in range(n_blocks) if self.owns(param, i)]

    def holds(self, param: int, block: int, side: str) -> bool:
        """Whether this rank keeps the block's ``side`` factor (its state)."""
        plan = self._plan
        return plan is None or not plan.has(param, block) or plan.factor_owner(param, block, side) == self._rank

    def held_parts(self, param: int, n_blocks: int) -> frozenset[tuple[int, str]]:
        """``(block, side)`` of every factor of the parameter this rank keeps."""
        return frozenset((i, side) for i in range(n_blocks) for side in SIDES if self.holds(param, i, side))

    def travel(self, param: int, block: int) -> tuple[str, int, int] | None:
        """``(side, from, to)`` when the block's ``side`` factor is kept by rank ``from`` and its
        root must reach rank ``to``, which preconditions the block; None otherwise."""
        return self._travel.get((param, block))

    def gather(self, blocks: Sequence[tuple[int, int, torch.Tensor]]) -> None:
        """``(param, block, destination)`` for every block preconditioned this step, same order on
        every rank: fill the other ranks' blocks (no-op unless ``"ddp"``)."""
        if self._plan is None:
            return
        gather_blocks([(dst, self._plan.owner(pid, i)) for pid, i, dst in blocks], self.dtype, self._plan_group)

    # -- one step -------------------------------------------------------------------------
    def begin_step(self, params: Sequence[torch.Tensor], blocks: Sequence[tuple[torch.Tensor, int, Sequence[Block]]],
                   states: Mapping[torch.Tensor, dict[str, Any]],
                   weigh: Callable[[torch.Tensor, Block], int] | None = None) -> StepLayout:
        """How this step is distributed: resolve the layout (``params``: every parameter), and
        under DDP or lossless FSDP2 assign every block an owner (``blocks``: ``(param, index,
        blocks)`` of every parameter, the same on every rank; under FSDP2 the DTensors' only).
        ``weigh(param, block)``: the block's state bytes, balanced over the ranks. The first time
        an assignment is used each state in ``states`` is pruned to the blocks this rank owns;
        ``StepLayout.moved`` says whether blocks changed owner since the previous assignment
        (their new owners lack their state)."""
        kind = self.kind if self._resolved else self.resolve(params)
        if not self.owners_planned:
            return StepLayout(kind, self, None, False)
        if kind == "fsdp2":  # plain tensors beside FSDP2 ones may differ by rank: each computes its own
            blocks = [(p, pid, bs) for p, pid, bs in blocks if _is_dtensor(p)]
        refs = [BlockRef(pid, i, b.rows, b.cols) for _, pid, bs in blocks for i, b in enumerate(bs)]
        by_ref = {(pid, i): (p, b) for p, pid, bs in blocks for i, b in enumerate(bs)}
        plan = self.plan(refs, None if weigh is None else (lambda r: weigh(*by_ref[(r.param, r.block)])))
        moved = False
        if plan is not self._pruned:
            for p, pid, bs in blocks:
                state = states.get(p)
                if state:
                    prune_state(state, self.held_parts(pid, len(bs)))
            moved = self._pruned is not None
            self._pruned = plan
        return StepLayout(kind, self, {id(p): pid for p, pid, _ in blocks}, moved)

    @property
    def rank(self) -> int:
        return self._rank

    def shared_blocks(self, state: Mapping[Any, Mapping[str, Any]]) -> dict[Any, dict[str, Any]]:
        """Under lossless FSDP2, ``state`` (parameter id -> entries, this rank's blocks) with every
        rank's blocks added (one all-gather; copies, the live states are untouched): a checkpoint
        keyed by block that any world size reads, through a sharded or a full
        ``torch.distributed.checkpoint`` state dict (the full one keeps rank 0's plain tensors).
        As is otherwise. Every rank must call it."""
        if self.kind != "fsdp2" or self._pruned is None:
            return dict(state)
        mine = {pid: {k: v.detach().cpu() for k, v in st.items() if block_index(k) is not None and
                      isinstance(v, torch.Tensor)} for pid, st in state.items()}
        parts: list[Any] = [None] * dist.get_world_size(self._plan_group)
        dist.all_gather_object(parts, mine, group=self._plan_group)
        out = {pid: dict(st) for pid, st in state.items()}
        for rank, part in enumerate(parts):
            if rank == self._rank:
                continue
            for pid, entries in part.items():
                target = out.setdefault(pid, {})
                device = next((v.device for v in target.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
                for k, v in entries.items():
                    target.setdefault(k, v.to(device))
        return out

    @property
    def pruned(self) -> Plan | None:
        """The DDP assignment the state was last pruned to (None: the state is full)."""
        return self._pruned

    def forget_assignment(self) -> None:
        """A state was loaded: prune it again at the next step."""
        self._pruned = None


class StepLayout(NamedTuple):
    """What one optimizer step needs to know of the distribution (from
    :meth:`DistributedLayer.begin_step`): which blocks this rank computes, the local shards it
    works on, and the collectives that make every rank agree."""

    kind: str | None  # None (every rank computes everything), "ddp" or "fsdp2"
    layer: DistributedLayer
    index: dict[int, int] | None  # DDP: id(param) -> its index in the assignment
    moved: bool  # DDP: blocks changed owner since the previous assignment

    @property
    def fsdp(self) -> bool:
        return self.kind == "fsdp2"

    def local(self, params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The tensors the step updates and their gradients: the local shards under FSDP2."""
        if not self.fsdp:
            return list(params), [p.grad for p in params]
        views = [local_view(p) for p in params]
        return [t for t, _ in views], [g for _, g in views]

    def param_index(self, p: torch.Tensor) -> int | None:
        return None if self.index is None else self.index.get(id(p))

    def owned(self, p: torch.Tensor, n_blocks: int) -> list[int] | None:
        """The blocks of ``p`` this rank computes; None: all of them (no owners planned)."""
        if self.index is None or not n_blocks or id(p) not in self.index:
            return None
        return self.layer.owned_blocks(self.index[id(p)], n_blocks)

    def held(self, p: torch.Tensor, n_blocks: int) -> frozenset[tuple[int, str]] | None:
        """``(block, side)`` of the factors of ``p`` this rank keeps; None: all of them."""
        if self.index is None or not n_blocks or id(p) not in self.index:
            return None
        return self.layer.held_parts(self.index[id(p)], n_blocks)

    def travel(self, p: torch.Tensor, block: int) -> tuple[str, int, int] | None:
        """``(side, from, to)`` if the root of that factor of the block travels between ranks."""
        if self.index is None or id(p) not in self.index:
            return None
        return self.layer.travel(self.index[id(p)], block)

    @property
    def rank(self) -> int:
        return self.layer.rank

    def exchange(self, sends: Sequence[tuple[int, Sequence[torch.Tensor]]],
                 recvs: Sequence[tuple[int, Sequence[tuple[tuple[int, ...], torch.dtype]]]],
                 device: torch.device) -> list[list[torch.Tensor]]:
        """:func:`exchange` among the ranks that own blocks."""
        return exchange(sends, recvs, self.layer._plan_group, device)

    def all_true(self, ok: bool) -> bool:
        """A host-side check that must agree on every rank (FSDP2 ranks see different shards;
        DDP ranks hold the same gradients, so their answers agree already)."""
        return all_true(torch.tensor(ok), self.layer.group) if self.fsdp else ok

    def any_flag(self, flags: dict[torch.device, torch.Tensor]) -> dict[torch.device, torch.Tensor]:
        """Device-side "non-finite" flags, raised on every rank if raised on one (FSDP2)."""
        if not self.fsdp:
            return flags
        return {dev: max_across(flag, self.layer.group) for dev, flag in flags.items()}

    def whole_norms(self, gn: list[torch.Tensor], hn: list[torch.Tensor], sharded: list[bool]
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Grafting norms of whole parameters: the local shards' squared norms summed over the
        ranks (one all-reduce) for the entries that are shards."""
        if not any(sharded):
            return gn, hn
        sq = torch.stack([torch.stack(gn), torch.stack(hn)]).square()
        mask = torch.tensor(sharded, device=sq.device)
        sq = torch.where(mask, sum_across(sq * mask, self.layer.group), sq).sqrt()
        return list(sq[0].unbind()), list(sq[1].unbind())

    def gather(self, blocks: Sequence[tuple[int, int, torch.Tensor]]) -> None:
        """Fill in the blocks other ranks computed (DDP; the same list on every rank)."""
        if blocks:
            self.layer.gather(blocks)
