"""The benchmark scripts run end to end in ``--quick`` mode and write the JSON the docs are built from.

Each script is imported from ``benchmarks/`` by path and its ``main(argv)`` called in-process
(the peak-memory measurement itself starts subprocesses). Results go to ``tmp_path``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(out: Path, name: str) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    assert data["benchmark"] == name
    machine = data["machine"]
    for key in ("cpu", "cpu_cores", "torch_threads", "torch", "device", "device_name"):
        assert key in machine
    assert data["run"]["command"].startswith(f"python benchmarks/{name}.py")
    assert data["run"]["wall_s"] >= 0
    return data


def test_memory_quick_state_ratios(tmp_path):
    from lightning_shampoo4.models import create_model
    from lightning_shampoo4.quant.moments import moment_bytes

    mod = _load("memory")
    mod.main(["--quick", "--out", str(tmp_path)])
    data = _read(tmp_path, "memory")
    assert set(data["models"]) == {"resnet34", "vgg19_bn", "vit_small", "swin_tiny"}
    for name, rec in data["models"].items():
        variants = rec["variants"]
        assert set(variants) == set(mod.VARIANTS)
        assert rec["adamw32_bytes"] == 8 * rec["params"] == 2 * rec["param_bytes"]  # fp32 parameters
        for v in variants.values():
            st = v["state"]
            assert st["total"] == st["moments"] + st["second_order"] + st["other"]
            assert v["total_vs_adamw32"] == pytest.approx(st["total"] / rec["adamw32_bytes"])
        # second-order state about 10x smaller than 32-bit Shampoo's, whatever the moments
        assert rec["second_order_ratio_32_over_4"] >= 9.9, name
        for variant in ("shampoo4", "shampoo4_m8", "shampoo4_m4"):
            assert variants[variant]["second_order_32_over_this"] == pytest.approx(rec["second_order_ratio_32_over_4"])
            assert variants[variant]["state"]["second_order"] == variants["shampoo4"]["state"]["second_order"]
        assert variants["baseline"]["state"]["second_order"] == 0
        assert variants["shampoo4"]["state"]["moments"] == variants["baseline"]["state"]["moments"]
        base = {"sgdm": "sgd", "adamw": "adamw"}[rec["base"]]
        first_order = {"resnet34": 1, "vgg19_bn": 1, "vit_small": 2, "swin_tiny": 2}[name]
        assert variants["baseline"]["state"]["moments"] == first_order * rec["param_bytes"]
        # quantized moments: exactly the codes and scales of every parameter (small ones stay fp32)
        params = list(create_model(name, num_classes=100).parameters())
        for bits in (8, 4):
            expected = sum(moment_bytes(p.numel(), base, bits, p.element_size()) for p in params)
            assert variants[f"shampoo4_m{bits}"]["state"]["moments"] == expected, (name, bits)
        assert variants["shampoo4_m4"]["state"]["moments"] < variants["shampoo4_m8"]["state"]["moments"]
    # the package's promise: 4-bit Shampoo on 4-bit AdamW keeps less than fp32 AdamW
    for name in ("vit_small", "swin_tiny"):
        assert data["models"][name]["variants"]["shampoo4_m4"]["total_vs_adamw32"] <= 0.6, name


@pytest.mark.parametrize("variant", ["shampoo4", "shampoo4_m4"])
def test_memory_peak_child_measures_a_step(variant):
    mod = _load("memory")
    rec = mod.measure_peak("mlp", variant, batch_size=4, threads=1, transient=True)  # a fresh subprocess
    assert rec["peak_rss_delta_bytes"] > rec["param_bytes"]
    assert rec["peak_rss_delta_bytes"] >= rec["peak_rss_above_model_bytes"] > 0
    assert rec["static_bytes"] == rec["param_bytes"] + rec["grad_bytes"] + rec["state_bytes"]
    if variant == "shampoo4":
        assert rec["state_bytes"] > 2 * rec["param_bytes"]  # AdamW moments plus the second-order state
    else:
        assert rec["state_bytes"] < 2 * rec["param_bytes"]  # 4-bit moments: less than fp32 AdamW in total
    assert rec["transient_factor_order"] == 1200  # the MLP's 3072-wide input layer is split into 1200-blocks
    assert set(rec["cumulative_peak_after_phase_bytes"]) == {"forward_backward", "optimizer_step", "pu_piru_largest_factor"}


def test_quant_error_quick(tmp_path):
    mod = _load("quant_error")
    mod.main(["--quick", "--out", str(tmp_path)])
    data = _read(tmp_path, "quant_error")
    errs = data["synthetic"]["errors"]
    for key in ("linear2/4/A", "linear2/4/U", "linear2/4/U+1", "linear2/4/full", "dynamic/4/U", "dynamic/8/A"):
        assert {"nre", "ae"} <= set(errs[key])
    # the paper's ordering: quantizing U beats quantizing A; Björck helps; Linear-2 beats DT
    assert errs["linear2/4/U+1"]["nre"] < errs["linear2/4/U"]["nre"] < errs["linear2/4/A"]["nre"]
    assert errs["linear2/4/U"]["nre"] < errs["dynamic/4/U"]["nre"]
    assert abs(errs["linear2/4/U"]["nre"] - 0.092) < 0.01  # the paper's A2 figure (n barely matters)
    assert set(data["lm"]["factors"]) == {"L", "R"}
    assert (tmp_path / "lm_preconditioner.npz").exists()
    assert len(data["synthetic"]["orthogonality"]) == 4


def test_step_time_quick(tmp_path):
    mod = _load("step_time")
    mod.main(["--quick", "--out", str(tmp_path)])
    data = _read(tmp_path, "step_time")
    res = data["results"]
    assert set(res) == {"baseline", "shampoo32", "naive4", "shampoo4", "shampoo8"}
    assert res["baseline"]["ratio_total"] == pytest.approx(1.0)
    for name in ("shampoo32", "naive4", "shampoo4", "shampoo8"):
        r = res[name]
        for key in ("fwd_bwd_ms", "precondition_ms", "stats_ms", "roots_ms", "other_ms", "total_ms", "ratio_total",
                    "pu_event_s", "piru_event_s", "total_ms_at_100_500", "ratio_total_at_100_500"):
            assert key in r
        assert r["precondition_ms"] > 0 and r["stats_ms"] > 0 and r["roots_ms"] > 0
        assert r["precondition_calls_per_step"] > 0
    assert {m["variant"] for m in data["micro"]} >= {"shampoo32", "naive4", "shampoo4"}

    # part "optstep": opt.step() alone on recorded gradients, its own result file
    opt = json.loads((tmp_path / "step_time_optstep.json").read_text())
    assert opt["benchmark"] == "step_time_optstep"
    assert opt["run"]["command"].startswith("python benchmarks/step_time.py --quick")
    assert {"cpu", "torch_threads", "torch", "device_name"} <= set(opt["machine"])
    ds = opt["settings"]["distributed_shampoo"]
    assert ds["available"] or ds["reason"]  # DS32 runs when importable, else the reason is recorded
    expected = {"ours32", "ours4", "ours8", "naive4", "cholesky4", "cholesky8", "adamw"} | ({"ds32"} if ds["available"] else set())
    assert set(opt["workloads"]) == {"vit_tiny", "mlp", "transformer"}
    for name, w in opt["workloads"].items():
        assert w["workload"]["params"] > 0 and w["workload"]["recorded_steps"] == 2, name
        res = w["results"]
        assert set(res) == expected, name
        assert res["ours32"]["thread"]["x_ours32"]["amortized_100_500_ms"] == pytest.approx(1.0)
        for cname, r in res.items():
            for clock in ("thread", "wall"):
                t = r[clock]
                for key in ("steady_ms", "stat_ms", "root_ms", "amortized_100_500_ms", "amortized_10_50_ms"):
                    assert t[key] > 0, (name, cname, clock, key)
            probe = r["probe"]
            assert probe["steady"]["ops_per_tensor"] > 0, (name, cname)
            assert probe["steady"]["peak_transient_bytes"] >= 0 and r["state_bytes"] > 0
            kinds = {"steady"} if cname == "adamw" else {"steady", "root"} if cname == "ds32" else {"steady", "stat", "root"}
            assert set(r["thread"]["samples"]) == {"steady", "stat", "root"}
            assert {k for k, n in r["thread"]["samples"].items() if n} == kinds, (name, cname)
            assert set(probe) == kinds, (name, cname)
        assert res["adamw"]["probe"]["steady"]["syncs"] == 0  # its step counters are host tensors
        if "ds32" in res:
            assert res["ds32"]["probe"]["root"]["eigh_calls"] > 0  # roots on the scheduled steps
            assert res["ds32"]["probe"]["steady"]["eigh_calls"] == 0


def test_quality_quick(tmp_path):
    mod = _load("quality")
    mod.main(["--quick", "--out", str(tmp_path)])
    data = _read(tmp_path, "quality")
    assert set(data["tasks"]) == {"digits", "charlm"}
    for task, res in data["tasks"].items():
        assert set(res["final"]) == {"adamw", "shampoo32", "naive4", "shampoo4", "shampoo4_m4", "cholesky4", "cholesky8",
                                     "cholesky8_m4", "muon"}
        for name, fin in res["final"].items():
            assert fin["val_loss"] is not None, (task, name)
            assert fin["val_loss"]["mean"] < 5.0
            assert fin["runs"][0]["curve"][-1]["step"] == res["config"]["steps"]
        assert res["final"]["shampoo4"]["runs"][0]["counters"]["root_updates"] > 0
        assert (tmp_path / f"quality_{task}.png").exists()
    assert data["tasks"]["charlm"]["data"]["sha256"]


def test_drift_quick(tmp_path):
    mod = _load("drift")
    mod.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    data = json.loads((tmp_path / "drift.json").read_text())
    assert data["benchmark"] == "drift"
    assert data["run"]["command"].startswith("python benchmarks/drift.py")
    for key in ("cpu", "cpu_cores", "torch_threads", "torch", "device", "device_name"):
        assert key in data["machine"]
    assert (tmp_path / "drift.png").exists()
    assert set(data["streams"]) == {"synthetic", "digits", "charlm"}
    for name, res in data["streams"].items():
        assert set(res["variants"]) == set(mod.DEFAULT_VARIANTS), name
        for vname, vres in res["variants"].items():
            recs = vres["records"]
            assert recs[0]["update"] == 1 and recs[-1]["update"] == res["updates"], (name, vname)
            for r in recs:
                for side in ("L", "R"):
                    assert math.isfinite(r[side]["root_nre"])
                    if vname not in mod.SHADOW_REFERENCES:
                        assert math.isfinite(r[side]["stat_nre"])
                assert -1.0 <= r["cosine"] <= 1.0 + 1e-9
        # exact 32-bit Shampoo tracks the float64 shadow; the quantized state does not
        last = {v: res["variants"][v]["records"][-1] for v in res["variants"]}
        assert last["shampoo32"]["L"]["root_nre"] < 0.02 and last["shampoo32"]["cosine"] > 0.99
        assert last["shampoo4"]["L"]["root_nre"] > last["shampoo32"]["L"]["root_nre"]


def test_drift_shadow_and_reference_storage():
    """The shadow is the EMA from eps I; the proposed Householder storage rebuilds an orthogonal
    basis from its codes and, unquantized, reproduces the eigen-mode pipeline."""
    import torch

    mod = _load("drift")
    g = torch.randn(6, 5, dtype=torch.float64)
    shadow = mod.Shadow(6, 5, beta=0.9, eps=1e-3)
    shadow.update(g)
    assert torch.allclose(shadow.stats["L"], 0.9e-3 * torch.eye(6, dtype=torch.float64) + 0.1 * g @ g.T)
    f = mod.HouseholderFactor(96)
    stream = mod.synthetic_stream(96, 80, 5)
    for grad in stream:
        f.update_stats(grad @ grad.T)
    v = f.eigvecs()
    assert float((v.T @ v - torch.eye(96)).abs().max()) < 1e-5  # orthogonal whatever the codes
    f.update_root()
    root = f.root()
    assert torch.allclose(root, root.T) and bool(torch.isfinite(root).all())
    # the 8-bit Cholesky reference keeps the statistic it is fed, to its codes' precision
    c = mod.CholeskyFactor(96)
    exact = mod.Shadow(96, 80, beta=mod.BETA, eps=mod.EPS)
    for grad in mod.synthetic_stream(96, 80, 5):
        c.update_stats(grad @ grad.T)
        exact.update(grad.double())
    stat = exact.stats["L"]
    assert float((c.factor().double() - stat).norm() / stat.norm()) < 0.02
    # and, rounding to nearest, it is the optimizer's quantize="cholesky8" (measured: factors
    # 0.0024 apart after 30 updates, float64 against fp32 factorizations; the 4-bit roots of
    # slightly different roots 0.045; the same reference with a 4-bit factor: 0.31 away)
    c = mod.CholeskyFactor(96)
    opt = mod.build_variant("cholesky8", 96, 80, 1)
    for t, grad in enumerate(mod.synthetic_stream(96, 80, 30), start=1):
        c.update_stats(grad @ grad.T)
        c.update_root()
        opt.step(grad, t)
    ours = opt.factors()["L"]
    assert float((ours.factor().double() - c.factor().double()).norm() / c.factor().double().norm()) < 0.01
    assert float((ours.root().double() - c.root().double()).norm() / c.root().double().norm()) < 0.1


def test_rebuild_quick(tmp_path):
    mod = _load("rebuild")
    mod.main(["--quick", "--out", str(tmp_path)])
    data = _read(tmp_path, "rebuild")
    assert set(data["results"]) == {"default", "eigenvectors"}
    for layout, by_order in data["results"].items():
        assert set(by_order) == {"64", "96"}
        for rec in by_order.values():  # (the script itself checks decode + gather == the rebuild, bit for bit)
            assert all(rec[k] > 0 for k in ("rebuild_ms", "decode_ms", "gather_ms", "matmul_ms"))
            # (and the CPU kernel's rebuild equals it, where it was built)
            assert ("kernel_ms" in rec) == data["settings"]["cpu_kernel"]
    assert data["settings"]["layouts"]["default"] == {"codebook": "linear1.5", "root_block_size": 40}
