"""Checks of hyper-parameters: a bad value raises ValueError naming it and what is allowed.

Numbers may be Python, numpy or 0-dim torch scalars; they are stored back as Python
``float`` / ``int`` so the step reads plain numbers. Every real number must be finite.
"""

from __future__ import annotations

import math
import numbers

from ..kernels import BACKENDS
from ..quant import CODEBOOKS

BASES = ("adamw", "sgd")
BITS = (4, 8, 32)
MOMENT_BITS = (4, 8, 32)
QUANTIZE = ("eigenvectors", "preconditioner", "cholesky", "cholesky8")
ROOT_METHODS = (None, "eigen", "schur_newton")
PRECONDITION_DTYPES = ("float32", "bfloat16", "float16")
DISTRIBUTED = ("auto", "off")

# Settings that fix how the state is stored: frozen once a parameter has state.
FORMAT_KEYS = ("base", "bits", "moment_bits", "quantize", "codebook", "block_size", "root_block_size", "scale_dtype",
               "min_quant_numel", "max_order", "precondition")
SCALE_DTYPES = ("bfloat16", "float16", "float32")


def _scalar(value):
    """``value`` as a Python number if it is a real scalar of any library, else unchanged."""
    if isinstance(value, bool):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", getattr(value, "dim", lambda: 1)) in (0, ()):
        try:
            value = value.item()
        except (TypeError, ValueError, RuntimeError):
            return value
    if isinstance(value, bool):  # a numpy / torch bool: not a number
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _flag(name: str, value) -> bool:
    """A Python bool from a bool of any library (numpy, 0-dim torch)."""
    value = _scalar(value)
    _choice(name, value, (False, True))
    return bool(value)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}")


def _number(name: str, value, low: float, high: float | None = None, *, low_open: bool = False, high_open=True):
    value = _scalar(value)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
    if not ok:
        lo = f"{'(' if low_open else '['}{low}"
        hi = f"{high}{')' if high_open else ']'}" if high is not None else "inf)"
        raise ValueError(f"{name}={value!r} is out of range; it must be a finite number in {lo}, {hi}")
    return float(value)


def _integer(name: str, value, low: int) -> int:
    value = _scalar(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    return value


def _pair(name: str, value, what: str) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name}={value!r} must be a pair {what}")
    return tuple(value)


# What ``None`` means for the storage settings, per ``quantize`` mode: the values each mode was
# measured with. The default Cholesky storage keeps its 8-bit factor with one scale per column
# run of up to 1200 entries and its 4-bit root in blocks of 40, both with the linear1.5 map: at
# no more bytes than the eigenvector storage, the preconditioned direction stays closest to the
# exact one (benchmarks/drift.py).
STORAGE_DEFAULTS = {
    "cholesky8": dict(codebook="linear1.5", block_size=1200, root_block_size=40),
}
STORAGE_FALLBACK = dict(codebook="linear2", block_size=64, root_block_size=256)


def validate_group(g: dict, *, resolve: bool = True) -> None:
    """Validate one parameter group's hyper-parameters in place (raises ValueError).

    ``resolve``: replace a ``None`` codebook / block size / root block size by the value of the
    group's ``quantize`` mode (``STORAGE_DEFAULTS``), so a group and its checkpoint hold what its
    state was stored with; the optimizer's ``defaults`` keep ``None`` so that each group takes
    its own mode's values."""
    g["lr"] = _number("lr", g["lr"], 0.0)
    b1, b2 = _pair("betas", g["betas"], "(beta1, beta2), each in [0, 1)")
    g["betas"] = (_number("betas[0]", b1, 0.0, 1.0), _number("betas[1]", b2, 0.0, 1.0))
    g["eps"] = _number("eps", g["eps"], 0.0)
    g["weight_decay"] = _number("weight_decay", g["weight_decay"], 0.0)
    g["momentum"] = _number("momentum", g["momentum"], 0.0, 1.0)
    g["nesterov"] = _flag("nesterov", g["nesterov"])
    _choice("base", g["base"], BASES)
    if g["nesterov"] and g["base"] == "sgd" and g["momentum"] <= 0:
        raise ValueError("nesterov=True needs momentum > 0")
    g["bits"] = _scalar(g["bits"])
    _choice("bits", g["bits"], BITS)
    g["moment_bits"] = _scalar(g["moment_bits"])
    _choice("moment_bits", g["moment_bits"], MOMENT_BITS)
    _choice("quantize", g["quantize"], QUANTIZE)
    if resolve:
        for key, value in {**STORAGE_FALLBACK, **STORAGE_DEFAULTS.get(g["quantize"], {})}.items():
            if g[key] is None:
                g[key] = value
    if g["codebook"] is not None:  # None only in ``defaults`` (resolve=False)
        _choice("codebook", g["codebook"], CODEBOOKS)
    for key in ("block_size", "root_block_size"):
        if g[key] is not None:
            g[key] = _integer(key, g[key], 1)
    _choice("scale_dtype", g["scale_dtype"], SCALE_DTYPES)
    g["min_quant_numel"] = _integer("min_quant_numel", g["min_quant_numel"], 0)
    g["max_order"] = _integer("max_order", g["max_order"], 1)
    g["shampoo_beta"] = _number("shampoo_beta", g["shampoo_beta"], 0.0, 1.0)
    g["matrix_eps"] = _number("matrix_eps", g["matrix_eps"], 0.0, low_open=True)
    g["stat_interval"] = _integer("stat_interval", g["stat_interval"], 1)
    g["root_interval"] = _integer("root_interval", g["root_interval"], 1)
    if g["root_interval"] % g["stat_interval"]:
        raise ValueError(
            f"root_interval={g['root_interval']} must be a multiple of stat_interval={g['stat_interval']}"
        )
    steps = _pair("bjorck_steps", g["bjorck_steps"], "of integers >= 0 (statistics, roots)")
    g["bjorck_steps"] = tuple(_integer("bjorck_steps", s, 0) for s in steps)
    _choice("root_method", g["root_method"], ROOT_METHODS)
    _choice("kernel_backend", g["kernel_backend"], BACKENDS)
    _choice("precondition_dtype", g["precondition_dtype"], PRECONDITION_DTYPES)
    g["start_preconditioning_step"] = _integer("start_preconditioning_step", g["start_preconditioning_step"], 0)
    g["precondition"] = _flag("precondition", g["precondition"])
