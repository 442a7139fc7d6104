"""lightning_shampoo4: 4-bit Shampoo for PyTorch and PyTorch Lightning.

Where things are:

* :class:`Shampoo4bit` (``optim/``): the optimizer; depends on torch only. :class:`SOAP4bit`
  (``optim/soap.py``): Adam in Shampoo's eigenbasis, its eigenvector matrices at 4 bits. Every
  argument of both is declared once, in ``optim/settings.py``.
* ``quant/``: codebooks and block-wise quantization (the pure-torch reference).
* ``linalg``: Björck, subspace iteration, inverse roots.
* ``kernels/``: the dispatcher the optimizer calls; Triton kernels for CUDA, and C kernels
  (``kernels/cpu.py``, compiled on first use) that store and rebuild symmetric matrices on the CPU.
* :func:`configure_shampoo` / :func:`configure_soap` (``configure.py``): optimizer + parameter
  groups + schedule for a LightningModule's ``configure_optimizers``.
* ``callbacks/``: :class:`PreconditionerSchedule`, :class:`QuantizedStateMonitor`,
  :class:`ShampooPrecision`.
* ``models/``, ``data/``, ``recipes/``, ``cli.py``: the recipe registry and the
  ``lightning-shampoo4`` command.

Importing the package (or ``lightning_shampoo4.optim``) loads torch only: the optimizer and
``configure`` are imported here, the Lightning-facing names on first use. LightningCLI resolves
short class names (``--optimizer Shampoo4bit``, ``--optimizer SOAP4bit``, ``--trainer.callbacks+=QuantizedStateMonitor``)
only for classes that have been imported, so the callbacks are imported as soon as Lightning's
CLI is: right here if ``lightning.pytorch.cli`` is already loaded, else right after it is
first imported (a ``sys.meta_path`` hook that watches for that one module).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

from .configure import GroupedShampoo4bit, configure_optimizer, configure_shampoo, configure_soap, shampoo_param_groups
from .optim import SOAP4bit, Shampoo4bit

__version__ = "0.3.0"

# Lightning-facing names, imported on first access (PEP 562): name -> submodule.
_LAZY = {
    "PreconditionerSchedule": "callbacks",
    "QuantizedStateMonitor": "callbacks",
    "ShampooPrecision": "callbacks",
    "ImageClassifier": "module",
    "get_recipe": "recipes",
    "list_recipes": "recipes",
    "register_recipe": "recipes",
    "UnsupportedStrategyError": "optim",
}

__all__ = [
    "GroupedShampoo4bit",
    "ImageClassifier",
    "PreconditionerSchedule",
    "QuantizedStateMonitor",
    "SOAP4bit",
    "Shampoo4bit",
    "ShampooPrecision",
    "UnsupportedStrategyError",
    "__version__",
    "configure_optimizer",
    "configure_shampoo",
    "configure_soap",
    "get_recipe",
    "list_recipes",
    "register_recipe",
    "shampoo_param_groups",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# -- LightningCLI short names -------------------------------------------------------------
_LIGHTNING_CLI = "lightning.pytorch.cli"


def _import_callbacks() -> None:
    """Import the callbacks so LightningCLI finds them by class name; never break the caller's import."""
    try:
        importlib.import_module(f"{__name__}.callbacks")
    except Exception as err:  # noqa: BLE001 - only short names are lost; full class paths still work
        warnings.warn(
            f"lightning_shampoo4: could not import the callbacks ({err!r}); with LightningCLI give their full "
            "class path, e.g. lightning_shampoo4.callbacks.QuantizedStateMonitor",
            stacklevel=2,
        )


class _ThenImportCallbacks:
    """Loader wrapper: runs the real loader, then imports the callbacks."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _stop_watching()
        _import_callbacks()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _LightningCLIWatcher:
    """``sys.meta_path`` finder that only reacts to ``lightning.pytorch.cli``: it finds the module
    with the other finders and wraps its loader in :class:`_ThenImportCallbacks`."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _LIGHTNING_CLI:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenImportCallbacks(spec.loader)
                return spec
        return None


def _is_watcher(finder: Any) -> bool:
    """By name, so that a reloaded package still recognises the watcher it installed before."""
    return type(finder).__name__ == _LightningCLIWatcher.__name__ and type(finder).__module__ == __name__


def _stop_watching() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not _is_watcher(f)]


def _register_callbacks_for_lightning_cli() -> None:
    if _LIGHTNING_CLI in sys.modules:
        _import_callbacks()
    elif not any(_is_watcher(f) for f in sys.meta_path):
        sys.meta_path.insert(0, _LightningCLIWatcher())


_register_callbacks_for_lightning_cli()
