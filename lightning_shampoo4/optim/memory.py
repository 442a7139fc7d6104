"""Exact accounting of optimizer-state bytes by kind, from the state keys themselves."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .state_keys import StateKey

KINDS = ("moments", "eigenvectors", "eigenvalues", "factors", "roots", "scales", "other")
SECOND_ORDER = ("eigenvectors", "eigenvalues", "factors", "roots", "scales")

_MOMENTS = ("exp_avg", "momentum_buffer")  # with their codes and scales when quantized
# entry name prefixes; in cholesky mode ``chol_*`` and its error-feedback state ``ef_*`` hold the statistic
_PREFIXES = (("eigvecs", "eigenvectors"), ("eigvals", "eigenvalues"), ("factor", "factors"), ("chol", "factors"),
             ("ef_", "factors"), ("root", "roots"))


def kind_of(key: str) -> str:
    """The kind of a state entry (``"0.L.root_codes"`` -> ``"roots"``)."""
    name = StateKey.parse(key).name
    if name.startswith(_MOMENTS):
        return "moments"
    if name.endswith("_absmax"):
        return "scales"
    for prefix, kind in _PREFIXES:
        if name.startswith(prefix):
            return kind
    return "other"


def memory_report(states: Iterable[Mapping[str, object]]) -> dict[str, int]:
    """Bytes of every tensor in ``states`` by kind, plus ``second_order`` and ``total``."""
    report = dict.fromkeys(KINDS, 0)
    for state in states:
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                report[kind_of(key)] += value.numel() * value.element_size()
    report["second_order"] = sum(report[k] for k in SECOND_ORDER)
    report["total"] = sum(report[k] for k in KINDS)
    return report
