"""lightning_shampoo4: 4-bit Shampoo for PyTorch and PyTorch Lightning.

Where things are:

* :class:`Shampoo4bit` (``optim/``): the optimizer, torch only.
* ``quant/``: codebooks and block-wise quantization (the pure-torch reference).
* ``linalg``: Björck, subspace iteration, inverse roots.
* ``kernels/``: Triton kernels and the dispatcher the optimizer calls.
"""

from .optim import Shampoo4bit

__version__ = "0.1.0"

__all__ = ["Shampoo4bit", "__version__"]
