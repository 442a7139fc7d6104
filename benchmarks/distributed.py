"""Per-rank second-order state and optimizer step time of ``Shampoo4bit`` under DDP, at world
sizes 1 and 2: ``distributed="off"`` (every rank computes every block) against ``"auto"`` (each
rank owns some blocks and the preconditioned blocks are all-gathered; at world size 1 "auto"
finds no process group to shard over and runs the single-device step).

Method
------
* One process per rank (CPU + gloo; one GPU per rank + NCCL when there are enough GPUs), a
  ``DistributedDataParallel`` MLP, the same random batches on every run (each rank its slice of
  the global batch), ``Shampoo4bit(stat_interval=--stat-interval, root_interval=--root-interval)``.
* Warm-up: one root interval (preconditioning starts at the first root update); measured: the
  next ``--cycles`` root intervals, timing ``optimizer.step()`` alone (CUDA synchronized), so the
  mean holds the amortized statistics, root and preconditioning work plus the all-gather;
  ``steady``: the median of the steps without a statistics or root update (preconditioning,
  all-gather, grafting and the base update only).
* Bytes: ``memory_report()["second_order"]`` on every rank after the run. ``projected`` is what
  the block plan (``optim.distributed.plan_for``) assigns to each rank, computed from the
  ``"off"`` run's per-block bytes: the figure ``"auto"`` should reach.
* ``gather``: the all-gather alone for this model's blocks (fp32 and bf16), median of repeats.
* ``max_abs_diff_vs_off``: the largest difference between the final parameters of an ``"auto"``
  run and the ``"off"`` run of the same world size (0.0: bit-identical, as the fp32 gather is
  meant to be); ``layout``: what ``Shampoo4bit.layout`` resolved to.
"""

from __future__ import annotations

import gc
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
WIDTHS = "256,1024,1024,256,10"  # 9 blocks of up to 512 x 512 at the default max_order: minutes on 2 CPU cores
INTEGRATED = "distributed" in inspect.signature(Shampoo4bit.__init__).parameters
MODES = ("off", "auto")


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
        _measure(rank, world, cfg, device)
    finally:
        _shutdown()


def _shutdown() -> None:
    """Destroy the process group once its last user is gone. gloo's worker thread needs the GIL
    to drop finished collectives; a group destroyed while it still holds one (e.g. by the last
    DDP reference dying with the GIL held) deadlocks, so collect first and let the thread run."""
    gc.collect()
    time.sleep(0.05)
    dist.destroy_process_group()


def _measure(rank: int, world: int, cfg: dict[str, Any], device: torch.device) -> None:
    """One run on this rank: train, time ``optimizer.step()``, save the rank's record."""
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = _model(cfg["widths"]).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None) if world > 1 else model
    kwargs = dict(
        lr=1e-3, stat_interval=cfg["stat_interval"], root_interval=cfg["root_interval"], max_order=cfg["max_order"]
    )
    opt = Shampoo4bit(ddp.parameters(), distributed=cfg["mode"], **kwargs)
    g = torch.Generator().manual_seed(1)
    batch, steps = cfg["batch"], cfg["root_interval"] * (1 + cfg["cycles"])
    times, steady = [], []
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
            if (step + 1) % cfg["stat_interval"]:  # the optimizer's clock is step + 1
                steady.append(times[-1])
    rec: dict[str, Any] = {
        "rank": rank,
        "layout": opt.layout,
        "second_order_bytes": opt.memory_report()["second_order"],
        "step_time_mean_s": statistics.fmean(times),
        "step_time_median_s": statistics.median(times),
        "steady_step_time_median_s": statistics.median(steady) if steady else None,
    }
    if rank == 0:
        rec["params"] = torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])
    if world > 1 and cfg["mode"] == "off":  # the plan's projection from this run's per-block bytes
        per_block = _block_bytes(opt)
        plan = D.plan_for(_refs(opt), world)
        projected = [0] * world
        for nbytes, owner in zip(per_block, plan.owners):
            projected[owner] += nbytes
        rec["projected_second_order_bytes_per_rank"] = projected
        rec["gather"] = _time_gather(opt, plan, device, cfg["repeats"])
    torch.save(rec, Path(cfg["result_dir"]) / f"{cfg['mode']}_w{world}_r{rank}.pt")


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
    parser.add_argument("--max-order", type=int, default=None, help="Shampoo max_order (default 512; 16 with --quick)")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument(
        "--root-interval", type=int, default=None, help="steps between root updates (default 10; 2 with --quick)"
    )
    parser.add_argument(
        "--stat-interval", type=int, default=None, help="steps between statistics updates (default 5; 1 with --quick)"
    )
    parser.add_argument("--cycles", type=int, default=None, help="measured root intervals (default 2; 1 with --quick)")
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
        "max_order": args.max_order or (16 if args.quick else 512),
        "batch": args.batch,
        "root_interval": args.root_interval or (2 if args.quick else 10),
        "stat_interval": args.stat_interval or (1 if args.quick else 5),
        "cycles": args.cycles or (1 if args.quick else 2),
        "repeats": 3 if args.quick else 20,
    }
    runs = []
    for world in worlds:
        final: dict[str, torch.Tensor] = {}
        for mode in MODES:
            t0 = time.perf_counter()
            recs = _launch(world, mode, cfg)
            final[mode] = recs[0].pop("params")
            rec: dict[str, Any] = {
                "world_size": world,
                "mode": mode,
                "backend": backend,
                "layout": [r["layout"] for r in recs],
                "wall_s": round(time.perf_counter() - t0, 2),
                "second_order_bytes_per_rank": [r["second_order_bytes"] for r in recs],
                "step_time_mean_s_per_rank": [r["step_time_mean_s"] for r in recs],
                "step_time_median_s_per_rank": [r["step_time_median_s"] for r in recs],
                "steady_step_time_median_s_per_rank": [r["steady_step_time_median_s"] for r in recs],
            }
            if "projected_second_order_bytes_per_rank" in recs[0]:
                rec["projected_second_order_bytes_per_rank"] = recs[0]["projected_second_order_bytes_per_rank"]
                rec["gather"] = recs[0]["gather"]
            if mode != "off":
                rec["max_abs_diff_vs_off"] = float((final[mode] - final["off"]).abs().max())
            runs.append(rec)
            print(f"[distributed] world {world} {mode} in {time.perf_counter() - t0:.1f}s", flush=True)

    rows = []
    for r in runs:
        projected = next((o.get("projected_second_order_bytes_per_rank") for o in runs
                          if o["world_size"] == r["world_size"] and o["mode"] == "off"), None)
        rows.append([r["world_size"], r["mode"], r["backend"], str(r["layout"][0]),
                     " / ".join(f"{b:,}" for b in r["second_order_bytes_per_rank"]),
                     " / ".join(f"{b:,}" for b in projected or []) or "-",
                     " / ".join(f"{t * 1e3:.2f}" for t in r["step_time_mean_s_per_rank"]),
                     " / ".join("-" if t is None else f"{t * 1e3:.2f}" for t in r["steady_step_time_median_s_per_rank"]),
                     r.get("max_abs_diff_vs_off", "-")])
    print(table(["world", "distributed", "backend", "layout", "second-order bytes per rank", "projected by the plan",
                 "step ms per rank (mean)", "steady step ms (median)", "max |param - off|"], rows))
    for r in runs:
        if "gather" in r:
            g = r["gather"]
            print(f"all-gather of {g['numel']:,} preconditioned elements at world {r['world_size']}: "
                  f"fp32 {g['float32_median_s'] * 1e3:.3f} ms, bf16 {g['bfloat16_median_s'] * 1e3:.3f} ms (median)")
    payload = {
        "settings": dict(cfg),
        "integrated": INTEGRATED,
        "note": "world size 1: 'auto' finds no process group to shard over and runs the single-device step",
        "runs": runs,
    }
    path = write_result(args.out, NAME, payload, run, argv)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
