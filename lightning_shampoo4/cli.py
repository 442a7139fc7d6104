"""The ``lightning-shampoo4`` command: a LightningCLI whose defaults come from a recipe.

``lightning-shampoo4 fit`` trains the default recipe (``digits_cnn``: embedded data, a few minutes
on a CPU) and prints a summary: validation accuracy and the optimizer state in bytes next to what
AdamW would keep for the same model. ``--recipe NAME`` (or a ``recipe:`` key in a ``--config``
file) picks another recipe; every other flag overrides it, e.g. ``--optimizer.variant 32bit``,
``--trainer.max_epochs 1``, ``--data.data_dir ~/data``. ``lightning-shampoo4 list-recipes`` (or
``--list-recipes``) prints the recipes.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from .module import ImageClassifier
from .recipes import DEFAULT_RECIPE, VARIANTS, OptimizerConfig, RecipeError, ScheduleConfig, get_recipe, list_recipes
from .recipes.export import cli_config, recipe_table
from .strategies import UnsupportedStrategyError

try:  # registers the package callbacks so short names work: --trainer.callbacks+=QuantizedStateMonitor
    from . import callbacks as _callbacks  # noqa: F401
except ImportError:  # pragma: no cover - the callbacks are optional for the CLI
    pass

__all__ = ["ConfigError", "ShampooCLI", "fit_summary", "main", "requested_recipe"]

PROG = "lightning-shampoo4"
DESCRIPTION = (
    f"Train image classifiers with 4-bit Shampoo. '{PROG} fit' runs the default recipe ({DEFAULT_RECIPE}, "
    f"embedded digits data, a few minutes on a CPU); add --recipe NAME for another recipe and any flag "
    f"(--optimizer.variant 32bit, --trainer.max_epochs 1, ...) to override it. '{PROG} list-recipes' lists them."
)
_SUBCOMMANDS = ("fit", "validate", "test", "predict")


# -- choosing the recipe before the parser is built ------------------------------------------------
def _recipe_in_config(value: str) -> str | None:
    """The ``recipe`` key of a ``--config`` value (a path or a YAML string), if any."""
    try:
        path = Path(value).expanduser()
        data = yaml.safe_load(path.read_text() if path.is_file() else value)
    except (OSError, yaml.YAMLError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("recipe"), str):
        return data["recipe"]
    for sub in _SUBCOMMANDS:  # a top-level config holds per-subcommand sections
        if isinstance(data.get(sub), dict) and isinstance(data[sub].get("recipe"), str):
            return data[sub]["recipe"]
    return None


def requested_recipe(args: Sequence[str]) -> str | None:
    """The recipe named by ``--recipe NAME`` or by a ``recipe:`` key in a ``--config`` file; the last one wins."""
    found = None
    i = 0
    while i < len(args):
        arg, value = args[i], args[i + 1] if i + 1 < len(args) else None
        if arg == "--recipe" and value is not None:
            found, i = value, i + 2
            continue
        if arg in ("--config", "-c") and value is not None:
            found, i = _recipe_in_config(value) or found, i + 2
            continue
        if arg.startswith("--recipe="):
            found = arg.split("=", 1)[1]
        elif arg.startswith("--config="):
            found = _recipe_in_config(arg.split("=", 1)[1]) or found
        i += 1
    return found


def _flat_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``cli_config`` as dotted parser defaults (``data`` stays whole: it is a subclass argument)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key in ("trainer", "model", "optimizer", "schedule"):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


class _ArgumentParser(LightningArgumentParser):
    """Adds "did you mean" suggestions to unknown-option errors (``--optimizer.bitz`` -> ``--optimizer.bits``)."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        match = re.search(r"unrecognized arguments: (-\S+)", message)
        if match:
            parser = getattr(ex, "subcommand_parser", None) or self
            options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(match.group(1).split("=")[0], options, n=3, cutoff=0.6)
            if close:
                message += f" (did you mean {' or '.join(close)}?)"
        return super().error(message, ex)


class _ListRecipes(argparse.Action):
    """``--list-recipes [PATTERN]``: print the recipe table and exit."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.update(nargs="?", default=argparse.SUPPRESS, metavar="PATTERN")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        parser.exit(0 if print_recipes(values) else 2)


def print_recipes(pattern: str | None = None) -> bool:
    """Print the recipes matching ``pattern`` (a substring, or a glob with ``*?[``); when none
    does, say so on stderr and return False."""
    if pattern and not list_recipes(pattern):
        print(
            f"{PROG}: error: no recipe matches {pattern!r}; the recipes are: {', '.join(list_recipes())}",
            file=sys.stderr,
        )
        return False
    print(recipe_table(pattern))
    print(f"\nRun one: {PROG} fit --recipe NAME   (or --config recipes/NAME.yaml)")
    print(f"Override anything: --optimizer.variant {{{','.join(VARIANTS)}}} --optimizer.storage eigenvectors "
          "--trainer.max_epochs N ...")
    return True


class ConfigError(ValueError):
    """A class given on the command line (model, data, callback, trainer) refused its arguments."""


def _raising_class(err: BaseException) -> str | None:
    """The class whose ``__init__`` raised ``err`` (the outermost such frame), if any."""
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            return type(frame.f_locals["self"]).__name__
        tb = tb.tb_next
    return None


def _one_line(err: BaseException) -> str:
    """The root cause of an instantiation error as one line: ``Class: message``.

    jsonargparse wraps a constructor's error in a multi-line "Does not validate against any of
    the Union subtypes" report; the constructor's own message is at the end of ``__cause__``.
    """
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    message = lines[0] if lines else type(root).__name__
    owner = _raising_class(root)
    return f"{owner}: {message}" if owner and not message.startswith(owner) else message


# -- the CLI ----------------------------------------------------------------------------------------
class ShampooCLI(LightningCLI):
    """LightningCLI for :class:`ImageClassifier` and any data module, with recipe defaults.

    Besides LightningCLI's ``trainer``, ``model`` and ``data`` it has ``--recipe`` and the top-level
    ``optimizer`` and ``schedule`` groups (linked into the model). ``num_classes``, ``in_chans`` and
    ``img_size`` of the model are linked from the data module.
    """

    def __init__(self, args: ArgsType = None, *, recipe: str | None = None, run: bool = True, **kwargs: Any) -> None:
        if isinstance(args, dict) or hasattr(args, "as_dict"):  # a config given as a dict or Namespace
            found = args.get("recipe") or (args.get("fit") or {}).get("recipe")
        else:
            found = requested_recipe(list(sys.argv[1:] if args is None else args))
        self.recipe = get_recipe(recipe or found or DEFAULT_RECIPE)
        self._fit_started = 0.0
        kwargs.setdefault("parser_kwargs", {"prog": PROG, "description": DESCRIPTION})
        kwargs.setdefault("seed_everything_default", self.recipe.seed)
        kwargs.setdefault("parser_class", _ArgumentParser)
        super().__init__(
            ImageClassifier,
            LightningDataModule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.add_argument(
            "--list-recipes",
            action=_ListRecipes,
            help="Print the recipes (optionally those whose name contains PATTERN or matches it as a glob) and exit.",
        )
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--recipe",
            type=str,
            default=self.recipe.name,
            help=f"Recipe whose settings are the defaults of every other option (see '{PROG} list-recipes').",
        )
        parser.add_argument("--optimizer", type=OptimizerConfig, default=OptimizerConfig(), help="Optimizer settings.")
        parser.add_argument("--schedule", type=ScheduleConfig, default=ScheduleConfig(), help="Learning-rate schedule.")
        parser.link_arguments("optimizer", "model.optimizer")
        parser.link_arguments("schedule", "model.schedule")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.image_shape", "model.in_chans", compute_fn=_channels, apply_on="instantiate")
        parser.link_arguments("data.image_shape", "model.img_size", compute_fn=_size, apply_on="instantiate")
        parser.set_defaults(_flat_defaults(cli_config(self.recipe)))

    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does; a constructor refusing its arguments becomes a :class:`ConfigError`."""
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as err:
            raise ConfigError(_one_line(err)) from err

    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank has to ask, not only rank 0
        if self.trainer.is_global_zero:
            name = self._get(self.config, "recipe") or self.recipe.name
            seconds = time.perf_counter() - self._fit_started
            print(fit_summary(self.trainer, self.model, name, seconds, log_dir=log_dir), flush=True)


def _channels(image_shape: Sequence[int]) -> int:
    return int(image_shape[0])


def _size(image_shape: Sequence[int]) -> int:
    return int(image_shape[-1])


# -- the summary ------------------------------------------------------------------------------------
def _bytes(n: float) -> str:
    """``1,282,048 B (1.22 MiB)``."""
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{int(n):,} B ({value:.2f} {unit})"


def _param_numel(optimizer: Any) -> int:
    return sum(p.numel() for g in optimizer.param_groups for p in g["params"])


def adamw_bytes(optimizer: Any) -> int:
    """State bytes fp32 AdamW keeps for ``optimizer``'s parameters: two fp32 moments, 8 bytes per
    element whatever the parameters' dtype."""
    return 8 * _param_numel(optimizer)


def _moment_storage(optimizer: Any) -> str:
    """``"fp32"``, ``"4-bit codes + scales"``, ... from the groups' ``moment_bits``."""
    bits = sorted({g.get("moment_bits", 32) for g in optimizer.param_groups}, reverse=True)
    if bits == [32]:
        return "fp32" if all(p.dtype == torch.float32 for g in optimizer.param_groups for p in g["params"]) else "param dtype"
    return "/".join(f"{b}-bit" for b in bits if b != 32) + " codes + scales; small tensors dense"


def shampoo32_bytes(optimizer: Any) -> dict[str, int] | None:
    """State bytes 32-bit Shampoo would keep for the same parameters, counted on the meta device
    (nothing is allocated); None if the optimizer is not Shampoo or the count fails."""
    from .optim import Shampoo4bit

    if not isinstance(optimizer, Shampoo4bit):
        return None
    try:
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "bits": 32, "statistic_bits": None, "error_feedback": None,
             "root_method": None,
             "moment_bits": 32, "params": [p.detach().to("meta") for p in g["params"]]}
            for g in optimizer.param_groups
        ]
        shadow = Shampoo4bit(groups)
        shadow.init_state()
        return shadow.memory_report()
    except Exception:  # noqa: BLE001 - the comparison is a nicety; never fail a finished run over it
        return None


def _first_group(optimizer: Any) -> dict[str, Any]:
    """The first group that is preconditioned (the first group if none is)."""
    groups = optimizer.param_groups
    return next((g for g in groups if g.get("precondition", True)), groups[0])


def storage_settings(optimizer: Any) -> str:
    """How the optimizer stores its state, as resolved in its (first preconditioned) group:
    ``storage=cholesky bits=4 statistic_bits=8 ...`` from its settings table's format keys;
    empty for optimizers of other packages."""
    table = getattr(optimizer, "SETTINGS", None)
    if table is None or not optimizer.param_groups:
        return ""
    group = _first_group(optimizer)
    keys = [k for k in table.format_keys if k not in ("base", "precondition") and k in group]
    return " ".join(f"{k}={group[k]}" for k in keys)


_ASK_TRAINER: Any = object()


def fit_summary(trainer: Any, module: Any, recipe: str, seconds: float, log_dir: Any = _ASK_TRAINER) -> str:
    """What ``lightning-shampoo4 fit`` prints at the end: accuracy and optimizer memory.

    ``log_dir``: the trainer's log folder when already known (``trainer.log_dir`` is a collective
    call under DDP, so on one rank alone it must not be asked again).
    """
    from .optim.memory import memory_report

    metrics = trainer.callback_metrics
    acc, loss = metrics.get("val/acc"), metrics.get("val/loss")
    acc_text = f"{float(acc):.4f} ({100 * float(acc):.2f} %)" if acc is not None else "n/a (no validation ran)"
    if loss is not None:
        acc_text += f", val/loss {float(loss):.4f}"
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    cfg = getattr(module, "optimizer_config", None)
    data = type(trainer.datamodule).__name__ if trainer.datamodule is not None else "?"
    lines = [
        "",
        f"{PROG} fit summary",
        f"  recipe            {recipe}: {module.hparams.get('arch', '?')} on {data}",
        f"  optimizer         {cfg.describe() if cfg is not None else type(optimizer).__name__}",
        *([f"  storage           {storage_settings(optimizer)}"] if storage_settings(optimizer) else []),
        f"  val/acc           {acc_text}",
        f"  trained           {trainer.current_epoch} epochs, {trainer.global_step} optimizer steps in {seconds:.1f} s",
    ]
    if optimizer is not None:
        report = optimizer.memory_report() if hasattr(optimizer, "memory_report") else memory_report(optimizer.state.values())
        numel = _param_numel(optimizer)
        adamw = adamw_bytes(optimizer)
        versus = f"; this run: {report['total'] / adamw:.2f}x AdamW" if adamw else ""
        lines += [
            f"  optimizer state   {_bytes(report['total'])} total",
            f"    second-order    {_bytes(report['second_order'])}",
            f"    moments         {_bytes(report['moments'])} ({_moment_storage(optimizer)})",
            f"  AdamW would keep  {_bytes(adamw)} (2 fp32 moments x {numel:,} parameters){versus}",
        ]
        ref = shampoo32_bytes(optimizer)
        if ref is not None and _first_group(optimizer)["bits"] != 32 and ref["second_order"] and report["second_order"]:
            saved = 1 - report["second_order"] / ref["second_order"]
            lines.append(
                f"  32-bit Shampoo    {_bytes(ref['second_order'])} second-order; this run keeps {100 * saved:.1f} % less"
                f" ({ref['second_order'] / report['second_order']:.1f}x smaller)"
            )
    if log_dir is _ASK_TRAINER:
        log_dir = trainer.log_dir
    if log_dir:
        lines.append(f"  logs              {log_dir}")
    return "\n".join(lines)


# -- entry point ------------------------------------------------------------------------------------
def main(args: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status. User errors (unknown recipe, a class refusing its
    arguments, an unsupported strategy, missing data files) end in one ``error:`` line instead of
    a traceback; anything else keeps its traceback."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in ("list-recipes", "list_recipes"):
        return 0 if print_recipes(argv[1] if len(argv) > 1 else None) else 2
    try:
        ShampooCLI(args=None if args is None else argv)
    except (RecipeError, ConfigError, UnsupportedStrategyError, MisconfigurationException) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
