"""Per-rank second-order state and optimizer step time of ``Shampoo4bit`` under DDP, at world
sizes 1 and 2: ``distributed="off"`` (every rank computes every block) against ``"auto"`` (each
rank owns some blocks and the preconditioned blocks are all-gathered).

Method
------
* One process per rank (CPU + gloo; one GPU per rank + NCCL when there are enough GPUs), a
  ``DistributedDataParallel`` MLP, the same random batches on every run (each rank its slice of
  the global batch), ``Shampoo4bit(stat_interval=1, root_interval=--root-interval)``.
* Warm-up: one root interval (preconditioning starts at the first root update); measured: the
  next ``--cycles`` root intervals, timing ``optimizer.step()`` alone (CUDA synchronized), so the
  mean holds the amortized statistics, root and preconditioning work plus the all-gather.
* Bytes: ``memory_report()["second_order"]`` on every rank after the run. ``projected`` is what
  the block plan (``optim.distributed.plan_for``) assigns to each rank, computed from the
  ``"off"`` run's per-block bytes: the figure ``"auto"`` should reach.
* ``gather``: the all-gather alone for this model's blocks (fp32 and bf16), median of repeats.

Until ``Shampoo4bit`` takes ``distributed=``, only ``"off"`` runs and the projection are
measured, and the result says so.
"""

from __future__ import annotations

import inspect
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, setup_run, table, write_result

from lightning_shampoo4 import Shampoo4bit
from lightning_shampoo4.optim import distributed as D

NAME = "distributed"
WIDTHS = "512,1536,1536,512,10"
INTEGRATED = "distributed" in inspect.signature(Shampoo4bit.__init__).parameters
NOT_INTEGRATED = (
    "Shampoo4bit does not take distributed= yet (step integration pending): only the replicated "
    "baseline ('off': every rank computes every block) and the plan's projection were measured"
)


def _model(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1])


def _block_bytes(opt: Shampoo4bit) -> list[int]:
    """Second-order bytes of every block, in the order of the optimizer's parameters and blocks."""
    from lightning_shampoo4.optim.memory import SECOND_ORDER, kind_of

    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            n_blocks = len(D.shard_layout(p, group["max_order"]).blocks) if group["precondition"] else 0
            for i in range(n_blocks):
                out.append(sum(
                    v.numel() * v.element_size() for k, v in state.items()
                    if torch.is_tensor(v) and D.block_index(k) == i and kind_of(k) in SECOND_ORDER
                ))
    return out


def _refs(opt: Shampoo4bit) -> list[D.BlockRef]:
    refs, pid = [], 0
    for group in opt.param_groups:
        for p in group["params"]:
            if group["precondition"]:
                for i, b in enumerate(D.shard_layout(p, group["max_order"]).blocks):
                    refs.append(D.BlockRef(pid, i, b.rows, b.cols))
            pid += 1
    return refs


def _worker(rank: int, world: int, cfg: dict[str, Any]) -> None:
    torch.set_num_threads(cfg["threads"])
    cuda = cfg["backend"] == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(cfg["backend"], init_method=f"file://{cfg['store']}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = _model(cfg["widths"]).to(device)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None) if world > 1 else model
        kwargs = dict(lr=1e-3, stat_interval=1, root_interval=cfg["root_interval"], max_order=cfg["max_order"])
        if INTEGRATED:
            kwargs["distributed"] = cfg["mode"]
        opt = Shampoo4bit(ddp.parameters(), **kwargs)
        g = torch.Generator().manual_seed(1)
        batch, steps = cfg["batch"], cfg["root_interval"] * (1 + cfg["cycles"])
        times = []
        for step in range(steps):
            x = torch.randn(batch, cfg["widths"][0], generator=g).to(device)
            y = torch.randint(0, cfg["widths"][-1], (batch,), generator=g).to(device)
            lo, hi = rank * batch // world, (rank + 1) * batch // world
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(ddp(x[lo:hi]), y[lo:hi]).backward()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            if step >= cfg["root_interval"]:
                times.append(time.perf_counter() - t0)
        rec: dict[str, Any] = {
            "rank": rank,
            "second_order_bytes": opt.memory_report()["second_order"],
            "step_time_mean_s": statistics.fmean(times),
            "step_time_median_s": statistics.median(times),
        }
        if world > 1 and cfg["mode"] == "off":  # the plan's projection from this run's per-block bytes
            per_block = _block_bytes(opt)
            plan = D.plan_for(_refs(opt), world)
            projected = [0] * world
            for nbytes, owner in zip(per_block, plan.owners):
                projected[owner] += nbytes
            rec["projected_second_order_bytes_per_rank"] = projected
            rec["gather"] = _time_gather(opt, plan, device, cfg["repeats"])
        torch.save(rec, Path(cfg["result_dir"]) / f"{cfg['mode']}_w{world}_r{rank}.pt")
    finally:
        dist.destroy_process_group()


def _time_gather(opt: Shampoo4bit, plan: D.Plan, device: torch.device, repeats: int) -> dict[str, Any]:
    """The all-gather of this model's preconditioned blocks alone."""
    dests = [(torch.zeros(b.rows, b.cols, device=device), o) for b, o in zip(plan.blocks, plan.owners)]
    out = {"numel": sum(d.numel() for d, _ in dests)}
    for name, dtype in D.COMM_DTYPES.items():
        ts = []
        for _ in range(repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            D.gather_blocks(dests, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        out[f"{name}_median_s"] = statistics.median(ts[1:])
    return out


def _launch(world: int, mode: str, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        run_cfg = {**cfg, "mode": mode, "store": os.path.join(tmp, "store"), "result_dir": tmp}
        # fork starts in milliseconds (and works when this module was loaded by path); CUDA must not be forked
        method = "fork" if cfg["backend"] == "gloo" and "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(_worker, args=(world, run_cfg), nprocs=world, start_method=method)
        return [torch.load(Path(tmp) / f"{mode}_w{world}_r{r}.pt", weights_only=True) for r in range(world)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.split("\n\n")[0], NAME)
    parser.add_argument("--world-sizes", default="1,2", help="comma-separated world sizes")
    parser.add_argument(
        "--widths", default=None, help=f"MLP widths, comma-separated (default {WIDTHS}; 32,48,40,10 with --quick)"
    )
    parser.add_argument("--max-order", type=int, default=None, help="Shampoo max_order (default 1200; 16 with --quick)")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument(
        "--root-interval", type=int, default=None, help="steps between root updates (default 10; 2 with --quick)"
    )
    parser.add_argument("--cycles", type=int, default=None, help="measured root intervals (default 3; 1 with --quick)")
    parser.add_argument(
        "--backend", choices=("auto", "gloo", "nccl"), default="auto", help="auto: nccl with enough GPUs, else gloo"
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    worlds = [int(w) for w in args.world_sizes.split(",")]
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= max(worlds) else "gloo"
    run = setup_run(args, "cuda" if backend == "nccl" else "cpu")
    cfg = {
        "threads": max(1, args.threads // max(worlds)),
        "backend": backend,
        "widths": [int(w) for w in (args.widths or ("32,48,40,10" if args.quick else WIDTHS)).split(",")],
        "max_order": args.max_order or (16 if args.quick else 1200),
        "batch": args.batch,
        "root_interval": args.root_interval or (2 if args.quick else 10),
        "cycles": args.cycles or (1 if args.quick else 3),
        "repeats": 3 if args.quick else 20,
    }
    if not INTEGRATED:
        print(f"[distributed] NOTE: {NOT_INTEGRATED}", flush=True)
    runs = []
    for world in worlds:
        for mode in ("off", "auto") if world > 1 and INTEGRATED else ("off",):
            t0 = time.perf_counter()
            recs = _launch(world, mode, cfg)
            rec: dict[str, Any] = {
                "world_size": world,
                "mode": mode,
                "backend": backend,
                "second_order_bytes_per_rank": [r["second_order_bytes"] for r in recs],
                "step_time_mean_s_per_rank": [r["step_time_mean_s"] for r in recs],
                "step_time_median_s_per_rank": [r["step_time_median_s"] for r in recs],
            }
            if "projected_second_order_bytes_per_rank" in recs[0]:
                rec["projected_second_order_bytes_per_rank"] = recs[0]["projected_second_order_bytes_per_rank"]
                rec["gather"] = recs[0]["gather"]
            runs.append(rec)
            print(f"[distributed] world {world} {mode} in {time.perf_counter() - t0:.1f}s", flush=True)

    rows = []
    for r in runs:
        rows.append([r["world_size"], r["mode"], r["backend"],
                     " / ".join(f"{b:,}" for b in r["second_order_bytes_per_rank"]),
                     " / ".join(f"{b:,}" for b in r.get("projected_second_order_bytes_per_rank", [])) or "-",
                     " / ".join(f"{t * 1e3:.2f}" for t in r["step_time_mean_s_per_rank"])])
    print(table(["world", "distributed", "backend", "second-order bytes per rank", "projected by the plan",
                 "step ms per rank (mean)"], rows))
    for r in runs:
        if "gather" in r:
            g = r["gather"]
            print(f"all-gather of {g['numel']:,} preconditioned elements at world {r['world_size']}: "
                  f"fp32 {g['float32_median_s'] * 1e3:.3f} ms, bf16 {g['bfloat16_median_s'] * 1e3:.3f} ms (median)")
    payload = {
        "settings": dict(cfg),
        "integrated": INTEGRATED,
        "note": "" if INTEGRATED else NOT_INTEGRATED,
        "runs": runs,
    }
    path = write_result(args.out, NAME, payload, run, argv)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
