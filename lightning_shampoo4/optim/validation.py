"""Checks of hyper-parameters: a bad value raises ValueError naming it and what is allowed."""

from __future__ import annotations

from ..kernels import BACKENDS
from ..quant import CODEBOOKS

BASES = ("adamw", "sgd")
BITS = (4, 8, 32)
QUANTIZE = ("eigenvectors", "preconditioner")
ROOT_METHODS = (None, "eigen", "schur_newton")
PRECONDITION_DTYPES = ("float32", "bfloat16", "float16")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}")


def _number(name: str, value, low: float, high: float | None = None, *, low_open: bool = False, high_open=True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
    if not ok:
        lo = f"{'(' if low_open else '['}{low}"
        hi = f"{high}{')' if high_open else ']'}" if high is not None else "inf)"
        raise ValueError(f"{name}={value!r} is out of range; it must be a number in {lo}, {hi}")


def _integer(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def validate_group(g: dict) -> None:
    """Validate the hyper-parameters of one parameter group (raises ValueError)."""
    _number("lr", g["lr"], 0.0)
    betas = g["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas={betas!r} must be a pair (beta1, beta2), each in [0, 1)")
    _number("betas[0]", betas[0], 0.0, 1.0)
    _number("betas[1]", betas[1], 0.0, 1.0)
    _number("eps", g["eps"], 0.0)
    _number("weight_decay", g["weight_decay"], 0.0)
    _number("momentum", g["momentum"], 0.0, 1.0)
    _choice("nesterov", g["nesterov"], (False, True))
    _choice("base", g["base"], BASES)
    if g["nesterov"] and g["base"] == "sgd" and g["momentum"] <= 0:
        raise ValueError("nesterov=True needs momentum > 0")
    _choice("bits", g["bits"], BITS)
    _choice("quantize", g["quantize"], QUANTIZE)
    _choice("codebook", g["codebook"], CODEBOOKS)
    _integer("block_size", g["block_size"], 1)
    _integer("min_quant_numel", g["min_quant_numel"], 0)
    _integer("max_order", g["max_order"], 1)
    _number("shampoo_beta", g["shampoo_beta"], 0.0, 1.0)
    _number("matrix_eps", g["matrix_eps"], 0.0, low_open=True)
    _integer("stat_interval", g["stat_interval"], 1)
    _integer("root_interval", g["root_interval"], 1)
    if g["root_interval"] % g["stat_interval"]:
        raise ValueError(
            f"root_interval={g['root_interval']} must be a multiple of stat_interval={g['stat_interval']}"
        )
    steps = g["bjorck_steps"]
    if not (isinstance(steps, (tuple, list)) and len(steps) == 2 and all(isinstance(s, int) and s >= 0 for s in steps)):
        raise ValueError(f"bjorck_steps={steps!r} must be a pair of integers >= 0 (statistics, roots)")
    _choice("root_method", g["root_method"], ROOT_METHODS)
    _choice("kernel_backend", g["kernel_backend"], BACKENDS)
    _choice("precondition_dtype", g["precondition_dtype"], PRECONDITION_DTYPES)
    _integer("start_preconditioning_step", g["start_preconditioning_step"], 0)
    _choice("precondition", g["precondition"], (False, True))
