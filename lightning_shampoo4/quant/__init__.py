"""Block-wise quantization of optimizer state (pure torch; the reference for the kernels)."""

from .blockwise import (
    Quantized,
    dequantize,
    dequantize_symmetric,
    pack4,
    packed_numel,
    quantize,
    quantize_symmetric,
    symmetric_panels,
    unpack4,
)
from .codebooks import BITS, CODEBOOKS, get_codebook, midpoints
from .moments import (
    MOMENT_BITS,
    MomentSpec,
    adamw_update,
    adamw_update_foreach,
    init_moments,
    moment_bytes,
    moment_spec,
    sgd_update,
)

__all__ = [
    "BITS",
    "CODEBOOKS",
    "Quantized",
    "dequantize",
    "dequantize_symmetric",
    "get_codebook",
    "midpoints",
    "pack4",
    "packed_numel",
    "quantize",
    "quantize_symmetric",
    "symmetric_panels",
    "unpack4",
    "MOMENT_BITS",
    "MomentSpec",
    "adamw_update",
    "adamw_update_foreach",
    "init_moments",
    "moment_bytes",
    "moment_spec",
    "sgd_update",
]
