"""Recipe registry: builders registered by name, looked up with type-checked overrides.

``get_recipe(name)`` calls the registered builder for a fresh :class:`Recipe`, then merges any
overrides through an OmegaConf structured config, so a wrong key or a wrongly typed value fails
at once with the closest valid keys suggested.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import Recipe, RecipeError, suggest

__all__ = ["DEFAULT_RECIPE", "apply_overrides", "get_recipe", "list_recipes", "register_recipe", "valid_keys"]

RecipeBuilder = Callable[[], Recipe]

DEFAULT_RECIPE = "digits_cnn"

_RECIPES: dict[str, RecipeBuilder] = {}

Overrides = Union[Sequence[str], Mapping[str, Any], None]


def register_recipe(fn: RecipeBuilder | Recipe | str | None = None, *, name: str | None = None) -> Any:
    """Register a recipe builder (a function returning a :class:`Recipe`) under ``name``.

    Use as ``@register_recipe`` (name = the function's name), ``@register_recipe("my_recipe")``,
    or call ``register_recipe(recipe)`` with a ready :class:`Recipe` (name = ``recipe.name``; a
    copy is kept). Taking the name of a function-registered recipe raises ValueError.
    """
    if isinstance(fn, str):
        fn, name = None, fn
    if isinstance(fn, Recipe):
        frozen = copy.deepcopy(fn)
        recipe_name = name or frozen.name

        def builder() -> Recipe:
            return copy.deepcopy(frozen)

        builder.__module__, builder.__qualname__ = "<instance>", recipe_name
        _add(recipe_name, builder)
        return fn

    def decorator(builder: RecipeBuilder) -> RecipeBuilder:
        _add(name or builder.__name__, builder)
        return builder

    return decorator(fn) if fn is not None else decorator


def _add(name: str, builder: RecipeBuilder) -> None:
    """Store ``builder``; the same definition again (a module reload, an instance re-registered) replaces it."""
    existing = _RECIPES.get(name)
    same = existing is not None and (existing.__module__, existing.__qualname__) == (builder.__module__, builder.__qualname__)
    if existing is not None and not same:
        raise ValueError(f"a recipe named {name!r} is already registered by {existing.__module__}")
    _RECIPES[name] = builder


_GLOB_CHARS = frozenset("*?[")


def list_recipes(pattern: str | None = None) -> list[str]:
    """Sorted recipe names, optionally filtered by ``pattern``: an fnmatch pattern when it has a
    wildcard (``"*_cifar100"``), else a case-insensitive substring (``"vit"``, ``"cifar10"``)."""
    names = sorted(_RECIPES)
    if not pattern:
        return names
    if _GLOB_CHARS & set(pattern):
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return [n for n in names if pattern.lower() in n.lower()]


def get_recipe(name: str = DEFAULT_RECIPE, overrides: Overrides = None, **kwargs: Any) -> Recipe:
    """A fresh copy of the recipe ``name``, with overrides applied and every value type-checked.

    Overrides come in three equivalent spellings (all may be combined; later ones win):

    * ``overrides=["optimizer.bits=32", "trainer.max_epochs=1"]``: dotlist strings, values read as YAML;
    * ``overrides={"optimizer.bits": 32}`` or ``{"optimizer": {"bits": 32}}``: a mapping;
    * keyword arguments: ``get_recipe(name, trainer={"max_epochs": 1}, **{"optimizer.bits": 32})``.

    A mapping given for a section (``optimizer={"bits": 32}``) changes only the fields it names; one
    given for a free-form dict (``data.kwargs``, ``model.arch_kwargs``) replaces it, while a dotted
    key (``data.kwargs.batch_size=32``) changes one entry.

    Unknown names and keys raise :class:`RecipeError` suggesting the closest valid ones.
    """
    builder = _RECIPES.get(name)
    if builder is None:
        names = list_recipes()
        raise RecipeError(f"unknown recipe {name!r}.{suggest(name, names)} Available recipes: {', '.join(names)}")
    recipe = builder()
    if not isinstance(recipe, Recipe):
        raise TypeError(f"the builder of recipe {name!r} returned {type(recipe).__name__}, not a Recipe")
    recipe.name = name
    return apply_overrides(recipe, overrides, kwargs)


def apply_overrides(recipe: Recipe, *sources: Overrides) -> Recipe:
    """A new :class:`Recipe`: ``recipe`` with each source of overrides merged in order (see :func:`get_recipe`).

    The result always passes through OmegaConf, so the builder's own values are type-checked too.
    """
    pairs = [pair for source in sources for pair in _pairs(source)]
    for key, _ in pairs:
        check_key(key)
    try:
        cfg = OmegaConf.structured(recipe)
        for key, value in pairs:
            # Lists are replaced either way, but only merging turns their dicts into typed entries.
            OmegaConf.update(cfg, key, value, merge=isinstance(value, (list, tuple)))
        result = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise RecipeError(_omegaconf_message(err)) from None
    assert isinstance(result, Recipe)
    return result


def _pairs(source: Overrides) -> list[tuple[str, Any]]:
    """(dotted key, value) pairs from a dotlist or a (nested) mapping, recipe sections expanded."""
    if source is None:
        return []
    if isinstance(source, str):
        source = [source]
    raw: list[tuple[str, Any]] = []
    if isinstance(source, Mapping):
        raw = [(str(k), v) for k, v in source.items()]
    else:
        for item in source:
            if not isinstance(item, str) or "=" not in item:
                raise RecipeError(f"an override must look like 'key=value' (e.g. 'optimizer.bits=32'), got {item!r}")
            key = item.split("=", 1)[0].strip()
            check_key(key)
            value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)  # OmegaConf's value grammar
            raw.append((key, OmegaConf.to_container(value) if OmegaConf.is_config(value) else value))
    return [pair for key, value in raw for pair in _expand(key, value)]


def _expand(key: str, value: Any) -> list[tuple[str, Any]]:
    """A mapping given for a recipe section (``optimizer={...}``) becomes one pair per field, so
    the section's other fields keep their values; any other value is set as a whole."""
    if isinstance(value, Mapping) and dataclasses.is_dataclass(_unwrap(check_key(key))):
        return [pair for k, v in value.items() for pair in _expand(f"{key}.{k}", v)]
    return [(key, value)]


def _unwrap(tp: Any) -> Any:
    """Optional[X] -> X."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is Union and len(args) == 1 else tp


def valid_keys(cls: Any = Recipe, prefix: str = "") -> list[str]:
    """Every settable dotted key of the recipe schema (sections and fields)."""
    keys = []
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        keys.append(path)
        tp = _unwrap(typing.get_type_hints(cls)[f.name])
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, path + ".")
    return keys


def check_key(key: str) -> Any:
    """The type of the recipe field ``key``; RecipeError if there is no such field (the keys inside
    dict fields such as ``data.kwargs`` are free, and typed ``Any``)."""
    node: Any = Recipe
    parts = key.split(".")
    for i, part in enumerate(parts):
        tp = _unwrap(node)
        origin = typing.get_origin(tp)
        if origin in (dict, Mapping) or tp is Any:
            return Any  # free-form kwargs
        if origin is list and part.isdigit():
            node = typing.get_args(tp)[0]
            continue
        if dataclasses.is_dataclass(tp) and part in {f.name for f in dataclasses.fields(tp)}:
            node = typing.get_type_hints(tp)[part]
            continue
        where = ".".join(parts[:i]) or "the recipe"
        raise RecipeError(
            f"unknown recipe key {key!r}: {where} has no field {part!r}.{suggest(key, valid_keys(), n=3)}"
        )
    return node


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    """OmegaConf's message without its object_type line, led by the key it is about."""
    text = str(err).split("\n")[0].strip()
    full_key = getattr(err, "full_key", None)
    if full_key:
        try:
            tp = _unwrap(check_key(str(full_key)))
        except RecipeError:
            tp = None
        if typing.get_origin(tp) is Literal:
            text += suggest(getattr(err, "value", ""), typing.get_args(tp))
    return f"invalid recipe value for {full_key!r}: {text}" if full_key else f"invalid recipe override: {text}"
