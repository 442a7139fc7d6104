"""The CPU kernel that rebuilds rows of a stored symmetric matrix (``csrc/symmetric.c``).

Every steady step on the CPU rebuilds each stored inverse root (4-bit) as dense fp32 before its
matmul, and every statistics update the 8-bit Cholesky factor. In torch ops that is a decode of
the triangle plus a gather of every element through an int32 index, about 1.0-1.4 ns per element
on one core, half the cost of the matmul it feeds (``benchmarks/rebuild.py``). The C kernel
looks up 16 codes per instruction from a codebook held in one register (AVX-512; plain C
elsewhere) and writes the rows in order, about 3x faster, and bit-identical to the torch rebuild:
each value is the same single fp32 product. With 4 or more torch threads a large rebuild is
split by rows over them (``PARALLEL_FROM_THREADS``).

The kernel is compiled once per machine with the system C compiler (``$CC`` or ``cc``), as
``torch.compile`` does for its CPU kernels, and cached under ``$LIGHTNING_SHAMPOO4_CACHE``
(default ``~/.cache/lightning_shampoo4``). Without a compiler, or with
``LIGHTNING_SHAMPOO4_KERNELS=torch``, the torch rebuild runs instead: same numbers, slower.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from ..quant import Quantized
from ..quant.blockwise import _triangle_layout
from ..quant.codebooks import midpoints
from .types import QuantizedMatrix

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "symmetric.c"
CACHE_ENV_VAR = "LIGHTNING_SHAMPOO4_CACHE"
# -march=native turns on AVX-512 where the CPU has it (x86 only: Apple's clang rejects it on arm64,
# where the plain C path is compiled)
_ARCH = ("-march=native",) if platform.machine().lower() in ("x86_64", "amd64") else ()
FLAGS = ("-O3", *_ARCH, "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu99")


def _cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning_shampoo4"


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: a library built on one CPU is not reused on another."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _build(compiler: str) -> Path:
    """The compiled library's path, compiling it first when this source, compiler and CPU have none."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(FLAGS).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    name = f"symmetric-{key}.so"
    for cache in (_cache_dir(), Path(tempfile.gettempdir()) / "lightning_shampoo4-kernels"):  # e.g. a read-only home
        if (cache / name).exists():
            return cache / name
        try:
            cache.mkdir(parents=True, exist_ok=True)
            if os.access(cache, os.W_OK):
                break
        except OSError:
            continue
    target = cache / name
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # built beside, then renamed: concurrent builds are safe
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class _Library(NamedTuple):
    rows: ctypes._CFuncPtr
    quantize: ctypes._CFuncPtr


@functools.lru_cache(maxsize=None)
def _library() -> _Library | None:
    """The kernels' entry points, or None when they cannot be built here (tried once per process)."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        log.info("lightning_shampoo4: no C compiler found; stored roots are rebuilt with torch ops")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
        rows, quantize = lib.ls4_symmetric_rows, lib.ls4_quantize_symmetric
    except Exception as err:  # noqa: BLE001 - any failure means: use torch ops
        log.warning("lightning_shampoo4: the CPU kernel could not be built (%s); stored roots are rebuilt with "
                    "torch ops", err)
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    rows.restype = None
    rows.argtypes = [i64, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, ptr, i64]
    quantize.restype = i64
    quantize.argtypes = [i64, ptr, i64, i64, i64, i64, ptr, i64, i64, ptr, ptr, ptr]
    return _Library(rows, quantize)


def available() -> bool:
    """Whether the kernels are built and loaded (building them on the first call)."""
    return _library() is not None


def applies(root: QuantizedMatrix) -> bool:
    """Whether the kernel reads this root: symmetric, 4- or 8-bit, on the CPU, fp32 codebook."""
    return (
        root.symmetric
        and root.diag is not None
        and root.bits in (4, 8)
        and root.codes.device.type == "cpu"
        and root.codebook.dtype == torch.float32
        and root.codebook.numel() == 2**root.bits
    )


def symmetric_rows(root: QuantizedMatrix, r0: int, r1: int, out: torch.Tensor) -> bool:
    """Write rows ``r0 .. r1-1`` of ``root`` into the fp32 ``out`` (``(r1 - r0, n)``, rows
    contiguous); False (nothing written) when the kernel is unavailable or does not read ``root``."""
    lib = _library()
    if lib is None or not applies(root):
        return False
    n = root.order
    if not (0 <= r0 <= r1 <= n) or out.dtype != torch.float32 or out.device.type != "cpu" \
            or tuple(out.shape) != (r1 - r0, n) or out.stride(1) != 1:
        raise ValueError(f"rows {r0}..{r1} of an order-{n} root need an fp32 CPU (rows, {n}) output with "
                         f"contiguous rows, got {tuple(out.shape)} {out.dtype} on {out.device}")
    starts, blocks = _triangle_layout(n, root.block_size)
    values, nscales = starts[-1], blocks[-1]
    code_bytes = (values + 1) // 2 if root.bits == 4 else values
    if root.codes.numel() < code_bytes or root.absmax.numel() < nscales or root.diag.numel() < n:
        raise ValueError(f"an order-{n} root in blocks of {root.block_size} needs {code_bytes} code bytes, "
                         f"{nscales} scales and {n} diagonal values, got {root.codes.numel()}, "
                         f"{root.absmax.numel()} and {root.diag.numel()}")
    if r0 == r1:
        return True
    codes = root.codes.contiguous()
    scales = root.absmax.contiguous() if root.absmax.dtype == torch.bfloat16 else root.absmax.float().contiguous()
    diag = root.diag.to(torch.float32).contiguous()
    lut = root.codebook.contiguous()
    args = (codes.data_ptr(), scales.data_ptr(), scales.dtype == torch.bfloat16, diag.data_ptr(), lut.data_ptr(),
            n, root.block_size)
    ld = out.stride(0)

    def rows(a: int, b: int) -> None:  # ctypes releases the GIL: pieces run in parallel
        lib.rows(root.bits, *args, a, b, out.data_ptr() + (a - r0) * ld * 4, ld)

    pieces = _pieces(r1 - r0, n)
    if pieces == 1:
        rows(r0, r1)
        return True
    bounds = [r0 + (r1 - r0) * k // pieces for k in range(pieces + 1)]  # every row costs about n
    for f in [_pool(pieces).submit(rows, a, b) for a, b in zip(bounds, bounds[1:])]:
        f.result()
    return True


# Rows are split over threads only from this many torch threads on: on a 2-core machine two
# threads were slower than one (the rebuild is memory-bound; 0.44 vs 0.35 ms at order 900), and
# from 4 threads on the torch gather the kernel replaces would run in parallel too.
PARALLEL_FROM_THREADS = 4
PARALLEL_MIN_ELEMENTS = 1 << 17  # per piece


def _pieces(rows: int, n: int) -> int:
    threads = torch.get_num_threads()
    if threads < PARALLEL_FROM_THREADS:
        return 1
    return max(1, min(threads, rows, rows * n // PARALLEL_MIN_ELEMENTS))


@functools.lru_cache(maxsize=4)
def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="lightning_shampoo4_rows")


def quantize_symmetric(
    x: torch.Tensor, codebook: torch.Tensor, bits: int, block_size: int, scale_dtype: torch.dtype
) -> Quantized | None:
    """``quant.quantize_symmetric(x, ...)`` bit for bit, or None where the kernel does not apply:
    no kernel, not a CPU matrix, a codebook other than a 4- or 8-bit fp32 one, fp16 scales, or a
    value that is not finite or a scale that overflows (the torch quantizer handles and reports
    those)."""
    lib = _library()
    if (lib is None or x.device.type != "cpu" or x.dim() != 2 or x.shape[0] != x.shape[1] or bits not in (4, 8)
            or codebook.dtype != torch.float32 or codebook.numel() != 2**bits
            or scale_dtype not in (torch.float32, torch.bfloat16) or block_size < 1):
        return None
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.float()
    n = x.shape[0]
    mids = torch.cat([midpoints(codebook.cpu()), torch.tensor([math.inf])]).contiguous()
    starts, blocks = _triangle_layout(n, block_size)
    values, nscales = starts[-1], blocks[-1]
    codes = torch.empty((values + 1) // 2 if bits == 4 else values, dtype=torch.uint8)
    scales = torch.empty(nscales, dtype=scale_dtype)
    work = torch.empty(2 * max(n, 1))
    failed = lib.quantize(bits, x.data_ptr(), x.stride(0), x.stride(1), n, block_size, mids.data_ptr(), mids.numel(),
                          scale_dtype == torch.bfloat16, codes.data_ptr(), scales.data_ptr(), work.data_ptr())
    if failed:
        return None
    return Quantized(codes, scales, x.diagonal().to(torch.float32, copy=True))
