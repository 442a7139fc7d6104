"""Helpers shared by the benchmark scripts: machine description, result files, tables.

Every script writes ``<out>/<name>.json`` with the payload it measured plus a ``machine``
block (CPU model, cores, threads, torch version, device name, load average when it started)
and ``run`` (command line, start time, wall time), so every figure in the docs can name the
machine and the command that produced it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK_DIR = Path(tempfile.gettempdir()) / "lightning_shampoo4_bench_quick"

# The optimizer variants every benchmark compares (Shampoo4bit keyword arguments).
SHAMPOO_VARIANTS: dict[str, dict[str, Any]] = {
    "shampoo32": dict(bits=32),
    "naive4": dict(bits=4, storage="naive"),
    "shampoo4": dict(bits=4, storage="eigenvectors"),  # the paper's method
    "shampoo8": dict(bits=8, storage="eigenvectors", block_size=256),  # the paper's 8-bit ablation used block 256
    "cholesky4": dict(bits=4, storage="cholesky", statistic_bits=4),  # Li et al.: error feedback
    "cholesky8": dict(bits=4, storage="cholesky"),  # the default: 4-bit root, 8-bit factor, cholesky4's bytes
}
LABELS = {
    "adamw": "AdamW",
    "sgdm": "SGDM",
    "muon": "Muon (+AdamW)",
    "shampoo32": "32-bit Shampoo",
    "naive4": "naive 4-bit Shampoo",
    "shampoo4": "4-bit eigenvector Shampoo",
    "shampoo8": "8-bit Shampoo",
    "cholesky4": "4-bit Cholesky Shampoo",
    "cholesky8": "4-bit Shampoo (default: Cholesky, 8-bit factor)",
}


def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo where available."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, threads, memory, torch, device, load."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cpu",
        "device_name": cpu_model(),
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        info["device"] = str(device)
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def base_parser(description: str, name: str) -> argparse.ArgumentParser:
    """An argument parser with the options every script shares."""
    parser = argparse.ArgumentParser(
        prog=f"benchmarks/{name}.py",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny configuration for smoke tests (seconds)")
    parser.add_argument(
        "--out", type=Path, default=None,
        help=f"directory for the JSON (and PNG) results (default: {RESULTS_DIR}; with --quick: {QUICK_DIR}, "
        "so a smoke run never overwrites the recorded results)",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch.set_num_threads for the run (keep equal across runs)"
    )
    return parser


def setup_run(args: argparse.Namespace, device: str = "cpu") -> dict[str, Any]:
    """Apply ``--threads``, resolve and make ``--out`` and return the start-of-run record."""
    torch.set_num_threads(max(1, args.threads))
    if args.out is None:
        args.out = QUICK_DIR if getattr(args, "quick", False) else RESULTS_DIR
    args.out.mkdir(parents=True, exist_ok=True)
    return {
        "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "t0": time.perf_counter(),
        "machine": machine_info(device),
    }


def write_result(
    out: Path,
    name: str,
    payload: dict[str, Any],
    run: dict[str, Any],
    argv: Sequence[str],
    script: str | None = None,
) -> Path:
    """Write ``out/name.json``: ``payload`` plus machine and run information.

    ``script`` names the script that ran when it is not ``benchmarks/<name>.py`` (a script that
    writes more than one result file); the recorded command starts with it.
    """
    record = {
        "benchmark": name,
        "machine": run["machine"],
        "run": {
            "command": " ".join([f"python benchmarks/{script or name}.py", *argv]),
            "started": run["started"],
            "wall_s": round(time.perf_counter() - run["t0"], 2),
        },
        **payload,
    }
    try:
        record["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    path = Path(out) / f"{name}.json"
    path.write_text(json.dumps(_clean(record), indent=2) + "\n", encoding="utf-8")
    return path


def _clean(x: Any) -> Any:
    """JSON-safe: tuples to lists, non-finite floats to strings, tensors to lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _clean(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, Path):
        return str(x)
    return x


def fmt(x: Any, digits: int = 3) -> str:
    """Compact number formatting for tables."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 10 ** (-digits)):
            return f"{x:.{digits}g}"
        return f"{x:.{digits}f}"
    return str(x)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    cells = [[fmt(c, digits) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def mib(nbytes: float) -> float:
    return nbytes / 2**20
