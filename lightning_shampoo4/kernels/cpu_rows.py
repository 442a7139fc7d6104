"""The CPU kernel that rebuilds rows of a stored symmetric 4-bit root (``csrc/symmetric_rows.c``).

Every steady step on the CPU rebuilds each stored inverse root as dense fp32 before its matmul.
In torch ops that is a decode of the triangle plus a gather of every element through an int32
index, about 1.1 ns per element on one core, half the cost of the matmul it feeds
(``benchmarks/rebuild.py``). The C kernel decodes 16 codes per instruction from a codebook held
in one register (AVX-512; plain C elsewhere) and writes the rows in order, about 3x faster, and
bit-identical to the torch rebuild: each value is the same single fp32 product. It runs on one
thread: split over two threads in a pool it was slower on a 2-core machine (memory-bound).

The kernel is compiled once per machine with the system C compiler (``$CC`` or ``cc``), as
``torch.compile`` does for its CPU kernels, and cached under ``$LIGHTNING_SHAMPOO4_CACHE``
(default ``~/.cache/lightning_shampoo4``). Without a compiler, or with
``LIGHTNING_SHAMPOO4_KERNELS=torch``, the torch rebuild runs instead: same numbers, slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .types import QuantizedMatrix

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "symmetric_rows.c"
CACHE_ENV_VAR = "LIGHTNING_SHAMPOO4_CACHE"
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu99")


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
    cache = _cache_dir()
    target = cache / f"symmetric_rows-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
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


@functools.lru_cache(maxsize=None)
def _kernel():
    """The kernel's entry point, or None when it cannot be built here (tried once per process)."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        log.info("lightning_shampoo4: no C compiler found; stored roots are rebuilt with torch ops")
        return None
    try:
        fn = ctypes.CDLL(str(_build(compiler))).ls4_symmetric_rows
    except Exception as err:  # noqa: BLE001 - any failure means: use torch ops
        log.warning("lightning_shampoo4: the CPU kernel could not be built (%s); stored roots are rebuilt with "
                    "torch ops", err)
        return None
    fn.restype = None
    fn.argtypes = ([ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
                   + [ctypes.c_int64] * 4 + [ctypes.c_void_p, ctypes.c_int64])
    return fn


def available() -> bool:
    """Whether the kernel is built and loaded (building it on the first call)."""
    return _kernel() is not None


def applies(root: QuantizedMatrix) -> bool:
    """Whether the kernel reads this root: symmetric, 4- or 8-bit, on the CPU, fp32 codebook."""
    return (
        root.symmetric
        and root.bits in (4, 8)
        and root.codes.device.type == "cpu"
        and root.codebook.dtype == torch.float32
        and root.codebook.numel() == 2**root.bits
    )


@functools.lru_cache(maxsize=64)
def _sizes(n: int, block: int) -> tuple[int, int]:
    """Values and scales of an order-n symmetric root's triangle stored in blocks of ``block``."""
    return n * (n - 1) // 2, sum(-(-length // block) for length in range(1, n))


def symmetric_rows(root: QuantizedMatrix, r0: int, r1: int, out: torch.Tensor) -> bool:
    """Write rows ``r0 .. r1-1`` of ``root`` into the fp32 ``out`` (``(r1 - r0, n)``, rows
    contiguous); False (nothing written) when the kernel is unavailable or does not read ``root``."""
    fn = _kernel()
    if fn is None or not applies(root):
        return False
    n = root.order
    if not (0 <= r0 <= r1 <= n) or out.dtype != torch.float32 or out.device.type != "cpu" \
            or tuple(out.shape) != (r1 - r0, n) or out.stride(1) != 1:
        raise ValueError(f"rows {r0}..{r1} of an order-{n} root need an fp32 CPU (rows, {n}) output with "
                         f"contiguous rows, got {tuple(out.shape)} {out.dtype} on {out.device}")
    values, nscales = _sizes(n, root.block_size)
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
    fn(root.bits, codes.data_ptr(), scales.data_ptr(), scales.dtype == torch.bfloat16, diag.data_ptr(), lut.data_ptr(), n, root.block_size, r0, r1,
       out.data_ptr(), out.stride(0))
    return True
