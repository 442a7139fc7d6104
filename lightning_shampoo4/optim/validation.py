"""Checks of hyper-parameters, derived from the settings table (:mod:`.settings`).

Kept for the names earlier versions exported; new code reads :data:`.settings.SHAMPOO_SETTINGS`.
"""

from __future__ import annotations

from .settings import SHAMPOO_SETTINGS, STORAGE_TUNED, STORAGE_UNTUNED

__all__ = ["FORMAT_KEYS", "STORAGE_DEFAULTS", "STORAGE_FALLBACK", "validate_group"]

# Settings that fix how the state is stored: frozen once a parameter has state.
FORMAT_KEYS = SHAMPOO_SETTINGS.format_keys

# The tuned storage settings by the pre-0.3 name of the default storage, and the others'.
STORAGE_DEFAULTS = {"cholesky8": STORAGE_TUNED}
STORAGE_FALLBACK = STORAGE_UNTUNED


def validate_group(g: dict, *, resolve: bool = True) -> None:
    """Validate one parameter group of :class:`~.shampoo.Shampoo4bit` in place (ValueError)."""
    SHAMPOO_SETTINGS.validate(g, resolve=resolve)
