"""The distribution layer (``lightning_shampoo4.optim.distributed``) on two CPU gloo processes.

``MiniShampoo`` below is a small dense block Shampoo whose step drives the layer the way
``Shampoo4bit``'s step is meant to (resolve the layout, plan, skip other ranks' blocks, gather
before grafting; checkpoint form for DCP and consolidation for DDP), so the layer is tested end
to end without the quantized optimizer. The tests at the end run ``Shampoo4bit`` itself: DDP
sharding against ``distributed="off"``, FSDP2 shards, checkpoints, and both through Lightning.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_shampoo4.optim import Shampoo4bit, distributed as D
from lightning_shampoo4.optim.memory import memory_report
from lightning_shampoo4.optim.shampoo import TIMERS

ROOT = Path(__file__).resolve().parent.parent


# -- helpers ------------------------------------------------------------------------------
def _spawn(fn, tmp_path, *args, world: int = 2, timeout: float = 60.0, init: bool = True) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` processes (in a gloo process group unless
    ``init=False``); fail on error or hang."""
    store = str(tmp_path / f"store_{fn.__name__}_{time.monotonic_ns()}") if init else None
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"  # fork: no re-import, seconds faster
    ctx = mp.start_processes(_entry, args=(fn, world, store, args), nprocs=world, join=False, start_method=method)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{fn.__name__} did not finish within {timeout} s")


def _entry(rank, fn, world, store, args):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if store is not None:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        if dist.is_initialized():
            # free DDP modules and trainers while the group is registered, and let gloo's worker
            # thread drop its finished collectives (it needs the GIL): destroying the group
            # under it deadlocks now and then
            gc.collect()
            time.sleep(0.05)
            dist.destroy_process_group()


def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


class MiniShampoo(torch.optim.Optimizer):
    """Dense block Shampoo (fp32 factors, eigh roots every step, graft, SGD with momentum) on the distribution layer."""

    def __init__(
        self, params, lr=0.01, max_order=6, beta=0.9, eps=1e-2, distributed="auto", distributed_dtype="float32"
    ):
        super().__init__(params, dict(lr=lr, max_order=max_order))
        self.beta, self.eps = beta, eps
        self.layer = D.DistributedLayer(distributed, distributed_dtype)
        self.layer.check(self._params())
        self._consolidated = None
        self._pruned_plan = None

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _layouts(self):
        return [D.shard_layout(p, g["max_order"]) for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, layouts = self._params(), self._layouts()
        kind = self.layer.resolve(params)  # (1) the layout; collective only until DDP is confirmed
        plan = self.layer.plan(  # (2) owners of all blocks of all preconditioned params
            D.BlockRef(pid, i, b.rows, b.cols) for pid, lay in enumerate(layouts) for i, b in enumerate(lay.blocks)
        )
        if plan is not None and plan is not self._pruned_plan:  # loaded full state: keep own blocks
            for pid, p in enumerate(params):
                D.prune_state(self.state[p], self.layer.owned_blocks(pid, len(layouts[pid].blocks)))
            self._pruned_plan = plan
        pending, updates = [], []
        for pid, p in enumerate(params):
            t, g = D.local_view(p)
            if g is None:
                continue
            lay, state = layouts[pid], self.state[p]
            state["step"] = state.get("step", 0) + 1
            if not lay.blocks:
                updates.append((t, g, None, None, lay, state))
                continue
            gm = lay.to_matrix(g.float())
            out = torch.empty_like(gm)
            for i, b in enumerate(lay.blocks):
                dst = out[b.r0 : b.r1, b.c0 : b.c1]
                pending.append((pid, i, dst))  # every block, owned or not, same order on all ranks
                if not self.layer.owns(pid, i):  # (3) other ranks' blocks: no state, no work
                    continue
                gb = gm[b.r0 : b.r1, b.c0 : b.c1]
                left, right = self._factor(state, f"{i}.L", b.rows, gm), self._factor(state, f"{i}.R", b.cols, gm)
                left.mul_(self.beta).add_(gb @ gb.mT, alpha=1 - self.beta)
                right.mul_(self.beta).add_(gb.mT @ gb, alpha=1 - self.beta)
                dst.copy_(self._root(left) @ gb @ self._root(right))
            updates.append((t, g, gm, out, lay, state))
        self.layer.gather(pending)  # (4) other ranks' blocks arrive before grafting
        norms = [torch.stack([u[2].square().sum(), u[3].square().sum()]) for u in updates if u[2] is not None]
        norms = torch.stack(norms or [torch.zeros(2)])
        if kind == "fsdp2":
            norms = D.sum_across(norms)  # graft on the whole parameter's norm, not the shard's
        k, lr = 0, self.param_groups[0]["lr"]
        for t, g, gm, out, lay, state in updates:
            if gm is None:
                update = g
            else:
                update = lay.from_matrix(out).to(t.dtype) * (norms[k, 0].sqrt() / (norms[k, 1].sqrt() + 1e-12))
                k += 1
            buf = state.setdefault("momentum_buffer", torch.zeros_like(t))  # a local tensor like the shard
            buf.mul_(0.5).add_(update)
            t.add_(buf, alpha=-lr)
        return loss

    def _factor(self, state, key, n, like):
        key = f"{key}.factor"
        if key not in state:
            state[key] = self.eps * torch.eye(n, dtype=torch.float32, device=like.device)
        return state[key]

    def _root(self, a):
        vals, vecs = torch.linalg.eigh(a.double())
        vals = vals.clamp_min(0) + self.eps * vals.abs().max().clamp_min(1e-30)
        return ((vecs * vals.pow(-0.25)) @ vecs.mT).float()

    # -- checkpointing: DCP form under FSDP2, consolidation under DDP --------------------------
    def state_dict(self):
        if self._consolidated is not None:
            sd, self._consolidated = self._consolidated, None
            return sd
        sd = super().state_dict()
        params = self._params()
        sd["state"] = {pid: D.export_state(params[pid], s) for pid, s in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        # keys are parameter ids, or FQNs when torch.distributed.checkpoint loads: map by the groups
        by_id = dict(zip((i for g in state_dict["param_groups"] for i in g["params"]), self._params()))
        state = {pid: D.import_state(by_id[pid], s) for pid, s in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": state})
        self._pruned_plan = None

    def consolidate_state_dict(self, to=0):
        """Every rank calls it; afterwards ``state_dict()`` on rank ``to`` holds all blocks."""
        sd = super().state_dict()
        sd["state"] = {pid: dict(s) for pid, s in sd["state"].items()}  # torch's are the live dicts
        mine = {pid: {k: v for k, v in s.items() if D.block_index(k) is not None} for pid, s in sd["state"].items()}
        merged = D.gather_block_state(mine, dst=to)
        if merged is not None:
            for pid, s in merged.items():
                sd["state"].setdefault(pid, {}).update(s)
            self._consolidated = sd


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]), k


def _second_order_bytes(opt):
    return memory_report(opt.state.values())["second_order"]


# -- plan (no processes) --------------------------------------------------------------------
def test_plan_is_balanced_and_deterministic():
    rng = random.Random(0)
    blocks = [
        D.BlockRef(p, b, rng.choice([16, 64, 300, 1200]), rng.choice([9, 256, 777, 1200]))
        for p in range(30)
        for b in range(rng.randint(1, 3))
    ]
    for world in (1, 2, 3, 8):
        plan = D.plan_for(blocks, world)
        assert len(plan.owners) == len(blocks) and set(plan.owners) <= set(range(world))
        assert sorted(k for r in range(world) for k in plan.owned(r)) == sorted((b.param, b.block) for b in blocks)
        costs = [D.block_cost(b.rows, b.cols) for b in blocks]
        loads = plan.loads()
        assert sum(loads) == sum(costs)
        # largest-first greedy: no rank exceeds the mean by more than the largest block it got last
        assert max(loads) <= sum(costs) / world + max(costs)
        # same input, same plan, from a fresh computation too (the cache is not what makes it equal)
        D._plan.cache_clear()
        assert D.plan_for(list(blocks), world) == plan
    assert set(D.plan_for(blocks, 1).owners) == {0}
    # ties: equal blocks go round the ranks in order
    assert D.plan_for([(0, i, 8, 8) for i in range(6)], 3).owners == (0, 1, 2, 0, 1, 2)
    assert D.plan_for([(0, 0, 1200, 1200), (1, 0, 10, 10), (2, 0, 10, 10)], 2).owners == (0, 1, 1)
    with pytest.raises(ValueError, match="world_size"):
        D.plan_for(blocks, 0)


def test_shard_layout_pads_every_rank_to_the_same_blocks():
    # (5, 4, 3) over 2 ranks: 3 rows and 2 rows, both see a 3 x 12 matrix
    a, b = D._layout((5, 4, 3), 8, 2, 3), D._layout((5, 4, 3), 8, 2, 2)
    assert a.mshape == b.mshape == (3, 12) and a.blocks == b.blocks and len(a.blocks) == 2
    t = torch.randn(2, 4, 3)
    m = b.to_matrix(t)
    assert m.shape == (3, 12) and torch.equal(m[2], torch.zeros(12)) and torch.equal(b.from_matrix(m), t)
    # a size-1 dim 0: rank 0 holds all of it, rank 1 an empty shard with the same blocks
    full, empty = D._layout((1, 4, 6), 8, 2, 1), D._layout((1, 4, 6), 8, 2, 0)
    assert full.mshape == empty.mshape == (4, 6) and full.blocks == empty.blocks
    assert torch.equal(empty.to_matrix(torch.zeros(0, 4, 6)), torch.zeros(4, 6))
    assert empty.from_matrix(torch.ones(4, 6)).shape == (0, 4, 6)
    # one row per rank stays a matrix (a 1 x 1 left factor); rank <= 1 tensors get no blocks
    assert D._layout((2, 6), 8, 2, 1).mshape == (1, 6)
    assert D._layout((7,), 8, 2, 4).blocks == () and D._layout((7, 1), 8, 2, 4).blocks == ()
    # plain tensors: exactly the single-device blocking
    from lightning_shampoo4.optim.blocking import blocks_for

    plain = D._layout((30, 2, 5), 8, 1, None)
    assert (plain.mshape, plain.blocks) == blocks_for((30, 2, 5), 8) and plain.rows == 30


def test_mode_and_dtype_are_validated():
    with pytest.raises(ValueError, match="distributed must be one of 'auto', 'off'"):
        D.DistributedLayer("ddp")
    with pytest.raises(ValueError, match="distributed_dtype must be one of 'float32', 'bfloat16'"):
        D.DistributedLayer("auto", "float16")
    assert D.detect([torch.zeros(3, 3)], "auto") is None  # no process group: one device
    assert issubclass(D.UnsupportedStrategyError, RuntimeError) and issubclass(D.UnsupportedStrategyError, ValueError)
    from lightning_shampoo4 import UnsupportedStrategyError
    from lightning_shampoo4.strategies import UnsupportedStrategyError as FromStrategies

    assert UnsupportedStrategyError is FromStrategies is D.UnsupportedStrategyError  # one class, two places
    with pytest.raises(ValueError, match="distributed=.ddp. is not supported"):
        Shampoo4bit([torch.zeros(2, 2, requires_grad=True)], distributed="ddp")
    with pytest.raises(ValueError, match="distributed_dtype=.float16. is not supported"):
        Shampoo4bit([torch.zeros(2, 2, requires_grad=True)], distributed_dtype="float16")


# -- gather ---------------------------------------------------------------------------------
def _gather_worker(rank, world):
    shapes = [(3, 5), (7, 2), (1, 1), (4, 4), (6, 3), (2, 9)]
    refs = [D.BlockRef(i // 2, i % 2, r, c) for i, (r, c) in enumerate(shapes)]
    plan = D.plan_for(refs, world)
    fingerprint = torch.tensor([hash(plan.owners) % 2**31, *plan.owners], dtype=torch.int64)
    table = [torch.empty_like(fingerprint) for _ in range(world)]
    dist.all_gather(table, fingerprint)
    assert all(torch.equal(t, table[0]) for t in table), "the plan differs across ranks"
    g = torch.Generator().manual_seed(1)
    truth = [torch.randn(s, generator=g) * 3.7 for s in shapes]
    for dtype in (torch.float32, torch.bfloat16):
        # destinations are views into bigger matrices, as in the optimizer (non-contiguous)
        mats = [torch.full((s[0] + 1, s[1] + 2), -99.0) for s in shapes]
        dests = [m[1:, 1:-1] for m in mats]
        for d, t, o in zip(dests, truth, plan.owners):
            if o == rank:
                d.copy_(t)
        D.gather_blocks(list(zip(dests, plan.owners)), dtype)
        for m, d, t in zip(mats, dests, truth):
            assert torch.equal(d, t.to(dtype).float()), dtype  # exact in fp32; bf16-rounded on every rank
            assert (m[0] == -99).all() and (m[:, 0] == -99).all() and (m[:, -1] == -99).all()
    D.gather_blocks([], torch.float32)  # nothing to gather: no collective, no error
    # the small reductions the FSDP2 step needs (skip flags and grafting norms agree on all ranks)
    assert D.all_true(torch.tensor(True)) and not D.all_true(torch.tensor(rank == 0))
    flag = torch.tensor(float(rank == 1))
    assert D.max_across(flag).item() == 1.0 and flag.item() == float(rank == 1)  # the input is kept
    assert torch.equal(D.sum_across(torch.tensor([1.0, rank])), torch.tensor([2.0, 1.0]))


def test_gather_blocks_fp32_and_bf16_and_reductions(tmp_path):
    _spawn(_gather_worker, tmp_path)


# -- detection ------------------------------------------------------------------------------
def _detect_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _mesh(world)
    shard0 = nn.Parameter(distribute_tensor(torch.randn(5, 3), mesh, [Shard(0)]))
    repl = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Replicate()]))
    shard1 = nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    for mode in ("auto", "off"):
        assert D.detect([shard0, repl, torch.zeros(2, 2)], mode) == "fsdp2"
        refused = r"Shard\(dim=1\).*Supported: one device; DDP.*Shard\(0\) or Replicate"
        with pytest.raises(D.UnsupportedStrategyError, match=refused):
            D.detect([shard0, shard1], mode)
    assert D.is_sharded(shard0) and not D.is_sharded(repl)
    mesh2d = init_device_mesh("cpu", (1, world))
    hsdp = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh2d, [Replicate(), Shard(0)]))
    with pytest.raises(D.UnsupportedStrategyError, match="2-D device mesh"):
        D.detect([hsdp])
    # FSDP1 flat parameters, with and without use_orig_params; DeepSpeed ZeRO-3 parameters
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for orig in (False, True):
        fsdp1 = FSDP(nn.Linear(4, 6), device_id=torch.device("cpu"), use_orig_params=orig)
        with pytest.raises(D.UnsupportedStrategyError, match="FSDP1"):
            D.DistributedLayer().check(fsdp1.parameters())
    zero3 = nn.Parameter(torch.zeros(3, 3))
    zero3.ds_id = 0
    with pytest.raises(D.UnsupportedStrategyError, match="DeepSpeed"):
        D.detect([zero3])
    # the optimizer refuses them itself, at construction (also for parameter groups added later)
    from lightning_shampoo4.optim import UnsupportedStrategyError

    supported = "Supported: one device; DDP.*FSDP2"
    for params, what in ((list(fsdp1.parameters()), "FSDP1"), ([shard1], "Shard"), ([hsdp], "2-D"), ([zero3], "DeepSpeed")):
        for mode in ("auto", "off"):
            with pytest.raises(UnsupportedStrategyError, match=f"{what}.*{supported}"):
                Shampoo4bit(params, distributed=mode)
    opt = Shampoo4bit([shard0, repl])
    with pytest.raises(ValueError, match="2-D device mesh"):  # a ValueError as well as a RuntimeError
        opt.add_param_group({"params": [hsdp]})
    # plain parameters: a DDP candidate under "auto", nothing under "off"
    assert D.detect([torch.zeros(2, 2)], "auto") == "ddp" and D.detect([torch.zeros(2, 2)], "off") is None

    # local views: in-place updates of the local shard update the DTensor; layouts agree
    shard0.grad = distribute_tensor(torch.ones(5, 3), mesh, [Shard(0)])
    t, g = D.local_view(shard0)
    assert t.shape == g.shape == ((3, 3) if rank == 0 else (2, 3))
    before = shard0.full_tensor()
    with torch.no_grad():
        t.add_(1.0)
    assert torch.equal(shard0.full_tensor(), before + 1)
    shard0.grad = distribute_tensor(torch.ones(5, 3), mesh, [Replicate()])
    with pytest.raises(D.UnsupportedStrategyError, match="gradient with placements"):
        D.local_view(shard0)
    lay = D.shard_layout(shard0, 8)
    assert lay.mshape == (3, 3) and lay.rows == (3 if rank == 0 else 2)

    # the checkpoint form: moments laid out like the parameter, block state one row per rank
    st = {"exp_avg": torch.randn(t.shape), "0.L.eigvals": torch.randn(3), "step": torch.tensor(2.0), "last_root_step": 4}
    ex = D.export_state(shard0, st)
    assert tuple(ex["exp_avg"].shape) == (5, 3) and tuple(ex["0.L.eigvals"].shape) == (world, 3)
    assert tuple(ex["step"].shape) == (world,) and ex["last_root_step"] == 4
    _assert_same(D.import_state(shard0, ex), st)
    assert D.export_state(repl, st) == st and D.import_state(repl, st) == st  # replicated: as is
    # quantized moments (codes sized by the local rows, 3 and 2 here): stored dequantized, laid out like
    # the parameter, so any world size reads them; re-quantized on loading
    from lightning_shampoo4.quant import moments

    saved_min, moments.MIN_QUANTIZED_NUMEL = moments.MIN_QUANTIZED_NUMEL, 4
    try:
        codes, absmax = moments.quantize_moment(torch.randn(t.shape), moments.moment_codebook("exp_avg", 8), 8, 256)
        ex = D.export_state(shard0, {"exp_avg_codes": codes, "exp_avg_absmax": absmax, "0.L.eigvals": st["0.L.eigvals"]},
                            whole=True)
        assert set(ex) == {"exp_avg", "0.L.eigvals"} and tuple(ex["exp_avg"].shape) == (5, 3)
        assert ex["0.L.eigvals"] is st["0.L.eigvals"]  # whole blocks: plain, keyed by block, written by their owner
        back = D.import_state(shard0, ex, moment_bits=8)
        assert torch.equal(back["exp_avg_codes"], codes)
        torch.testing.assert_close(back["exp_avg_absmax"], absmax, rtol=1e-6, atol=0)
    finally:
        moments.MIN_QUANTIZED_NUMEL = saved_min
    # lossless FSDP2: the whole parameter's blocks; the gradient gathered whole, this rank's rows back
    whole = D.shard_layout(shard0, 8, whole=True)
    assert whole.whole and whole.mshape == (5, 3) and (whole.start, whole.rows) == (3 * rank, t.shape[0])
    full = torch.arange(15.0).reshape(5, 3)
    assert torch.equal(whole.to_matrix(full[whole.start : whole.start + whole.rows]), full)
    assert torch.equal(whole.from_matrix(full), full[whole.start : whole.start + whole.rows])

    # the replication check: same values -> True; all-zero grads -> undecided; different -> False
    p = torch.arange(6.0).reshape(2, 3)
    g_same = torch.ones(2, 3)
    assert D.check_replicated([p], [g_same]) is True
    assert D.check_replicated([p], [torch.zeros(2, 3)]) is None
    assert D.check_replicated([p], [torch.full((2, 3), float("nan"))]) is None
    assert D.check_replicated([p], [g_same * (rank + 1)]) is False
    assert D.check_replicated([p], [g_same if rank == 0 else None]) is False
    assert D.check_replicated([p + rank], [g_same]) is False
    shapes = [torch.zeros(2, 3)] if rank == 0 else [torch.zeros(3, 2)]
    assert D.check_replicated(shapes, [torch.ones_like(shapes[0])]) is False
    # the layer: undecided steps stay replicated; differing ranks fall back with a warning
    layer = D.DistributedLayer("auto")
    q = nn.Parameter(torch.ones(2, 3))
    q.grad = torch.zeros(2, 3)
    assert layer.resolve([q]) is None and not layer._resolved
    q.grad = torch.full((2, 3), float(rank + 1))
    with pytest.warns(UserWarning, match="differ across ranks"):
        assert layer.resolve([q]) is None
    assert layer._resolved and layer.plan([D.BlockRef(0, 0, 2, 3)]) is None and layer.owns(0, 0)
    q.grad = torch.ones(2, 3)
    ddp_layer = D.DistributedLayer("auto")
    assert ddp_layer.resolve([q]) == "ddp"
    plan = ddp_layer.plan([D.BlockRef(0, 0, 2, 3), D.BlockRef(0, 1, 2, 3)])
    assert [ddp_layer.owns(0, i) for i in range(2)] == [plan.owner(0, i) == rank for i in range(2)]


def test_detect_dtensor_layouts_and_replication(tmp_path):
    _spawn(_detect_worker, tmp_path)


# -- DDP: owners, gather, equality with one process, consolidation, resume --------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 13)  # 13 x 6: blocks of max_order 6 -> 3 x 1 blocks
        self.b = nn.Linear(13, 4, bias=False)  # 4 x 13: 1 x 3 blocks
        self.c = nn.Conv1d(2, 3, 3)  # 3 x 6 after flattening

    def forward(self, x):
        h = torch.tanh(self.a(x))
        y = self.b(h)
        z = self.c(x.view(-1, 2, 3).repeat(1, 1, 2)).flatten(1)
        return y.sum(1) + z.sum(1)


def _batches(n=6):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, generator=g)) for _ in range(n)]


def _train(model, opt, batches, rank=0, world=1):
    for x, y in batches:
        lo, hi = rank * len(x) // world, (rank + 1) * len(x) // world
        opt.zero_grad()
        nn.functional.mse_loss(model(x[lo:hi]), y[lo:hi]).backward()
        opt.step()


def _ddp_worker(rank, world, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    batches = _batches()
    torch.manual_seed(0)
    ref = _Net()
    ref_opt = MiniShampoo(ref.parameters(), distributed="off")  # one process, full batch, no communication
    _train(ref, ref_opt, batches[:4])
    torch.manual_seed(0)
    rep = _Net()
    rep_ddp = DDP(rep)
    _train(rep_ddp, MiniShampoo(rep_ddp.parameters(), distributed="off"), batches[:4], rank, world)  # replicated
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 2e-3)):
        torch.manual_seed(0)
        net = _Net()
        ddp = DDP(net)
        opt = MiniShampoo(ddp.parameters(), distributed="auto", distributed_dtype=dtype)
        _train(ddp, opt, batches[:4], rank, world)
        assert opt.layer.kind == "ddp"
        for (name, p), q, r in zip(net.named_parameters(), ref.parameters(), rep.parameters()):
            torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=name)
            if dtype == "float32":  # the owner does exactly the replicated work; fp32 travels exactly
                assert torch.equal(p, r), name
        # the same parameters on every rank, bit for bit
        flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        other = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(other, flat)
        assert torch.equal(other[0], other[1])
        # each rank keeps about half of the second-order bytes; together exactly the whole
        mine = torch.tensor([_second_order_bytes(opt)])
        both = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(both, mine)
        total = _second_order_bytes(ref_opt)
        assert sum(int(b) for b in both) == total and max(int(b) for b in both) <= 0.75 * total
    # a consolidated checkpoint holds every block, like the one-process state; resuming from it
    # (on every rank, each keeping its own blocks) continues bit for bit
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        sd = opt.state_dict()
        ref_sd = ref_opt.state_dict()
        for pid in ref_sd["state"]:
            assert sd["state"][pid].keys() == ref_sd["state"][pid].keys()
        torch.save({"model": net.state_dict(), "opt": sd}, out / "ckpt.pt")
    dist.barrier()
    _train(ddp, opt, batches[4:], rank, world)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    torch.manual_seed(1)
    net2 = _Net()
    net2.load_state_dict(ckpt["model"])
    ddp2 = DDP(net2)
    opt2 = MiniShampoo(ddp2.parameters(), distributed="auto", distributed_dtype="bfloat16")
    opt2.load_state_dict(ckpt["opt"])
    _train(ddp2, opt2, batches[4:], rank, world)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(net.parameters(), net2.parameters()):
        _assert_same(opt.state[p], opt2.state[q])


def test_ddp_owner_blocks_equal_one_process_and_resume(tmp_path):
    _spawn(_ddp_worker, tmp_path, tmp_path)


# -- FSDP2: local blocks, uneven and empty shards, DCP round trips -------------------------------
class _ShardNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)  # 5 rows over 2 ranks: 3 and 2
        self.emb = nn.Parameter(torch.randn(1, 4, 6) * 0.3)  # dim 0 of size 1: rank 1's shard is empty
        self.b = nn.Linear(4, 2)  # one row per rank: a 1 x 4 matrix

    def forward(self, x):
        h = torch.tanh(self.a(x))[:, :4] @ self.emb[0]
        return self.b(torch.tanh(h[:, :4])).sum(1)


def _sharded(seed):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    net = _ShardNet()
    fully_shard(net, mesh=_mesh(dist.get_world_size()))
    return net


def _local(opt):
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in opt._params()]


def _fsdp_worker(rank, world, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    batches = _batches()
    net = _sharded(0)
    opt = MiniShampoo(net.parameters())
    _train(net, opt, batches[:3], rank, world)
    assert opt.layer.kind == "fsdp2"
    emb_state = opt.state[net.emb]
    assert emb_state["0.L.factor"].shape == (4, 4)  # the same blocks on the rank with the empty shard
    assert net.emb.to_local().shape[0] == (1 if rank == 0 else 0)
    for p in opt._params():  # every rank holds the same block state shapes (what the DCP form needs)
        shapes = [tuple(v.shape) for k, v in opt.state[p].items() if D.block_index(k) is not None]
        gathered = [None] * world
        dist.all_gather_object(gathered, shapes)
        assert gathered[0] == gathered[1]
    dcp.save({"optim": get_optimizer_state_dict(net, opt)}, checkpoint_id=str(out / "sharded"))
    full = get_optimizer_state_dict(net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    saved = _local(opt)
    _train(net, opt, batches[3:], rank, world)
    expect_params = [p.to_local().clone() for p in net.parameters()]

    # sharded DCP: a fresh optimizer (DCP first takes a zero-gradient step to create its state)
    net2 = _sharded(0)
    opt2 = MiniShampoo(net2.parameters())
    sd = {"optim": get_optimizer_state_dict(net2, opt2)}
    dcp.load(sd, checkpoint_id=str(out / "sharded"))
    set_optimizer_state_dict(net2, opt2, sd["optim"])
    for a, b in zip(saved, _local(opt2)):
        _assert_same(a, b)
    # full state dict (what ModelParallelStrategy(save_distributed_checkpoint=False) saves on rank 0)
    if rank == 0:  # gathered on rank 0 only: plain tensors, one row per rank for the block state
        assert all(not isinstance(v, D._dtensor_cls()) for s in full["state"].values() for v in s.values())
        assert full["state"]["a.weight"]["0.L.factor"].shape == (world, 3, 3)
        assert full["state"]["a.weight"]["0.R.factor"].shape == (world, 6, 6)
    else:
        assert full == {}
    net3 = _sharded(0)
    opt3 = MiniShampoo(net3.parameters())
    set_optimizer_state_dict(
        net3, opt3, full if rank == 0 else {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    for a, b in zip(saved, _local(opt3)):
        _assert_same(a, b)
    # resumed runs continue bit for bit (the models restart from the parameters at step 3)
    for other_net, other_opt in ((net2, opt2), (net3, opt3)):
        torch.manual_seed(0)
        fresh = _sharded(0)
        ref_opt = MiniShampoo(fresh.parameters())
        _train(fresh, ref_opt, batches[:3], rank, world)
        with torch.no_grad():
            for p, q in zip(other_net.parameters(), fresh.parameters()):
                p.to_local().copy_(q.to_local())
        _train(other_net, other_opt, batches[3:], rank, world)
        for p, e in zip(other_net.parameters(), expect_params):
            assert torch.equal(p.to_local(), e)

    # why the DCP form exists: DCP keeps one copy of a plain tensor key for all ranks, so ...
    class Plain(MiniShampoo):
        def state_dict(self):
            sd = torch.optim.Optimizer.state_dict(self)
            if self.plain_moments:
                return sd
            params = self._params()
            for pid, s in sd["state"].items():  # only the moments in the DCP form
                sd["state"][pid] = {**s, **D.export_state(params[pid], {"momentum_buffer": s["momentum_buffer"]})}
            return sd

    def plain_round_trip(plain_moments, name):
        net = _sharded(0)
        opt = Plain(net.parameters())
        opt.plain_moments = plain_moments
        _train(net, opt, batches[:1], rank, world)
        dcp.save({"optim": get_optimizer_state_dict(net, opt)}, checkpoint_id=str(out / name))
        right = opt.state[net.a.weight]["0.R.factor"].clone()
        net2 = _sharded(0)
        opt2 = Plain(net2.parameters())
        opt2.plain_moments = plain_moments
        sd = {"optim": get_optimizer_state_dict(net2, opt2)}
        dcp.load(sd, checkpoint_id=str(out / name))
        set_optimizer_state_dict(net2, opt2, sd["optim"])
        return right, opt2.state[net2.a.weight]["0.R.factor"].clone()

    # ... state whose shape differs by rank (moments of uneven shards) does not load back at all
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException) as err:
        plain_round_trip(True, "plain_all")
    assert all("Size mismatch" in str(e) for e in err.value.failures.values())
    # ... and same-shaped per-rank state loads back as one rank's copy on every rank
    right, loaded = plain_round_trip(False, "plain_blocks")
    theirs, back = [torch.empty_like(right) for _ in range(world)], [torch.empty_like(right) for _ in range(world)]
    dist.all_gather(theirs, right)
    dist.all_gather(back, loaded)
    assert not torch.equal(theirs[0], theirs[1])  # each rank's right factor is its own rows' statistic
    assert torch.equal(back[0], back[1]) and any(torch.equal(back[0], t) for t in theirs)  # one rank lost its own


def test_fsdp2_local_blocks_uneven_shards_and_dcp_resume(tmp_path):
    _spawn(_fsdp_worker, tmp_path, tmp_path, timeout=90)


def _shampoo_fsdp_worker(rank, world, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    # per-shard blocks (distributed="off"); "auto" preconditions whole blocks (tests/test_resharding.py)
    kw = dict(lr=0.01, min_quant_numel=4, max_order=4, stat_interval=1, root_interval=2, distributed="off")
    batches = _batches()

    def fresh():
        net = _sharded(0)
        return net, Shampoo4bit(net.parameters(), **kw)

    net, opt = fresh()
    _train(net, opt, batches[:3], rank, world)
    assert opt.layout == "fsdp2" and opt.counters["root_updates"] > 0
    assert all(torch.isfinite(p.to_local()).all() for p in net.parameters())
    # blocks of the local rows padded to ceil(n / 2): the same shapes on every rank, even the empty shard's
    assert opt.state[net.emb]["0.L.chol_diag"].shape == (4,) and net.emb.to_local().shape[0] == 1 - rank
    shapes = [(k, tuple(v.shape)) for p in opt._params() for k, v in opt.state[p].items()
              if torch.is_tensor(v) and D.block_index(k) is not None]
    gathered = [None] * world
    dist.all_gather_object(gathered, shapes)
    assert gathered[0] == gathered[1]
    assert {(i, side) for p, i, side, _ in opt.factors() if p is net.a.weight} == {(0, "L"), (0, "R"), (1, "L"), (1, "R")}
    dcp.save({"optim": get_optimizer_state_dict(net, opt)}, checkpoint_id=str(out / "shampoo"))
    full = get_optimizer_state_dict(net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    saved = _local(opt)
    params = [p.to_local().clone() for p in net.parameters()]
    _train(net, opt, batches[3:], rank, world)
    expect = [p.to_local().clone() for p in net.parameters()]

    def nan_on_rank_1():  # a NaN in rank 1's shard only: every rank skips the step
        x, y = batches[0]
        opt.zero_grad()
        nn.functional.mse_loss(net(x[rank::world]), y[rank::world]).backward()
        if rank == 1:
            net.a.weight.grad.to_local()[0, 0] = float("nan")
        opt.step()
        assert all(torch.equal(p.to_local(), e) for p, e in zip(net.parameters(), expect))

    nan_on_rank_1()  # a statistics step: the host check, combined over the ranks
    for group in opt.param_groups:
        group["stat_interval"] = group["root_interval"] = 64
    nan_on_rank_1()  # a steady step: the device-side flag, maximum over the ranks
    assert opt.counters["skipped_nonfinite"] == 2 and opt.counters["steps"] == 8
    for how in ("sharded", "full"):
        net2, opt2 = fresh()
        if how == "sharded":  # DCP first takes a zero-gradient step on the fresh optimizer
            sd = {"optim": get_optimizer_state_dict(net2, opt2)}
            dcp.load(sd, checkpoint_id=str(out / "shampoo"))
            set_optimizer_state_dict(net2, opt2, sd["optim"])
        else:  # gathered on rank 0 (one row per rank for the block state), broadcast back
            set_optimizer_state_dict(net2, opt2, full if rank == 0 else {},
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for a, b in zip(saved, _local(opt2)):
            _assert_same(a, b)
        assert opt2.counters["steps"] == 3
        with torch.no_grad():
            for p, q in zip(net2.parameters(), params):
                p.to_local().copy_(q)
        _train(net2, opt2, batches[3:], rank, world)
        for p, q in zip(net.parameters(), net2.parameters()):
            assert torch.equal(p.to_local(), q.to_local()), how


def test_shampoo4bit_fsdp2_uneven_and_empty_shards_dcp_resume(tmp_path):
    """Shampoo4bit on FSDP2 shards of 5, 2 and 1 rows (rank 1's shard of the last is empty): the
    same padded blocks on every rank, finite training, and sharded and full DCP state dicts that
    resume bit for bit (after DCP's zero-gradient step on the fresh optimizer)."""
    _spawn(_shampoo_fsdp_worker, tmp_path, tmp_path)


# -- Lightning: ModelParallelStrategy + fully_shard on CPU gloo -------------------------------------
def _lightning_fit(optimizer, out, max_steps, ckpt_path=None, save_every=None, sharded=True):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(12, 15), nn.Tanh(), nn.Linear(15, 3))

        def configure_model(self):
            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net[0], mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            if optimizer == "adamw":
                return torch.optim.AdamW(self.parameters(), lr=0.01)
            if optimizer == "shampoo4bit":
                return Shampoo4bit(self.parameters(), lr=0.01, min_quant_numel=16, stat_interval=1, root_interval=2)
            return MiniShampoo(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 12, generator=g)  # 3 steps an epoch per rank: the checkpoint at step 3 ends epoch 0
    loader = DataLoader(TensorDataset(x, x[:, :3].argmax(1)), batch_size=8)
    torch.manual_seed(0)
    model = Net()
    callbacks = [ModelCheckpoint(out, every_n_train_steps=save_every, save_top_k=-1)] if save_every else []
    if optimizer == "shampoo4bit":
        from lightning_shampoo4.callbacks import QuantizedStateMonitor

        callbacks.append(QuantizedStateMonitor(every_n_steps=2))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(save_every), callbacks=callbacks,
        strategy=ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=sharded
        ),
    )
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return trainer, {k: v.to_local().clone() for k, v in model.state_dict().items()}


def _lightning_worker(rank, world, out, optimizer, sharded, port):
    # launched here (as torchrun would), so Lightning starts no script processes of its own
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), NODE_RANK="0"
    )
    trainer, full = _lightning_fit(optimizer, out / optimizer, 5, save_every=3, sharded=sharded)
    if optimizer == "shampoo4bit":
        _check_fsdp2_shampoo(trainer, full)
    state = trainer.optimizers[0].state.values()
    kinds = sorted({type(v).__name__ for s in state for v in s.values()})
    placements = {k: str(v.placements) for k, v in trainer.lightning_module.state_dict().items()}
    ckpt = out / optimizer / "epoch=0-step=3.ckpt"
    trainer, resumed = _lightning_fit(optimizer, out / f"{optimizer}_resumed", 5, ckpt_path=ckpt, sharded=sharded)
    assert type(trainer.strategy).__name__ == "ModelParallelStrategy" and trainer.world_size == world
    assert set(placements.values()) == {"(Shard(dim=0),)"}
    for name, value in full.items():
        assert torch.equal(value, resumed[name]), name
    if optimizer == "adamw":
        assert kinds == ["DTensor", "Tensor"]  # moments are DTensors like the parameters
    elif optimizer == "mini":
        assert "DTensor" not in kinds  # the optimizer keeps local tensors; its state_dict exports them


def _check_fsdp2_shampoo(trainer, params):
    """Shampoo4bit after 5 FSDP2 steps (lossless, the default): statistics and roots updated,
    finite parameters, and the whole parameters' blocks as on one device, one owner each: this
    rank keeps one of the two blocks, and the monitor reports this rank's state."""
    opt, module = trainer.optimizers[0], trainer.lightning_module
    metrics = next(c for c in trainer.callbacks if type(c).__name__ == "QuantizedStateMonitor").last_metrics
    assert metrics["shampoo/steps"] == 4 and metrics["shampoo/root_updates"] > 0
    assert metrics["shampoo/factors"] == 2 and math.isfinite(metrics["shampoo/root_nre"])
    assert opt.layout == "fsdp2" and opt.counters["stat_updates"] > 0 and opt.counters["root_updates"] >= 4
    assert all(torch.isfinite(v).all() for v in params.values())
    unsharded = nn.Sequential(nn.Linear(12, 15), nn.Tanh(), nn.Linear(15, 3))
    ref = Shampoo4bit(unsharded.parameters(), min_quant_numel=16)
    ref.init_state()
    names = {id(p): n.removeprefix("net.") for n, p in module.named_parameters()}
    ref_names = {id(p): n for n, p in unsharded.named_parameters()}
    orders = {(names[id(p)], side): f.order for p, _, side, f in opt.factors()}
    ref_orders = {(ref_names[id(p)], side): f.order for p, _, side, f in ref.factors()}
    assert len(orders) == 2 and all(ref_orders[k] == v for k, v in orders.items())
    mine = sorted({name for name, _ in orders})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    assert sorted(n for part in gathered for n in part) == sorted({n for n, _ in ref_orders})  # one owner each
    assert opt.memory_report()["second_order"] < ref.memory_report()["second_order"]
    assert metrics["shampoo/bytes/second_order"] == opt.memory_report()["second_order"]


@pytest.mark.parametrize(
    "optimizer, sharded",
    [("adamw", True), ("mini", True), ("mini", False), ("shampoo4bit", True), ("shampoo4bit", False)],
    ids=["adamw", "mini", "mini-full-checkpoint", "shampoo4bit", "shampoo4bit-full-checkpoint"],
)
def test_lightning_model_parallel_fsdp2_smoke(tmp_path, optimizer, sharded):
    """ModelParallelStrategy on CPU / gloo with fully_shard: train 5 steps saving a checkpoint at
    step 3 (distributed: a folder of .distcp files; or full: one file written by rank 0), resume
    from it: the resumed run ends bit-identical. ``mini``: an optimizer keeping local-shard state
    through export_state / import_state."""
    pytest.importorskip("lightning")
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    port = find_free_network_port()
    _spawn(_lightning_worker, tmp_path, tmp_path, optimizer, sharded, port, init=False, timeout=90)
    ckpt = tmp_path / optimizer / "epoch=0-step=3.ckpt"
    if sharded:
        assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    else:
        assert ckpt.is_file() and torch.load(ckpt, weights_only=True)["optimizer_states"]


# -- the optimizer itself --------------------------------------------------------------------------
def _all_same(t):
    """``t`` is bit-identical on every rank."""
    both = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(both, t.contiguous())
    return all(torch.equal(both[0], b) for b in both)


def _shampoo_ddp_worker(rank, world, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lightning_shampoo4.optim import CheckpointMismatchError

    batches = _batches()
    kw = dict(lr=0.01, min_quant_numel=16, max_order=6, stat_interval=1, root_interval=2)

    def run(mode, dtype="float32", steps=batches):
        torch.manual_seed(0)
        net = _Net()
        ddp = DDP(net)
        opt = Shampoo4bit(ddp.parameters(), distributed=mode, distributed_dtype=dtype, **kw)
        _train(ddp, opt, steps, rank, world)
        return net, ddp, opt

    ref, _, ref_opt = run("off")  # every rank computes every block
    assert ref_opt.layout is None
    for dtype, exact in (("float32", True), ("bfloat16", False)):
        net, _, opt = run("auto", dtype)
        owner_only = ("retried_updates", "failed_updates")  # seen by the block's owner alone
        assert opt.layout == "ddp" and opt.counters == {
            **ref_opt.counters, **{k: opt.counters[k] for k in (*TIMERS, *owner_only)}}
        summed = torch.tensor([opt.counters[k] for k in owner_only])
        dist.all_reduce(summed)
        assert summed.tolist() == [ref_opt.counters[k] for k in owner_only] or not exact, (dtype, summed)
        for (name, p), q in zip(net.named_parameters(), ref.parameters()):
            assert torch.equal(p, q) if exact else (p - q).abs().max() < 2e-2, name  # fp32 gather: bit for bit
            assert _all_same(p.detach()), name
        mine, total = opt.memory_report()["second_order"], ref_opt.memory_report()["second_order"]
        both = torch.tensor([mine])
        dist.all_reduce(both)
        assert mine <= 0.65 * total and both.item() == total  # each block on exactly one rank
        owned = {(id(p), i) for p, i, _, _ in opt.factors()}  # this rank's blocks only
        assert 0 < len(owned) < len({(id(p), i) for p, i, _, _ in ref_opt.factors()})

    # resume: a consolidated state (what Lightning saves) loads anywhere; a rank-local one on its own rank
    net, ddp, opt = run("auto", steps=batches[:3])
    local = copy.deepcopy(opt.state_dict())  # torch's state dicts hold the live tensors
    assert local["rank_local"] == {"rank": rank, "world_size": world}
    opt.consolidate_state_dict(to=0)
    full = copy.deepcopy(opt.state_dict()) if rank == 0 else None
    saved_params = [p.detach().clone() for p in net.parameters()]
    _train(ddp, opt, batches[3:], rank, world)
    if rank == 0:  # every block, the keys one process has
        ref_keys = {pid: set(s) for pid, s in run_one_process(kw, batches[:3]).items()}
        assert {pid: set(s) for pid, s in full["state"].items()} == ref_keys and "rank_local" not in full
    full = [full]
    dist.broadcast_object_list(full, src=0)
    for state, label in ((full[0], "consolidated"), (local, "rank-local")):
        torch.manual_seed(0)
        net2 = _Net()
        with torch.no_grad():
            for p, q in zip(net2.parameters(), saved_params):
                p.copy_(q)
        ddp2 = DDP(net2)
        opt2 = Shampoo4bit(ddp2.parameters(), distributed="auto", **kw)
        opt2.load_state_dict(state)
        _train(ddp2, opt2, batches[3:], rank, world)
        for p, q in zip(net.parameters(), net2.parameters()):
            assert torch.equal(p, q), label
        assert opt2.memory_report()["second_order"] == opt.memory_report()["second_order"], label
    other = Shampoo4bit(_Net().parameters(), **kw)  # a rank-local state on another rank is refused
    local["rank_local"] = {"rank": 1 - rank, "world_size": world}
    with pytest.raises(CheckpointMismatchError, match="only the blocks of rank"):
        other.load_state_dict(local)
    local["rank_local"] = {"rank": rank, "world_size": world}  # whole blocks may be absent, not parts of one
    state = next(s for s in local["state"].values() if any(D.block_index(k) is not None for k in s))
    del state[next(k for k in state if D.block_index(k) is not None)]
    with pytest.raises(CheckpointMismatchError, match="missing"):
        other.load_state_dict(local)

    # "auto" never shards when the gradients differ across ranks (no DDP: each rank its own data)
    torch.manual_seed(0)
    solo = _Net()
    solo_opt = Shampoo4bit(solo.parameters(), distributed="auto", **kw)
    with pytest.warns(UserWarning, match="differ across ranks"):
        _train(solo, solo_opt, batches[rank::2][:2])
    assert solo_opt.layout is None and len(list(solo_opt.factors())) == len(list(ref_opt.factors()))


def run_one_process(kw, batches):
    torch.manual_seed(0)
    net = _Net()
    opt = Shampoo4bit(net.parameters(), distributed="off", **kw)
    _train(net, opt, batches)
    return opt.state_dict()["state"]


def test_shampoo4bit_ddp_sharded_equals_off(tmp_path):
    """Shampoo4bit under DDP (no Lightning): the sharded step equals "off" bit for bit with an
    fp32 gather (bf16: close), ranks stay identical, each keeps its own blocks; consolidated and
    rank-local states resume exactly; ranks with different gradients are not sharded."""
    _spawn(_shampoo_ddp_worker, tmp_path, tmp_path)


# -- Lightning: DDPStrategy on CPU gloo ---------------------------------------------------------------
def _lightning_ddp_fit(mode, out, ckpt_path=None, save_every=None):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_shampoo4.callbacks import QuantizedStateMonitor

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _Net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return Shampoo4bit(self.parameters(), lr=0.01, min_quant_numel=16, max_order=6, stat_interval=1,
                               root_interval=2, distributed=mode)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=g)  # 3 steps an epoch per rank: the checkpoint at step 3 ends epoch 0
    loader = DataLoader(TensorDataset(x, x.sum(1)), batch_size=8)
    torch.manual_seed(0)
    model = Net()
    monitor = QuantizedStateMonitor(every_n_steps=2)
    callbacks = [monitor] + ([ModelCheckpoint(out, every_n_train_steps=save_every, save_top_k=-1)] if save_every else [])
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(save_every), callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    opt = trainer.optimizers[0]
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return params, opt, monitor.last_metrics


def _lightning_ddp_worker(rank, world, out, port):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), NODE_RANK="0"
    )
    off, off_opt, off_metrics = _lightning_ddp_fit("off", out / "off")
    auto, opt, metrics = _lightning_ddp_fit("auto", out / "auto", save_every=3)
    resumed, _, _ = _lightning_ddp_fit("auto", out / "resumed", ckpt_path=out / "auto" / "epoch=0-step=3.ckpt")
    assert off_opt.layout is None and opt.layout == "ddp"
    assert opt.counters["root_updates"] > 0 and opt.counters["steps"] == 6
    for name in off:
        assert (auto[name] - off[name]).abs().max() < 1e-5, name
        assert torch.equal(resumed[name], auto[name]), name
        assert _all_same(auto[name]), name
    mine, total = opt.memory_report()["second_order"], off_opt.memory_report()["second_order"]
    assert mine <= 0.65 * total
    assert metrics["shampoo/bytes/second_order"] == mine  # the monitor reports this rank's blocks
    assert metrics["shampoo/factors"] < off_metrics["shampoo/factors"]
    torch.save({"bytes": mine, "total": total}, out / f"rank{rank}.pt")


def test_lightning_ddp_sharded_equals_off_and_resumes(tmp_path):
    """Lightning DDPStrategy, 2 CPU ranks: distributed="auto" ends with the parameters of "off",
    identical on both ranks, each rank holding about half the second-order bytes; its checkpoint
    (consolidated by Lightning on rank 0) holds every block and resumes bit for bit."""
    pytest.importorskip("lightning")
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    _spawn(_lightning_ddp_worker, tmp_path, tmp_path, find_free_network_port(), init=False, timeout=90)
    ckpt = torch.load(tmp_path / "auto" / "epoch=0-step=3.ckpt", weights_only=True)["optimizer_states"][0]
    assert "rank_local" not in ckpt
    blocks = {(pid, D.block_index(k)) for pid, s in ckpt["state"].items() for k in s if D.block_index(k) is not None}
    assert len(blocks) == 3 + 3 + 1  # a: 3 x 1 blocks, b: 1 x 3, c: 1: all of them, from both ranks
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert sum(r["bytes"] for r in per_rank) == per_rank[0]["total"]  # each block on exactly one rank


# -- the benchmark ----------------------------------------------------------------------------------
def test_distributed_benchmark_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_distributed", ROOT / "benchmarks" / "distributed.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec.loader.exec_module(module)
    module.main(["--quick", "--out", str(tmp_path)])
    import json

    data = json.loads((tmp_path / "distributed.json").read_text())
    assert data["benchmark"] == "distributed" and (tmp_path / "distributed.png").is_file()
    rows = {(r["world_size"], r["mode"]): r for r in data["runs"] if r["optimizer"] == "shampoo"}
    assert rows.keys() == {(1, "single"), (2, "ddp"), (2, "fsdp2")}
    soap = {(r["world_size"], r["mode"]): r for r in data["runs"] if r["optimizer"] == "soap"}
    assert soap.keys() == rows.keys()
    for mode in ("ddp", "fsdp2"):  # SOAP4bit's blocks: each on one rank, the same under DDP and lossless FSDP2
        assert soap[(2, mode)]["layout"] == [mode, mode]
        assert sum(soap[(2, mode)]["second_order_bytes_per_rank"]) == soap[(1, "single")]["second_order_bytes_per_rank"][0]
    assert soap[(2, "ddp")]["second_order_bytes_per_rank"] == soap[(2, "fsdp2")]["second_order_bytes_per_rank"]
    assert all(len(r["second_order_bytes_per_rank"]) == r["world_size"] for r in rows.values())
    ddp, fsdp2 = rows[(2, "ddp")], rows[(2, "fsdp2")]
    assert ddp["layout"] == ["ddp", "ddp"] and fsdp2["layout"] == ["fsdp2", "fsdp2"]
    # the same whole blocks and owners: the same bytes per rank, about half of one device's
    assert ddp["second_order_bytes_per_rank"] == fsdp2["second_order_bytes_per_rank"]
    assert sum(ddp["second_order_bytes_per_rank"]) == rows[(1, "single")]["second_order_bytes_per_rank"][0]
    assert ddp["ratio_largest_rank_vs_single"] < 0.6
    assert ddp["max_abs_diff_vs_single"] < 1e-6 and fsdp2["max_abs_diff_vs_single"] < 1e-6
    assert min(ddp["comm_bytes_per_step_per_rank"]) > 0 and rows[(1, "single")]["comm_bytes_per_step_per_rank"] == [0]
