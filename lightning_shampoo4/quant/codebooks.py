"""Quantization codebooks: sorted fp32 tensors of 2**bits values in [-1, 1].

Four maps are offered:

* ``linear2`` ("linear square", the default): ``sign(d) * d**2`` over a uniform grid ``d``
  with one grid point moved to zero. Dense near zero, where most eigenvector entries live.
* ``linear1.5``: ``sign(d) * |d|**1.5`` over the same grid: between linear2 and a uniform
  grid. The default storage's Cholesky factor and inverse root use it: a root's entries are
  spread more evenly than an eigenvector's, and this map keeps the preconditioned direction
  closest to the exact one (``benchmarks/drift.py``).
* ``dynamic``: the signed dynamic tree of bitsandbytes, a decimal-exponent map.
* ``linear``: a uniform grid, the plain baseline.
"""

from __future__ import annotations

import torch

CODEBOOKS = ("linear2", "linear1.5", "dynamic", "linear")
BITS = (4, 8)


def _check(name: str, bits: int) -> None:
    if name not in CODEBOOKS:
        raise ValueError(f"codebook={name!r} is not supported; choose one of {CODEBOOKS}")
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported by a codebook; choose one of {BITS}")


def _power_values(bits: int, power: float) -> list[float]:
    """d = linspace(-1, 1, 2**b), d[2**(b-1) - 1] = 0, value = sign(d) * |d|**power."""
    d = torch.linspace(-1.0, 1.0, 2**bits, dtype=torch.float64)
    d[2 ** (bits - 1) - 1] = 0.0
    return (torch.sign(d) * d.abs() ** power).tolist()


def linear2_values(bits: int) -> list[float]:
    """Linear-2: d = linspace(-1, 1, 2**b), d[2**(b-1) - 1] = 0, value = sign(d) * d**2."""
    return _power_values(bits, 2.0)


def linear15_values(bits: int) -> list[float]:
    """Linear-1.5: the same grid, value = sign(d) * |d|**1.5."""
    return _power_values(bits, 1.5)


def dynamic_values(bits: int) -> list[float]:
    """Signed dynamic tree: level i holds 2**i fractions in (0.1, 1) scaled by 10**(i - E + 1).

    With E = bits - 1 exponent levels this gives 2**bits - 2 signed values plus 0 and 1.
    """
    levels = bits - 1
    values = [0.0, 1.0]
    for i in range(levels):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float64)
        means = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - levels + 1)
        values += means.tolist() + (-means).tolist()
    return sorted(values)


def linear_values(bits: int) -> list[float]:
    """A uniform grid on [-1, 1] (no exact zero for an even number of points)."""
    return torch.linspace(-1.0, 1.0, 2**bits, dtype=torch.float64).tolist()


_MAKERS = {"linear2": linear2_values, "linear1.5": linear15_values, "dynamic": dynamic_values, "linear": linear_values}


_CACHE: dict[tuple, torch.Tensor] = {}


def get_codebook(name: str = "linear2", bits: int = 4, device: torch.device | str | None = None) -> torch.Tensor:
    """The sorted fp32 codebook ``name`` for ``bits`` bits on ``device`` (cached, do not modify).

    A plain dict lookup once cached, so ``torch.compile`` reads the cached tensor instead of
    tracing how it was made (which would break its graph)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    key = (name, bits, device.type, device.index)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    _check(name, bits)
    if device.type == "cpu":
        values = _CACHE[key] = torch.tensor(sorted(_MAKERS[name](bits)), dtype=torch.float32)
    else:
        values = _CACHE[key] = get_codebook(name, bits, "cpu").to(device)
    return values


def midpoints(codebook: torch.Tensor) -> torch.Tensor:
    """Decision boundaries between neighbouring codebook values (fp32, len - 1 of them).

    A normalized value v gets the index ``sum(v > midpoints)``: nearest value, ties to the lower.
    """
    return (codebook[:-1] + codebook[1:]) / 2
