"""Lightning callbacks that steer and watch Shampoo4bit, one per file.

* :class:`PreconditionerSchedule`: change statistics / root intervals over training.
* :class:`QuantizedStateMonitor`: log state bytes, compression and 4-bit quantization errors.
* :class:`ShampooPrecision`: set the preconditioning dtype for the Trainer's precision.
"""

from .monitor import QuantizedStateMonitor
from .precision import ShampooPrecision
from .schedule import PreconditionerSchedule

__all__ = ["PreconditionerSchedule", "QuantizedStateMonitor", "ShampooPrecision"]
