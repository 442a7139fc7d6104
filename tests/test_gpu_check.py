"""``benchmarks/gpu_check.py``: its dry run (tiny sizes on the CPU, the Triton kernels in the
interpreter) exits 0, writes only under ``--out`` and needs no omegaconf, jsonargparse or
scikit-learn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_checks_every_section_and_writes_under_out(tmp_path):
    out = tmp_path / "gpu"
    code = textwrap.dedent(f"""
        import runpy, sys
        for name in ("omegaconf", "jsonargparse", "sklearn"):
            sys.modules[name] = None  # only torch, triton and lightning are needed
        sys.argv = ["gpu_check.py", "--out", {str(out)!r}, "--dry-run"]
        runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "dry run" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check_dry_run.json", "gpu_check_dry_run.md"]
    result = json.loads((out / "gpu_check_dry_run.json").read_text())
    assert result["dry_run"] and not result["failed_sections"]
    assert result["kernels"] and all(r["ok"] for r in result["kernels"]), [r for r in result["kernels"] if not r["ok"]]
    kinds = {r["kernel"] for r in result["kernels"]}
    assert {"store symmetric", "rebuild symmetric", "fused matmul", "quantize+dequantize rows", "moment update"} <= kinds
    assert all(r["ok"] for r in result["training"]), result["training"]
    assert {r["optimizer"] for r in result["step_time"]} >= {"Shampoo 4-bit (default)", "Shampoo 32-bit", "AdamW"}
    assert result["precondition_paths"]["recommended_default"] in ("workspace", "fused")
    assert result["ddp"]["ok"], result["ddp"]
    assert "| optimizer | steady step (ms) | amortized step (ms) |" in res.stdout


def test_ddp_check_keeps_a_written_result_when_a_rank_fails_on_exit(tmp_path, monkeypatch):
    """A rank that fails after the ranks compared their parameters (a collective library's
    teardown) leaves the result standing with the failure beside it; a failure before that is
    an error; neither leaves the scratch file in the output folder."""
    import importlib.util

    import torch.multiprocessing as mp

    spec = importlib.util.spec_from_file_location("gpu_check_under_test", ROOT / "benchmarks" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)

    def exits_badly(fn, args, nprocs, join):
        Path(args[2]).write_text(json.dumps({"world": 2, "backend": "gloo", "params_identical": True,
                                             "median_step_ms": 1.0, "finite": True}))
        raise mp.ProcessExitedException("process 1 terminated with signal SIGABRT", 1, 1, 0, signal_name="SIGABRT")

    monkeypatch.setattr(mp, "spawn", exits_badly)
    res = gc.ddp_check(tmp_path, cuda=False)
    assert res["ok"] and "SIGABRT" in res["teardown_error"]
    assert list(tmp_path.iterdir()) == []

    def fails_early(fn, args, nprocs, join):
        raise mp.ProcessRaisedException("init failed", 0, 1)

    monkeypatch.setattr(mp, "spawn", fails_early)
    with pytest.raises(mp.ProcessRaisedException):
        gc.ddp_check(tmp_path, cuda=False)
    assert list(tmp_path.iterdir()) == []
