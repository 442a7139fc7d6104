"""``benchmarks/drift.py --quick`` runs end to end and writes the JSON and the plot."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
                    if vname != "oneshot4":
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
