"""Per-rank second-order state, optimizer step time and bytes communicated per step of
``Shampoo4bit`` and ``SOAP4bit`` at 1, 2 and 4 ranks: DDP block owners (balanced by state bytes,
the default, or by work), lossless FSDP2 (``distributed="auto"``: whole blocks, one owner each;
Shampoo4bit's blocks heavier than a rank's share one owner per factor) and per-shard FSDP2
(``distributed="off"``: each rank its shard's blocks).

Method
------
* One process per rank (CPU + gloo; one GPU per rank + NCCL with ``--backend nccl``); the same
  seed, the same global batches at every world size (each rank its slice); ``stat_interval=2``,
  ``root_interval=4``, ``--steps`` steps (12).
* Models: ``mlp``, the 4-layer MLP 32-160-144-96-2 (global batch 16), and ``vit_tiny``
  (``lightning_shampoo4.models.vit_tiny``, embed 192, depth 12, 10 classes, 32 x 32 inputs,
  global batch 8). Default settings (``max_order=1200``, 4-bit Cholesky storage).
* ``SOAP4bit`` (``--optimizers``): its defaults (4-bit bases, 8-bit first moment, factored second
  moment, ``max_precondition_dim=256``), ``precondition_frequency=4``, lr 1e-3; ``--soap-modes``
  (DDP and lossless FSDP2).
* ``ddp``: ``DistributedDataParallel`` and ``distributed="auto"``; ``ddp_work``: the same with
  block owners balanced by work (:func:`optim.distributed.block_cost`) instead of bytes;
  ``fsdp2``: ``fully_shard`` on the model and ``distributed="auto"``; ``fsdp2_shard``: the same
  with ``distributed="off"``. World size 1: the one-device optimizer (the reference).
* Bytes: ``memory_report()["second_order"]`` of every rank after the run; ``ratio``: the
  largest rank's against one device's.
* Step time: ``optimizer.step()`` alone (CUDA synchronized), mean over the steps after the first
  root interval (steps 5 to 12: every step preconditions; four statistics and two root
  updates), per rank. With more ranks than cores (4 ranks on a 2-core CPU) ranks wait for a
  core: compare bytes across world sizes, times only where every rank has a core.
* Communication: the bytes of the optimizer's own collectives during ``step()``, per rank and
  step (mean over the steps after the first root interval, as the times): for an all-gather the
  gathered buffer, for an all-reduce the reduced tensor, for the roots sent between ranks (blocks
  kept factor by factor) the bytes sent plus received. The gradient all-reduce of DDP and the all-gather / reduce-scatter of FSDP2
  are the same for any optimizer and are not counted.
* ``max_abs_diff_vs_single``: the largest difference between the final parameters and the
  one-device run's (fp32). The ranks' averaged gradients differ from the one-device gradient by
  the rounding of DDP's all-reduce / FSDP2's reduce-scatter, and AdamW moves a coordinate whose
  gradient is near zero by a sizeable fraction of ``lr`` whatever its sign: so this column is not
  the optimizer's own exactness, which ``tests/test_resharding.py`` checks with identical
  gradients (bit for bit under DDP).
"""

from __future__ import annotations

import gc
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
from lightning_shampoo4.optim.soap import SOAP4bit

NAME = "distributed"
MODES = ("ddp", "ddp_work", "fsdp2", "fsdp2_shard")
OPTIMIZERS = ("shampoo", "soap")
SOAP_MODES = ("ddp", "fsdp2")
MLP_WIDTHS = (32, 160, 144, 96, 2)


def _model(name: str) -> tuple[nn.Module, int, Any]:
    """The model, its global batch and a batch maker ``(generator) -> (x, y)``."""
    if name == "mlp":
        layers: list[nn.Module] = []
        for a, b in zip(MLP_WIDTHS[:-1], MLP_WIDTHS[1:]):
            layers += [nn.Linear(a, b), nn.GELU()]
        return nn.Sequential(*layers[:-1]), 16, lambda g, n: (
            torch.randn(n, MLP_WIDTHS[0], generator=g), torch.randint(0, MLP_WIDTHS[-1], (n,), generator=g))
    if name == "mlp_quick":
        return nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 2)), 8, (
            lambda g, n: (torch.randn(n, 8, generator=g), torch.randint(0, 2, (n,), generator=g)))
    if name == "vit_tiny":
        from lightning_shampoo4.models.vit import vit_tiny

        return vit_tiny(num_classes=10), 8, lambda g, n: (
            torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    raise ValueError(f"unknown model {name!r}")


class _Counter:
    """Bytes of the optimizer's collectives (all-gathers of :mod:`optim.distributed`, all-reduces)
    and of the roots it sends and receives point to point."""

    def __init__(self) -> None:
        self.bytes = 0
        self.active = False
        self._gather, self._reduce, self._p2p = D._all_gather_flat, dist.all_reduce, D._p2p

        def gather(out, t, group=None):
            if self.active:
                self.bytes += out.numel() * out.element_size()
            return self._gather(out, t, group=group)

        def reduce(t, *args, **kwargs):
            if self.active:
                self.bytes += t.numel() * t.element_size()
            return self._reduce(t, *args, **kwargs)

        def p2p(ops):
            if self.active:
                self.bytes += sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
            return self._p2p(ops)

        D._all_gather_flat, dist.all_reduce, D._p2p = gather, reduce, p2p


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
        gc.collect()  # gloo's worker thread must drop its finished collectives before the group goes
        time.sleep(0.05)
        dist.destroy_process_group()


def _measure(rank: int, world: int, cfg: dict[str, Any], device: torch.device) -> None:
    cuda, mode = device.type == "cuda", cfg["mode"]
    torch.manual_seed(0)
    model, batch, make = _model(cfg["model"])
    model = model.to(device)
    net = model
    if mode.startswith("fsdp2") and world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh(device.type, (world,)))
    elif world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    distributed = "off" if mode == "fsdp2_shard" else "auto"
    if cfg["optimizer"] == "soap":
        opt = SOAP4bit(model.parameters(), lr=1e-3, precondition_frequency=4, distributed=distributed)
    else:
        opt = Shampoo4bit(model.parameters(), lr=1e-3, stat_interval=2, root_interval=4, distributed=distributed)
    if mode == "ddp_work":
        opt._layer.balance = "work"  # the owners' other balance (the default balances bytes)
    counter = _Counter()
    g = torch.Generator().manual_seed(1)
    times, comm = [], []
    for step in range(cfg["steps"]):
        x, y = make(g, batch)
        lo, hi = rank * batch // world, (rank + 1) * batch // world
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x[lo:hi].to(device)), y[lo:hi].to(device)).backward()
        if cuda:
            torch.cuda.synchronize()
        counter.bytes, counter.active = 0, True
        t0 = time.perf_counter()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        counter.active = False
        if step >= 4:  # after the first root update (step 4): every step preconditions
            times.append(dt)
            comm.append(counter.bytes)
    params = [(p.full_tensor() if D.is_dtensor(p) else p).detach() for p in model.parameters()]
    rec = {
        "rank": rank,
        "layout": opt.layout,
        "second_order_bytes": opt.memory_report()["second_order"],
        "step_time_mean_s": statistics.fmean(times),
        "comm_bytes_per_step": statistics.fmean(comm),
    }
    if rank == 0:
        rec["params"] = torch.cat([p.reshape(-1).cpu() for p in params])
    torch.save(rec, Path(cfg["result_dir"]) / f"r{rank}.pt")


def _launch(world: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        run_cfg = {**cfg, "store": os.path.join(tmp, "store"), "result_dir": tmp}
        # fork starts in milliseconds (and works when this module was loaded by path); CUDA must not be forked
        method = "fork" if cfg["backend"] == "gloo" and "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(_worker, args=(world, run_cfg), nprocs=world, start_method=method)
        return [torch.load(Path(tmp) / f"r{r}.pt", weights_only=True) for r in range(world)]


def _plot(runs: list[dict[str, Any]], models: list[str], worlds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimizers = [o for o in OPTIMIZERS if any(r["optimizer"] == o for r in runs)]
    fig, axes = plt.subplots(len(optimizers), len(models), figsize=(5.2 * len(models), 3.8 * len(optimizers)),
                             squeeze=False)
    labels = {"ddp": "DDP (owners by bytes)", "ddp_work": "DDP (owners by work)",
              "fsdp2": "FSDP2 lossless", "fsdp2_shard": "FSDP2 per shard"}
    names = {"shampoo": "Shampoo4bit", "soap": "SOAP4bit"}
    styles = {"ddp": ("o", "-", 9, "C0"), "ddp_work": ("s", "-", 6, "C1"), "fsdp2": ("^", "--", 6, "C2"),
              "fsdp2_shard": ("D", "-", 6, "C3")}
    for row, opt in zip(axes, optimizers):
        for ax, model in zip(row, models):
            mine = [r for r in runs if r["model"] == model and r["optimizer"] == opt]
            base = next(r for r in mine if r["world_size"] == 1)["second_order_bytes_per_rank"][0]
            ax.plot(worlds, [1 / w for w in worlds], "k:", label="1 / world")
            for mode in MODES:
                pts = [(r["world_size"], max(r["second_order_bytes_per_rank"]) / base) for r in mine
                       if r["mode"] == mode or r["world_size"] == 1]
                if len(pts) > 1:
                    marker, line, size, color = styles[mode]
                    ax.plot(*zip(*sorted(pts)), marker=marker, linestyle=line, markersize=size, color=color,
                            label=labels[mode])
            ax.set_title(f"{names[opt]}, {model}: one device {base / 1024:.0f} KiB", fontsize=10)
            ax.set_xlabel("ranks")
            ax.set_xticks(worlds)
            ax.set_ylabel("second-order bytes, largest rank / one device")
            ax.set_ylim(0, 1.05)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.split("\n\n")[0], NAME)
    parser.add_argument("--world-sizes", default="1,2,4",
                        help="comma-separated world sizes (1 is the reference; 1,2 with --quick)")
    parser.add_argument("--models", default="mlp,vit_tiny", help="mlp, vit_tiny (mlp_quick with --quick)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma-separated, of {', '.join(OPTIMIZERS)}")
    parser.add_argument("--soap-modes", default=",".join(SOAP_MODES), help="the modes SOAP4bit runs in")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps (roots every 4)")
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                        help="auto: nccl with enough GPUs, else gloo")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    worlds = [1, 2] if args.quick else sorted({1, *(int(w) for w in args.world_sizes.split(","))})
    models = ["mlp_quick"] if args.quick else args.models.split(",")
    modes = ["ddp", "fsdp2"] if args.quick else args.modes.split(",")
    soap_modes = ["ddp", "fsdp2"] if args.quick else args.soap_modes.split(",")
    optimizers = args.optimizers.split(",")
    for name in optimizers:
        if name not in OPTIMIZERS:
            parser.error(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= max(worlds) else "gloo"
    run = setup_run(args, "cuda" if backend == "nccl" else "cpu")
    base = {"threads": 1, "backend": backend, "steps": 8 if args.quick else args.steps}
    runs = []
    for optimizer, model in [(o, m) for o in optimizers for m in models]:
        single = None
        for world in worlds:
            for mode in (["single"] if world == 1 else modes if optimizer == "shampoo" else soap_modes):
                t0 = time.perf_counter()
                recs = _launch(world, {**base, "model": model, "optimizer": optimizer,
                                       "mode": "ddp" if mode == "single" else mode})
                final = recs[0].pop("params")
                rec: dict[str, Any] = {
                    "optimizer": optimizer, "model": model, "world_size": world, "mode": mode, "backend": backend,
                    "layout": [r["layout"] for r in recs],
                    "second_order_bytes_per_rank": [r["second_order_bytes"] for r in recs],
                    "step_time_mean_s_per_rank": [r["step_time_mean_s"] for r in recs],
                    "comm_bytes_per_step_per_rank": [r["comm_bytes_per_step"] for r in recs],
                    "wall_s": round(time.perf_counter() - t0, 2),
                }
                if single is None:
                    single = (final, rec["second_order_bytes_per_rank"][0])
                rec["ratio_largest_rank_vs_single"] = max(rec["second_order_bytes_per_rank"]) / single[1]
                rec["max_abs_diff_vs_single"] = float((final - single[0]).abs().max())
                runs.append(rec)
                print(f"[distributed] {optimizer} {model} world {world} {mode} in {rec['wall_s']:.1f}s", flush=True)

    rows = [[r["optimizer"], r["model"], r["world_size"], r["mode"], str(r["layout"][0]),
             " / ".join(f"{b:,}" for b in r["second_order_bytes_per_rank"]), f"{r['ratio_largest_rank_vs_single']:.3f}",
             " / ".join(f"{t * 1e3:.1f}" for t in r["step_time_mean_s_per_rank"]),
             f"{max(r['comm_bytes_per_step_per_rank']):,.0f}", f"{r['max_abs_diff_vs_single']:.1e}"] for r in runs]
    print(table(["optimizer", "model", "ranks", "mode", "layout", "second-order bytes per rank", "largest / one device",
                 "step ms per rank (mean)", "optimizer comm bytes / step", "max |param - one device|"], rows))
    payload = {"settings": {**base, "optimizers": optimizers, "models": models, "world_sizes": worlds, "modes": modes,
                            "soap_modes": soap_modes, "stat_interval": 2, "root_interval": 4,
                            "soap_precondition_frequency": 4}, "runs": runs}
    path = write_result(args.out, NAME, payload, run, argv)
    _plot(runs, models, worlds, args.out / f"{NAME}.png")
    print(f"\nwrote {path} and {args.out / f'{NAME}.png'}")
    return payload


if __name__ == "__main__":
    main()
