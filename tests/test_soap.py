"""SOAP4bit: the fp32 algorithm against a float64 reference, the 4-bit state against fp32,
checkpoints, bad input, odd shapes, non-finite steps and DDP block sharding."""

from __future__ import annotations

import copy
import io
import math
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_shampoo4 import linalg
from lightning_shampoo4.optim.checkpoint import CheckpointMismatchError
from lightning_shampoo4.optim.soap import SOAP4bit


# -- a float64 reference SOAP, written from the paper's description -------------------------
def reference_soap(weights, grads_seq, *, lr, betas, eps, weight_decay, shampoo_beta, frequency, max_dim=None):
    """Dense float64 SOAP: L, R EMAs every step, eigh at the first step (which changes no
    weight), every ``frequency`` Adam steps the columns ordered by diag(Q^T L Q) (the second
    moment permuted alike) and one power iteration + QR; Adam with bias correction on
    QL^T G QR, the first moment in the weights' basis; decoupled weight decay. 2-D weights are
    cut into blocks of at most ``max_dim``; conv weights are seen as (out, rest)."""
    b1, b2 = betas
    ws = [w.double().clone() for w in weights]
    states = [{} for _ in ws]

    def blocks(shape):
        rows, cols = shape
        step = max_dim or max(rows, cols)
        return [(r, min(r + step, rows), c, min(c + step, cols)) for r in range(0, rows, step)
                for c in range(0, cols, step)]

    for grads in grads_seq:
        for w, g, s in zip(ws, grads, states):
            g = g.double()
            matrix = g.dim() >= 2
            gm = g.reshape(g.shape[0], -1) if matrix else g
            if not s:
                s["t"], s["m"] = 0, torch.zeros_like(gm)
                s["blocks"] = []
                if not matrix:
                    s["blocks"].append({"v": torch.zeros_like(gm)})
                for r0, r1, c0, c1 in (blocks(gm.shape) if matrix else []):
                    gb = gm[r0:r1, c0:c1]
                    lmat, rmat = (1 - shampoo_beta) * gb @ gb.T, (1 - shampoo_beta) * gb.T @ gb
                    s["blocks"].append({
                        "idx": (r0, r1, c0, c1), "L": lmat, "R": rmat, "v": torch.zeros_like(gb),
                        "QL": torch.linalg.eigh(lmat)[1].flip(1), "QR": torch.linalg.eigh(rmat)[1].flip(1),
                    })
                continue
            s["t"] += 1
            t = s["t"]
            s["m"] = b1 * s["m"] + (1 - b1) * gm
            d = torch.zeros_like(gm)
            for blk in s["blocks"]:
                if "idx" not in blk:
                    blk["v"] = b2 * blk["v"] + (1 - b2) * gm * gm
                    d = (s["m"] / (1 - b1**t)) / ((blk["v"] / (1 - b2**t)).sqrt() + eps)
                    continue
                r0, r1, c0, c1 = blk["idx"]
                gb, mb = gm[r0:r1, c0:c1], s["m"][r0:r1, c0:c1]
                ql, qr = blk["QL"], blk["QR"]
                gr = ql.T @ gb @ qr
                blk["v"] = b2 * blk["v"] + (1 - b2) * gr * gr
                u = ((ql.T @ mb @ qr) / (1 - b1**t)) / ((blk["v"] / (1 - b2**t)).sqrt() + eps)
                d[r0:r1, c0:c1] = ql @ u @ qr.T
                blk["L"] = shampoo_beta * blk["L"] + (1 - shampoo_beta) * gb @ gb.T
                blk["R"] = shampoo_beta * blk["R"] + (1 - shampoo_beta) * gb.T @ gb
                if t % frequency == 0:
                    for side, dim in (("L", 0), ("R", 1)):
                        q, a = blk["Q" + side], blk[side]
                        perm = torch.argsort((q * (a @ q)).sum(0), descending=True)
                        blk["v"] = blk["v"][perm] if dim == 0 else blk["v"][:, perm]
                        blk["Q" + side] = torch.linalg.qr(a @ q[:, perm])[0]
            w.mul_(1 - lr * weight_decay).add_(d.reshape(w.shape), alpha=-lr)
    return ws


HYPER = dict(lr=0.02, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, shampoo_beta=0.9)


def _run(params, grads_seq, **kw):
    opt = SOAP4bit(params, **kw)
    for grads in grads_seq:
        for p, g in zip(params, grads):
            p.grad = g.clone().to(p.dtype)
        opt.step()
    return opt


def _grads(shapes, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def test_fp32_equals_float64_reference():
    # square blocks (a first-step statistic G G^T of full rank has a unique eigenbasis), a 1-D
    # tensor, a conv weight (4 x 2*2*1) and a rectangular matrix cut into square blocks
    shapes = [(6, 6), (5,), (4, 2, 2, 1), (3, 6)]
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(s, generator=gen) for s in shapes]
    seq = _grads(shapes, 10)
    ref = reference_soap(weights, seq, frequency=3, max_dim=None, **HYPER)
    params = [torch.nn.Parameter(w.clone()) for w in weights[:3]]
    opt = _run(params, [g[:3] for g in seq], bits=32, precondition_frequency=3, **HYPER)
    assert opt.counters["steps"] == 10 and opt.counters["failed_updates"] == 0
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.double(), r, rtol=0, atol=2e-5)
    blocked = reference_soap(weights[3:], [g[3:] for g in seq], frequency=3, max_dim=3, **HYPER)
    p = torch.nn.Parameter(weights[3].clone())
    _run([p], [g[3:] for g in seq], bits=32, precondition_frequency=3, max_precondition_dim=3, **HYPER)
    torch.testing.assert_close(p.double(), blocked[0], rtol=0, atol=2e-5)


def _structured_grads(shapes, steps, seed=0):
    """Gradients A Z B with decaying spectra on both sides: well separated eigenvalues."""
    gen = torch.Generator().manual_seed(seed)
    mix = [(torch.linalg.qr(torch.randn(r, r, generator=gen))[0] * torch.logspace(0, -2, r),
            torch.linalg.qr(torch.randn(c, c, generator=gen))[0] * torch.logspace(0, -2, c)) for r, c in shapes]
    return [[a @ torch.randn(a.shape[1], b.shape[1], generator=gen) @ b.T for a, b in mix] for _ in range(steps)]


def _direction_error(kw, steps=25):
    shapes = [(96, 80), (130, 70)]
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(s, generator=gen) for s in shapes]
    seq = _structured_grads(shapes, steps, seed=4)
    out = []
    for bits_kw in (dict(bits=32), kw):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        _run(params, seq, lr=1e-2, **bits_kw)
        out.append([p.detach() - w for p, w in zip(params, weights)])
    return min(float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) for a, b in zip(out[1], out[0]))


def test_4bit_eigenvectors_close_to_fp32():
    # cosine of the total parameter change to fp32 SOAP's, on gradients with decaying spectra
    # (Adam normalizes the small-eigenvalue directions too, where 4-bit bases mix most)
    q_only = dict(statistics="dense", second_moment="full", moment_bits=32)
    assert _direction_error(dict(bits=4, **q_only)) > 0.8
    assert _direction_error(dict(bits=4, bjorck_steps=1, **q_only)) > 0.88
    assert _direction_error(dict(bits=8, **q_only)) > 0.97
    assert _direction_error(dict(bits=4)) > 0.7  # the default compact state


@pytest.mark.parametrize("second_moment", ["full", "factored"])
def test_normalized_first_moment(second_moment):
    """``first_moment_basis="normalized"`` keeps the rotated first moment divided by sqrt(V) + eps:
    with fp32 moments the same steps as "rotated" up to rounding; at 4 bits its codes hold Adam's
    direction (entries of one size) and follow the fp32 moment's steps far more closely than the
    plain rotated moment's codes (whose entries span the eigenvalues' range) or the parameter
    basis' codes."""
    shapes = [(40, 24), (24,), (30, 70)]
    seq = _grads(shapes, 12)
    torch.manual_seed(0)
    weights = [torch.randn(s) for s in shapes]
    out = {}
    for basis in ("rotated", "normalized"):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        _run(params, seq, bits=32, second_moment=second_moment, first_moment_basis=basis, precondition_frequency=4,
             max_precondition_dim=32)
        out[basis] = params
    for a, b in zip(out["rotated"], out["normalized"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    cos = {basis: _direction_error(dict(bits=32, second_moment=second_moment, first_moment_basis=basis, moment_bits=4))
           for basis in ("original", "rotated", "normalized")}
    assert cos["normalized"] > 0.88 and cos["normalized"] > cos["rotated"] + 0.05 > cos["original"], cos


def test_eigenbases_orthogonal():
    p = torch.nn.Parameter(torch.randn(128, 72))
    seq = _grads([(128, 72)], 12)
    # ||Q^T Q - I||_F / sqrt(k): fp32 exact; 4-bit codes a few percent, one Björck step far less
    for kw, tol in ((dict(bits=32), 1e-5), (dict(bits=4), 0.2), (dict(bits=4, bjorck_steps=1), 0.03)):
        opt = _run([p], seq, precondition_frequency=5, **kw)
        errors = [linalg.orthogonality_error(q) / q.shape[0] ** 0.5 for _, _, _, q in opt.eigenbases()]
        assert len(errors) == 2 and max(errors) < tol, (kw, errors)


def _roundtrip(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kw", [dict(bits=4), dict(bits=4, statistics="cholesky8", first_moment_basis="rotated",
                                                    second_moment="full", moment_bits=4),
                                dict(bits=4, first_moment_basis="normalized", moment_bits=4), dict(bits=32)])
def test_state_dict_resume_is_bit_identical(kw):
    shapes = [(70, 66), (66,), (300, 40)]
    seq = _grads(shapes, 14)
    torch.manual_seed(0)
    weights = [torch.randn(s) for s in shapes]
    full = [torch.nn.Parameter(w.clone()) for w in weights]
    _run(full, seq, precondition_frequency=4, **kw)
    part = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = _run(part, seq[:7], precondition_frequency=4, **kw)
    sd = _roundtrip(opt)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in part]
    opt2 = SOAP4bit(resumed, precondition_frequency=4, **kw)
    opt2.load_state_dict(sd)
    assert opt2.counters == opt.counters
    for grads in seq[7:]:
        for p, g in zip(resumed, grads):
            p.grad = g.clone()
        opt2.step()
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)


def test_load_state_dict_keeps_distributed_setting():
    """torch's load_state_dict goes through __setstate__: the optimizer's own settings stay."""
    src = SOAP4bit([torch.nn.Parameter(torch.randn(6, 5))])
    src.param_groups[0]["params"][0].grad = torch.randn(6, 5)
    src.step()
    sd = _roundtrip(src)
    opt = SOAP4bit([torch.nn.Parameter(torch.randn(6, 5))], distributed="off", distributed_dtype="bfloat16")
    opt.load_state_dict(sd)
    assert opt.distributed == "off" and opt.distributed_dtype == "bfloat16"
    assert opt.counters == src.counters


def test_bad_input_errors():
    p = [torch.nn.Parameter(torch.randn(4, 4))]
    for kw, msg in [
        (dict(lr=-1.0), "lr=-1.0 is out of range"),
        (dict(betas=(0.9,)), "betas=(0.9,) must be a pair"),
        (dict(bits=5), "bits=5 is not supported"),
        (dict(moment_bits=2), "moment_bits=2 is not supported"),
        (dict(precondition_frequency=0), "precondition_frequency=0 must be an integer >= 1"),
        (dict(statistics="cholesky"), "statistics='cholesky' is not supported"),
        (dict(distributed="ddp"), "distributed='ddp' is not supported"),
    ]:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            SOAP4bit(p, **kw)
    with pytest.raises(ValueError, match="complex parameters are not supported"):
        SOAP4bit([torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])
    opt = _run(p, _grads([(4, 4)], 2))
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr=nan is out of range"):
        opt.step()
    opt.param_groups[0]["lr"] = 1e-3
    # a checkpoint of other shapes, or a damaged one, is refused before anything changes
    sd = _roundtrip(opt)
    sd["state"][0]["0.L.eigvecs"][0, 0] = float("inf")
    with pytest.raises(CheckpointMismatchError, match="inf / NaN"):
        SOAP4bit([torch.nn.Parameter(torch.randn(4, 4))]).load_state_dict(sd)
    shaped = SOAP4bit([torch.nn.Parameter(torch.randn(5, 4))])
    with pytest.raises(CheckpointMismatchError):
        shaped.load_state_dict(_roundtrip(opt))
    assert not shaped.state


def test_odd_shapes_unrotated_dims_and_bf16():
    shapes = [(1, 7), (7, 1), (3, 5, 2), (300, 20), (5,), (2, 3)]
    seq = _grads(shapes, 6)
    for kw in (dict(), dict(large_dims="unrotated", max_precondition_dim=64), dict(bits=32)):
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        before = [p.detach().clone() for p in params]
        opt = _run(params, seq, precondition_frequency=2, **kw)
        assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(params, before))
        assert opt.counters["failed_updates"] == 0
    unrot = SOAP4bit([torch.nn.Parameter(torch.randn(300, 20))], large_dims="unrotated", max_precondition_dim=64)
    unrot.init_state()
    assert not any(k.startswith("0.L.eigvecs") for k in next(iter(unrot.state.values())))  # 300 > 64: no left basis
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.bfloat16)) for s in shapes]
    opt = _run(params, seq, precondition_frequency=2)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params)
    sd = _roundtrip(opt)
    fresh = SOAP4bit([torch.nn.Parameter(p.detach().clone()) for p in params], precondition_frequency=2)
    fresh.load_state_dict(sd)


def test_nonfinite_gradient_skips_the_step_and_counts():
    params = [torch.nn.Parameter(torch.randn(40, 30)), torch.nn.Parameter(torch.randn(30))]
    opt = _run(params, _grads([(40, 30), (30,)], 3))
    state = copy.deepcopy(opt.state_dict()["state"])
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.full((40, 30), float("nan"))
    params[1].grad = torch.zeros(30)
    opt.step()
    assert opt.counters["skipped_nonfinite"] == 1 and opt.counters["steps"] == 4
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    after = opt.state_dict()["state"]
    assert all(torch.equal(state[i][k], after[i][k]) for i in state for k in state[i])


def test_memory_report_kinds_and_sizes():
    p = torch.nn.Parameter(torch.randn(256, 128))
    opt = SOAP4bit([p])
    opt.init_state()
    rep = opt.memory_report()
    # Q's: 4-bit codes (half a byte per entry) plus one bf16 scale per 64 entries
    assert rep["eigenvectors"] == (256 * 256 + 128 * 128) // 2
    # the rotated statistics: 8-bit strict triangles, fp32 diagonals (their scales: one per row run)
    assert rep["factors"] == 256 * 255 // 2 + 128 * 127 // 2 + 4 * (256 + 128)
    assert rep["scales"] == 2 * (256 * 256 + 128 * 128) // 64 + 2 * (255 + 127)
    assert rep["moments"] == 256 * 128 + 4 * (256 * 128 // 256) + 4 * (256 + 128)  # 8-bit m, factored v
    ref = SOAP4bit([torch.nn.Parameter(torch.randn(256, 128))], bits=32)
    ref.init_state()
    assert ref.memory_report()["second_order"] >= 7 * rep["second_order"]


# -- DDP on two gloo processes ----------------------------------------------------------------
def _ddp_worker(rank, world, store, out, kw):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        shapes = [(40, 24), (24,), (30, 30), (70, 20)]
        torch.manual_seed(0)
        weights = [torch.randn(s) for s in shapes]
        seq = _grads(shapes, 8)
        results = {}
        for mode in ("auto", "off"):
            params = [torch.nn.Parameter(w.clone()) for w in weights]
            opt = _run(params, seq, distributed=mode, precondition_frequency=3, max_precondition_dim=32, **kw)
            results[mode] = ([p.detach().clone() for p in params], opt.layout, opt.memory_report()["second_order"])
            if mode == "auto":
                opt.consolidate_state_dict()
                sd = opt.state_dict() if rank == 0 else None
        if rank == 0:
            single = SOAP4bit([torch.nn.Parameter(w.clone()) for w in weights], distributed="off",
                              precondition_frequency=3, max_precondition_dim=32, **kw)
            single.load_state_dict(sd)  # a consolidated state loads in one process
        # per-shard FSDP2 (distributed="off"; "auto" is lossless, tests/test_resharding.py): each rank
        # preconditions its local rows (even shards: no padding) exactly as SOAP4bit would precondition
        # that shard as a plain parameter
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        net = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 30, bias=False))
        plain = [p.detach().clone() for p in net.parameters()]
        fully_shard(net, mesh=init_device_mesh("cpu", (world,)))
        sharded = SOAP4bit(net.parameters(), precondition_frequency=3, distributed="off", **kw)
        local = [torch.nn.Parameter(p.chunk(world)[rank].clone()) for p in plain]
        single = SOAP4bit(local, precondition_frequency=3, distributed="off", **kw)
        gen = torch.Generator().manual_seed(5)
        for _ in range(7):
            grads = [torch.randn(p.shape, generator=gen) for p in plain]
            for p, lp, g in zip(net.parameters(), local, grads):
                p.grad = torch.distributed.tensor.distribute_tensor(g, p.device_mesh, p.placements)
                lp.grad = g.chunk(world)[rank].clone()
            sharded.step()
            single.step()
        fsdp_equal = all(torch.equal(p.to_local(), lp) for p, lp in zip(net.parameters(), local))
        out[rank] = (
            all(torch.equal(a, b) for a, b in zip(results["auto"][0], results["off"][0])),
            results["auto"][1], results["auto"][2] < results["off"][2], sharded.layout, fsdp_equal,
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kw", [dict(bits=4), dict(bits=4, first_moment_basis="normalized", moment_bits=4)],
                         ids=["defaults", "normalized-m4"])
def test_ddp_sharded_equals_off_and_fsdp2_local_shards(tmp_path, kw):
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        store = str(tmp_path / "store")
        procs = [ctx.Process(target=_ddp_worker, args=(r, 2, store, out, kw)) for r in range(2)]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + 90
        for proc in procs:
            proc.join(max(1.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                pytest.fail("DDP workers hung")
        assert dict(out) == {0: (True, "ddp", True, "fsdp2", True), 1: (True, "ddp", True, "fsdp2", True)}


# -- Lightning ----------------------------------------------------------------------------------
def test_lightning_cli_takes_soap4bit(tmp_path):
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    quiet = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
             "--trainer.accelerator=cpu", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0"]
    args = ["fit", "--optimizer", "lightning_shampoo4.optim.soap.SOAP4bit", "--optimizer.lr", "0.01",
            "--optimizer.precondition_frequency", "3", "--optimizer.moment_bits", "32", "--trainer.max_steps", "8",
            f"--trainer.default_root_dir={tmp_path}", *quiet]
    cli = LightningCLI(BoringModel, BoringDataModule, args=args, save_config_callback=None)
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, SOAP4bit) and opt.param_groups[0]["precondition_frequency"] == 3
    assert opt.counters["steps"] == 8 and opt.counters["refreshes"] > 0
