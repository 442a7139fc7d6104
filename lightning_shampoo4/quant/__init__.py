"""Block-wise quantization of optimizer state (pure torch; the reference for the kernels)."""

from .blockwise import Quantized, dequantize, pack4, packed_numel, quantize, unpack4
from .codebooks import BITS, CODEBOOKS, get_codebook, midpoints

__all__ = [
    "BITS",
    "CODEBOOKS",
    "Quantized",
    "dequantize",
    "get_codebook",
    "midpoints",
    "pack4",
    "packed_numel",
    "quantize",
    "unpack4",
]
