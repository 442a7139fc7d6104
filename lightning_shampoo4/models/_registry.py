"""Model registry: builder functions registered by name, and the factory that calls them.

A builder has the signature ``fn(num_classes, in_chans, img_size, width, **kwargs) -> nn.Module``;
``width`` scales channel / embedding widths (1.0 = the standard size). Names with the prefix
``timm:`` are built by timm instead, which is imported only then.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable

from torch import nn

__all__ = ["TIMM_PREFIX", "UnknownModelError", "create_model", "list_models", "register_model"]

ModelBuilder = Callable[..., nn.Module]

TIMM_PREFIX = "timm:"

_MODELS: dict[str, ModelBuilder] = {}


class UnknownModelError(ValueError, KeyError):
    """No model is registered under the requested name (both a ValueError and a KeyError)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def register_model(fn: ModelBuilder | str | None = None, *, name: str | None = None) -> Any:
    """Register a model builder under ``name`` (default: the function's ``__name__``).

    Use as ``@register_model``, ``@register_model("my_net")`` or ``@register_model(name="my_net")``.
    Registering a name twice raises ValueError, so one module cannot silently shadow another
    (re-registering the same function, e.g. on a module reload, just replaces it).
    """
    if isinstance(fn, str):
        fn, name = None, fn

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        model_name = name or builder.__name__
        if model_name.startswith(TIMM_PREFIX):
            raise ValueError(f"model names may not start with {TIMM_PREFIX!r}: {model_name!r}")
        existing = _MODELS.get(model_name)
        if existing is not None and not _same_definition(existing, builder):
            raise ValueError(f"a model named {model_name!r} is already registered by {existing.__module__}")
        _MODELS[model_name] = builder
        return builder

    return decorator(fn) if fn is not None else decorator


def _same_definition(a: ModelBuilder, b: ModelBuilder) -> bool:
    """Whether two builders are the same source definition (true across a module reload)."""
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered model names, optionally filtered by an fnmatch ``pattern`` (e.g. ``"vit_*"``)."""
    names = sorted(_MODELS)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def create_model(
    name: str,
    num_classes: int = 10,
    in_chans: int = 3,
    img_size: int = 32,
    width: float = 1.0,
    **kwargs: Any,
) -> nn.Module:
    """Build the model registered as ``name``; extra ``kwargs`` go to the model (e.g. ``drop_path_rate``).

    ``"timm:<name>"`` builds ``<name>`` with ``timm.create_model`` (random init). An unknown name
    raises :class:`UnknownModelError` listing the closest and all registered names.
    """
    if name.startswith(TIMM_PREFIX):
        return _create_timm_model(name[len(TIMM_PREFIX) :], num_classes, in_chans, img_size, width, **kwargs)
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    builder = _MODELS.get(name)
    if builder is None:
        raise UnknownModelError(_unknown_model_message(name))
    return builder(num_classes=num_classes, in_chans=in_chans, img_size=img_size, width=width, **kwargs)


def _unknown_model_message(name: str) -> str:
    names = list_models()
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return (
        f"Unknown model {name!r}.{hint} Available models: {', '.join(names)}. "
        f"Use the prefix {TIMM_PREFIX!r} for a timm model."
    )


def _create_timm_model(
    name: str, num_classes: int, in_chans: int, img_size: int, width: float, **kwargs: Any
) -> nn.Module:
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"create_model({TIMM_PREFIX + name!r}) needs timm: pip install timm") from err
    if width != 1.0:
        raise ValueError(f"width scaling is not supported for timm models (got width={width})")
    common = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    try:
        # Transformers need img_size for their position embeddings ...
        return timm.create_model(name, img_size=img_size, **common)
    except TypeError as err:
        # ... while conv nets do not accept it.
        if "img_size" not in str(err):
            raise
        return timm.create_model(name, **common)
