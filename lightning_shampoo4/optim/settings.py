"""Every optimizer setting, declared once; validation, checkpoint format, recipes, CLI and docs
are derived from the declaration.

An optimizer declares its constructor arguments (after ``params``) as a :class:`SettingsTable`
of :class:`Setting` rows: name, default, allowed values (which give the type a recipe or the
command line checks), whether it fixes how the state is stored (``format=True``: frozen once a
parameter has state, and checked when a checkpoint is loaded), whether it is per parameter group
or optimizer-wide, and one line of documentation. From the table come:

* :meth:`SettingsTable.validate`: the checks of a parameter group (ValueError naming the setting);
* :attr:`SettingsTable.format_keys`, :attr:`SettingsTable.group_keys`: what a group and a
  checkpoint hold;
* :meth:`SettingsTable.defaults`: the constructor's defaults (a test compares them with the
  signature);
* the recipes' ``optimizer`` section and so the command line's ``--optimizer.*`` flags
  (:mod:`lightning_shampoo4.recipes.config` builds one dataclass field per setting);
* :meth:`SettingsTable.markdown`: the settings table of ``docs/algorithms.md``.

Another optimizer plugs in by declaring its own table, usually reusing rows of this module
(:data:`BASE_SETTINGS` for the AdamW / SGD update, :data:`STORAGE_SETTINGS` for the quantized
matrices), and registering it::

    SOAP_SETTINGS = register(SettingsTable(
        "SOAP4bit", "lightning_shampoo4.optim.soap.SOAP4bit",
        (*BASE_SETTINGS, Setting.integer("precondition_frequency", 10, "steps between ...", low=1), ...),
        checks=(...),
    ))

Its constructor then calls ``SOAP_SETTINGS.validate(defaults, resolve=False)`` on its defaults and
``SOAP_SETTINGS.validate(group)`` on each group, and the class sets ``SETTINGS = SOAP_SETTINGS``
(the checkpoint loader and the command line's summary read it). :data:`OPTIMIZERS` lists the
registered tables; the recipes (``optimizer.variant``: the table's ``variants``, or one named
after the optimizer, ``soap4bit``), ``configure_optimizer`` and the docs tables
(``python -m lightning_shampoo4.optim.settings docs/algorithms.md``) take the optimizers from there.

Numbers may be Python, numpy or 0-dim torch scalars; they are stored back as Python ``float`` /
``int`` so the step reads plain numbers. Every real number must be finite.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from ..kernels import BACKENDS
from ..quant import CODEBOOKS

__all__ = [
    "BASE_SETTINGS",
    "OPTIMIZERS",
    "SHAMPOO_SETTINGS",
    "STORAGES",
    "STORAGE_SETTINGS",
    "STORAGE_TUNED",
    "STORAGE_UNTUNED",
    "Setting",
    "SettingsTable",
    "register",
    "storage_defaults",
]


# -- value checks -------------------------------------------------------------------------------
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


def _choice(name: str, value, allowed) -> Any:
    value = _scalar(value)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {tuple(allowed)}")
    return value


def _flag(name: str, value) -> bool:
    return bool(_choice(name, value, (False, True)))


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


# -- the declaration ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One constructor argument of an optimizer.

    Attributes:
        name: the argument, the parameter-group key and the recipe key.
        default: the constructor's default.
        doc: one line for docstrings, recipe help and the docs table.
        annotation: the type recipes and the command line check (``Literal`` for choices).
        check: ``check(name, value) -> value``: raises ValueError, returns the normalized value.
        format: fixes how the state is stored: frozen once a parameter has state.
        per_group: False for optimizer-wide settings (not in parameter groups).
        resolve: what ``None`` means, from the (already checked) group; None: ``None`` is kept.
        deprecated: a renamed setting: ``deprecated(group)`` moves its value to the new keys (and
            warns); it is then removed from the group.
    """

    name: str
    default: Any
    doc: str
    annotation: Any
    check: Callable[[str, Any], Any]
    format: bool = False
    per_group: bool = True
    resolve: Callable[[Mapping[str, Any]], Any] | None = None
    deprecated: Callable[[dict[str, Any]], None] | None = None

    # -- constructors by kind --------------------------------------------------------------
    @classmethod
    def choice(cls, name: str, default: Any, choices: Iterable[Any], doc: str, **kw: Any) -> Setting:
        """One of ``choices`` (None among them: optional)."""
        choices = tuple(choices)
        values = tuple(c for c in choices if c is not None)
        tp: Any = bool if set(values) == {False, True} else Literal[values]  # type: ignore[valid-type]
        if None in choices:
            tp = Optional[tp]
        return cls(name, default, doc, tp, lambda n, v: _choice(n, v, choices), **kw)

    @classmethod
    def flag(cls, name: str, default: bool, doc: str, **kw: Any) -> Setting:
        return cls(name, default, doc, bool, _flag, **kw)

    @classmethod
    def number(cls, name: str, default: float, doc: str, low: float, high: float | None = None, *,
               low_open: bool = False, high_open: bool = True, **kw: Any) -> Setting:
        return cls(name, default, doc, float,
                   lambda n, v: _number(n, v, low, high, low_open=low_open, high_open=high_open), **kw)

    @classmethod
    def integer(cls, name: str, default: int | None, doc: str, low: int, *, optional: bool = False,
                **kw: Any) -> Setting:
        def check(n: str, v: Any) -> Any:
            return None if optional and v is None else _integer(n, v, low)

        return cls(name, default, doc, Optional[int] if optional else int, check, **kw)

    @property
    def choices(self) -> tuple[Any, ...] | None:
        """The allowed values of a choice (None for numbers)."""
        tp, optional = self.annotation, False
        if getattr(tp, "__origin__", None) is not Literal and hasattr(tp, "__args__"):
            args = [a for a in tp.__args__ if a is not type(None)]
            optional = len(args) < len(tp.__args__)
            tp = args[0] if len(args) == 1 else tp
        if getattr(tp, "__origin__", None) is Literal:
            return tuple(tp.__args__) + ((None,) if optional else ())
        return (False, True) if tp is bool else None


@dataclass(frozen=True)
class SettingsTable:
    """The settings of one optimizer, in constructor order, and the checks that span several.

    Attributes:
        optimizer: the class name (``"Shampoo4bit"``).
        class_path: its import path.
        settings: the rows.
        checks: ``check(group)``, run after every row's check on a group (raise ValueError).
        label: ``label(settings) -> str``: a short human name of a configuration (``settings``:
            the constructor's arguments, any left out at their defaults).
        variants: the recipes' ``optimizer.variant`` names that build this optimizer, each with
            the settings it implies unless the recipe sets them (``{}``: the optimizer's defaults).
    """

    optimizer: str
    class_path: str
    settings: tuple[Setting, ...]
    checks: tuple[Callable[[dict[str, Any]], None], ...] = ()
    label: Callable[[Mapping[str, Any]], str] | None = field(default=None, compare=False)
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        names = [s.name for s in self.settings]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.optimizer}: a setting is declared twice in {names}")

    def __getitem__(self, name: str) -> Setting:
        for s in self.settings:
            if s.name == name:
                return s
        raise KeyError(name)

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.settings)

    @functools.cached_property
    def group_keys(self) -> tuple[str, ...]:
        """The keys every parameter group holds once validated (no deprecated, no optimizer-wide ones)."""
        return tuple(s.name for s in self.settings if s.per_group and s.deprecated is None)

    @functools.cached_property
    def format_keys(self) -> tuple[str, ...]:
        """The settings that fix how the state is stored: frozen once a parameter has state."""
        return tuple(s.name for s in self.settings if s.format)

    def defaults(self) -> dict[str, Any]:
        """Every setting's default, by name (constructor order)."""
        return {s.name: s.default for s in self.settings}

    def describe(self, settings: Mapping[str, Any]) -> str:
        """A short human name of the optimizer with ``settings`` (the rest at their defaults)."""
        full = self.defaults() | dict(settings)
        return self.label(full) if self.label is not None else self.optimizer

    def optimizer_class(self) -> type:
        """The optimizer class (imported on first use)."""
        import importlib

        module, _, name = self.class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def validate(self, group: dict[str, Any], *, resolve: bool = True) -> None:
        """Check one parameter group's settings in place (raises ValueError naming the setting).

        Deprecated settings are translated first (and removed). ``resolve``: replace a ``None``
        by what it means for this group (e.g. the storage's tuned block sizes), so a group and
        its checkpoint hold what its state was stored with; the optimizer's ``defaults`` keep
        ``None`` so that each group resolves its own."""
        for s in self.settings:
            if s.deprecated is not None and group.get(s.name) is not None:
                s.deprecated(group)
            if s.deprecated is not None:
                group.pop(s.name, None)
        for s in self.settings:
            if not s.per_group or s.deprecated is not None or s.name not in group:
                continue
            value = group[s.name]
            if value is None and s.resolve is not None:
                if not resolve:
                    continue
                value = s.resolve(group)
            group[s.name] = s.check(s.name, value)
        for check in self.checks:
            check(group)

    def markdown(self) -> str:
        """The settings as a Markdown table (name, default, allowed values, stored format, meaning)."""
        rows = ["| setting | default | allowed | format | meaning |", "|---|---|---|---|---|"]
        for s in self.settings:
            allowed = s.choices
            allowed_text = ", ".join(f"`{c!r}`" for c in allowed) if allowed is not None else _type_name(s.annotation)
            rows.append(
                f"| `{s.name}` | `{s.default!r}` | {allowed_text} | {'yes' if s.format else ''} | "
                f"{s.doc.replace('|', '/')} |"
            )
        return "\n".join(rows)


def _type_name(tp: Any) -> str:
    if getattr(tp, "__args__", None):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


OPTIMIZERS: dict[str, SettingsTable] = {}
"""The registered optimizers' tables, by class name."""


def register(table: SettingsTable) -> SettingsTable:
    """Add ``table`` to :data:`OPTIMIZERS` (the same optimizer again replaces it); returns it."""
    OPTIMIZERS[table.optimizer] = table
    return table


# -- the base optimizer's settings (AdamW / SGD), shared by every optimizer here ----------------
def _check_betas(name: str, value: Any) -> tuple[float, float]:
    b1, b2 = _pair(name, value, "(beta1, beta2), each in [0, 1)")
    return (_number(f"{name}[0]", b1, 0.0, 1.0), _number(f"{name}[1]", b2, 0.0, 1.0))


BASE_SETTINGS: tuple[Setting, ...] = (
    Setting.number("lr", 1e-3, "learning rate of the base optimizer", 0.0),
    Setting("betas", (0.9, 0.999), "AdamW moment coefficients", tuple[float, float], _check_betas),
    Setting.number("eps", 1e-8, "AdamW denominator epsilon", 0.0),
    Setting.number("weight_decay", 0.0, "decoupled (AdamW) or coupled L2 (SGD) weight decay", 0.0),
    Setting.number("momentum", 0.9, "SGD momentum", 0.0, 1.0),
    Setting.flag("nesterov", False, "Nesterov momentum for SGD"),
    Setting.choice("base", "adamw", ("adamw", "sgd"),
                   "the first-order optimizer fed with the preconditioned gradient", format=True),
)


def check_nesterov(group: dict[str, Any]) -> None:
    if group["nesterov"] and group["base"] == "sgd" and group["momentum"] <= 0:
        raise ValueError("nesterov=True needs momentum > 0")


# -- how quantized matrices are stored ----------------------------------------------------------
STORAGES = ("cholesky", "eigenvectors", "naive")
"""What a Kronecker factor keeps (``storage=``); ``bits=32`` keeps fp32 matrices whatever it is."""

# What ``None`` means for the codebook / block sizes. The default storage (the Cholesky factor
# with 8-bit codes and no error feedback) keeps one scale per factor column (up to 1200 entries)
# and its 4-bit root in blocks of 40, both with the Linear-1.5 map: at no more bytes than the
# eigenvector storage, the preconditioned direction stays closest to the exact one
# (benchmarks/drift.py; docs/algorithms.md). The other storages keep the paper's values.
STORAGE_TUNED = dict(codebook="linear1.5", block_size=1200, root_block_size=40)
STORAGE_UNTUNED = dict(codebook="linear2", block_size=64, root_block_size=256)


def storage_defaults(group: Mapping[str, Any]) -> dict[str, Any]:
    """The codebook and block sizes ``None`` stands for in ``group`` (its storage settings resolved)."""
    tuned = group["storage"] == "cholesky" and group["statistic_bits"] == 8 and not group["error_feedback"]
    return dict(STORAGE_TUNED if tuned else STORAGE_UNTUNED)


def _statistic_bits(group: Mapping[str, Any]) -> int:
    bits = _scalar(group["bits"])
    if bits == 32:
        return 32
    return 8 if group["storage"] == "cholesky" else bits


def _error_feedback(group: Mapping[str, Any]) -> bool:
    return group["storage"] == "cholesky" and group["statistic_bits"] == 4


# The ``quantize`` values of 0.2.0 in today's terms (``statistic_bits=None``: the group's ``bits``).
QUANTIZE_RENAMES: dict[str, dict[str, Any]] = {
    "cholesky8": dict(storage="cholesky", statistic_bits=8, error_feedback=False),
    "cholesky": dict(storage="cholesky", statistic_bits=None, error_feedback=True),
    "eigenvectors": dict(storage="eigenvectors", statistic_bits=None, error_feedback=False),
    "preconditioner": dict(storage="naive", statistic_bits=None, error_feedback=False),
}


def quantize_to_storage(quantize: str, bits: Any) -> dict[str, Any]:
    """The ``storage`` / ``statistic_bits`` / ``error_feedback`` of a ``quantize`` value of 0.2.0."""
    new = dict(QUANTIZE_RENAMES[_choice("quantize", quantize, tuple(QUANTIZE_RENAMES))])
    bits = _scalar(bits)
    if new["statistic_bits"] is None or bits == 32:
        new["statistic_bits"] = bits
    return new


def _translate_quantize(group: dict[str, Any]) -> None:
    new = quantize_to_storage(group["quantize"], group.get("bits", 4))
    spelled = ", ".join(f"{k}={v!r}" for k, v in new.items())
    warnings.warn(
        f"quantize={group['quantize']!r} is deprecated and will be removed in the next release; "
        f"write {spelled} instead",
        DeprecationWarning,
        stacklevel=4,
    )
    group.update(new)


STORAGE_SETTINGS: tuple[Setting, ...] = (
    Setting.choice("bits", 4, (4, 8, 32),
                   "bits of the stored inverse root (and eigenvectors); 32: fp32 Shampoo, nothing quantized",
                   format=True),
    Setting.choice("moment_bits", 32, (4, 8, 32),
                   "storage of the base optimizer's moments: 32 (the parameter's dtype), 8 or 4", format=True),
    Setting.choice("storage", "cholesky", STORAGES,
                   "what each Kronecker factor keeps: its Cholesky factor, its eigenvectors (the paper's "
                   "4-bit Shampoo) or the statistic itself (the naive baseline)", format=True),
    Setting.choice("statistic_bits", None, (None, 4, 8, 32),
                   "bits of the stored statistic (Cholesky factor, eigenvectors or naive statistic); "
                   "None: 8 for cholesky, else bits", format=True, resolve=_statistic_bits),
    Setting.choice("error_feedback", None, (None, False, True),
                   "carry the Cholesky factor's rounding error into the next update; None: on at a "
                   "4-bit statistic", format=True, resolve=_error_feedback),
    Setting.choice("codebook", None, (None, *CODEBOOKS),
                   "the quantization map; None: linear1.5 for the default storage, linear2 otherwise",
                   format=True, resolve=lambda g: storage_defaults(g)["codebook"]),
    Setting.integer("block_size", None,
                    "elements per quantization block of an eigenvector or a Cholesky column; None: 1200 "
                    "for the default storage, 64 otherwise", 1, optional=True, format=True,
                    resolve=lambda g: storage_defaults(g)["block_size"]),
    Setting.integer("root_block_size", None,
                    "elements per quantization block of a stored inverse root (and a naive statistic); "
                    "None: 40 for the default storage, 256 otherwise", 1, optional=True, format=True,
                    resolve=lambda g: storage_defaults(g)["root_block_size"]),
    Setting.choice("scale_dtype", "bfloat16", ("bfloat16", "float16", "float32"),
                   "dtype of the per-block scales", format=True),
    Setting.integer("min_quant_numel", 4096, "factors with fewer elements stay fp32", 0, format=True),
)


def check_storage(group: dict[str, Any]) -> None:
    """The storage settings that only make sense together."""
    bits, sbits, storage = group["bits"], group["statistic_bits"], group["storage"]
    if sbits is None:  # unresolved (the optimizer's defaults)
        return
    if (bits == 32) != (sbits == 32):
        raise ValueError(
            f"statistic_bits={sbits!r} with bits={bits!r}: fp32 Shampoo (bits=32) keeps an fp32 statistic and "
            "a quantized one needs bits 4 or 8; leave statistic_bits=None"
        )
    if group["error_feedback"] and storage != "cholesky":
        raise ValueError(f"error_feedback=True needs storage='cholesky' (got storage={storage!r})")


def _shampoo_label(s: Mapping[str, Any]) -> str:
    """``4-bit Shampoo (cholesky, 8-bit statistic)``, ``4-bit Shampoo (eigenvectors)``, ``32-bit Shampoo``, ..."""
    if s["bits"] == 32:
        return "32-bit Shampoo"
    resolved = dict(s)
    if resolved.get("quantize") is not None:
        resolved.update(quantize_to_storage(resolved["quantize"], resolved["bits"]))
    if resolved.get("statistic_bits") is None:
        resolved["statistic_bits"] = _statistic_bits(resolved)
    if resolved.get("error_feedback") is None:
        resolved["error_feedback"] = _error_feedback(resolved)
    detail = resolved["storage"]
    if resolved["statistic_bits"] != s["bits"]:
        detail += f", {resolved['statistic_bits']}-bit statistic"
    if resolved["error_feedback"]:
        detail += ", error feedback"
    return f"{s['bits']}-bit Shampoo ({detail})"


def _root_interval(group: dict[str, Any]) -> None:
    if group["root_interval"] % group["stat_interval"]:
        raise ValueError(
            f"root_interval={group['root_interval']} must be a multiple of stat_interval={group['stat_interval']}"
        )


def _check_bjorck(name: str, value: Any) -> tuple[int, int]:
    steps = _pair(name, value, "of integers >= 0 (statistics, roots)")
    return tuple(_integer(name, s, 0) for s in steps)  # type: ignore[return-value]


def _distributed(name: str, value: Any) -> str:
    if isinstance(_scalar(value), bool):  # YAML reads a bare ``off`` as False
        value = "auto" if value else "off"
    return _choice(name, value, ("auto", "off"))


SHAMPOO_SETTINGS = register(SettingsTable(
    "Shampoo4bit",
    "lightning_shampoo4.optim.Shampoo4bit",
    (
        *BASE_SETTINGS,
        *STORAGE_SETTINGS,
        Setting.choice("quantize", None, (None, *QUANTIZE_RENAMES),
                       "deprecated: the storage as 0.2.0 spelled it (cholesky8, eigenvectors, cholesky, preconditioner); "
                       "use storage / statistic_bits / error_feedback", deprecated=_translate_quantize),
        Setting.integer("max_order", 1200, "largest factor order; larger dims are split into blocks", 1, format=True),
        Setting.number("shampoo_beta", 0.95, "EMA coefficient of the Kronecker statistics", 0.0, 1.0),
        Setting.number("matrix_eps", 1e-6, "relative damping of the inverse root, rho = matrix_eps * lambda_max",
                       0.0, low_open=True),
        Setting.integer("stat_interval", 100, "optimizer steps between statistics updates (T1)", 1),
        Setting.integer("root_interval", 500, "optimizer steps between inverse-root updates (T2, a multiple of T1)", 1),
        Setting("bjorck_steps", (1, 4), "Björck steps on dequantized eigenvectors before a statistics and a root update",
                tuple[int, int], _check_bjorck),
        Setting.choice("root_method", None, (None, "eigen", "schur_newton"),
                       "eigen (eigendecomposition) or schur_newton (coupled Newton); None: Newton for the naive "
                       "storage, eigen otherwise"),
        Setting.choice("kernel_backend", "auto", BACKENDS, "auto (Triton on CUDA, torch elsewhere), triton or torch"),
        Setting.choice("precondition_dtype", "float32", ("float32", "bfloat16", "float16"),
                       "dtype of the per-step preconditioning matmuls"),
        Setting.integer("start_preconditioning_step", 0, "no Shampoo updates before this step (the base optimizer runs)", 0),
        Setting.flag("precondition", True, "False: the group gets the base update only and no Shampoo state",
                     format=True),
        Setting("distributed", "auto",
                "auto: ranks share the blocks (DDP; Shampoo4bit's FSDP2 too, lossless); off: DDP replicated, FSDP2 per shard",
                Union[Literal["auto", "off"], bool], _distributed, per_group=False),
        Setting.choice("distributed_dtype", "float32", ("float32", "bfloat16"),
                       "dtype of the preconditioned blocks exchanged under DDP sharding", per_group=False),
    ),
    checks=(check_nesterov, check_storage, _root_interval),
    label=_shampoo_label,
    variants={"4bit": {}, "8bit": {"bits": 8}, "32bit": {"bits": 32}, "naive4bit": {"storage": "naive"}},
))


def update_docs(path: str = "docs/algorithms.md") -> list[str]:
    """Rewrite the generated settings tables in ``path`` (the lines after each
    ``<!-- generated: NAME.SETTINGS.markdown() -->`` marker) from the registered tables; returns
    the optimizers whose table changed. ``python -m lightning_shampoo4.optim.settings [PATH]``."""
    import importlib
    from pathlib import Path

    importlib.import_module("lightning_shampoo4.optim")  # registers every optimizer's table
    file = Path(path)
    text, changed = file.read_text(), []
    for name, table in OPTIMIZERS.items():
        marker = f"<!-- generated: {name}.SETTINGS.markdown() -->\n"
        if marker not in text:
            continue
        start = text.index(marker) + len(marker)
        end = text.find("\n\n", start)
        end = len(text) if end < 0 else end
        if text[start:end] != table.markdown():
            text = text[:start] + table.markdown() + text[end:]
            changed.append(name)
    if changed:
        file.write_text(text)
    return changed


if __name__ == "__main__":
    import sys

    from lightning_shampoo4.optim.settings import update_docs as _update  # the registered tables

    print("updated:", ", ".join(_update(*sys.argv[1:2])) or "nothing")
