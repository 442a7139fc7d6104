"""lightning_shampoo4: 4-bit Shampoo for PyTorch and PyTorch Lightning.

Where things are:

* :class:`Shampoo4bit` (``optim/``): the optimizer; depends on torch only.
* ``quant/``: codebooks and block-wise quantization (the pure-torch reference).
* ``linalg``: Björck, subspace iteration, inverse roots.
* ``kernels/``: Triton kernels and the dispatcher the optimizer calls.
* :func:`configure_shampoo` (``configure.py``): optimizer + parameter groups + schedule for
  a LightningModule's ``configure_optimizers``.
* ``callbacks/``: :class:`PreconditionerSchedule`, :class:`QuantizedStateMonitor`,
  :class:`ShampooPrecision`.
* ``models/``, ``data/``, ``recipes/``, ``cli.py``: the recipe registry and the
  ``lightning-shampoo4`` command.

The Lightning-facing names are imported here eagerly on purpose: LightningCLI resolves short
class names (``--optimizer Shampoo4bit``, ``--trainer.callbacks+=QuantizedStateMonitor``)
only for classes that have been imported.
"""

from .callbacks import PreconditionerSchedule, QuantizedStateMonitor, ShampooPrecision
from .configure import GroupedShampoo4bit, configure_shampoo, shampoo_param_groups
from .module import ImageClassifier
from .optim import Shampoo4bit
from .recipes import get_recipe, list_recipes, register_recipe
from .strategies import UnsupportedStrategyError

__version__ = "0.1.0"

__all__ = [
    "GroupedShampoo4bit",
    "ImageClassifier",
    "PreconditionerSchedule",
    "QuantizedStateMonitor",
    "Shampoo4bit",
    "ShampooPrecision",
    "UnsupportedStrategyError",
    "__version__",
    "configure_shampoo",
    "get_recipe",
    "list_recipes",
    "register_recipe",
    "shampoo_param_groups",
]
