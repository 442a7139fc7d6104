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
(default ``$XDG_CACHE_HOME/lightning_shampoo4`` or ``~/.cache/lightning_shampoo4``), a directory
created private (0700). A cached library is loaded only when it and its directory belong to the
current user and no one else can write them; otherwise it is compiled afresh into a private
temporary directory. Without a compiler (one :class:`KernelWarning`), or with
``LIGHTNING_SHAMPOO4_KERNELS=torch``, the torch rebuild runs instead: same numbers, slower.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from ..quant import Quantized
from ..quant.blockwise import _triangle_layout
from ..quant.codebooks import midpoints
from .types import QuantizedMatrix

SOURCE = Path(__file__).resolve().parent / "csrc" / "symmetric.c"
CACHE_ENV_VAR = "LIGHTNING_SHAMPOO4_CACHE"
# -march=native turns on AVX-512 where the CPU has it (x86 only: Apple's clang rejects it on arm64,
# where the plain C path is compiled)
_CPU = torch.device("cpu")  # every buffer the kernels write: explicit, whatever default device is set
_ARCH = ("-march=native",) if platform.machine().lower() in ("x86_64", "amd64") else ()
FLAGS = ("-O3", *_ARCH, "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu99")


class KernelWarning(UserWarning):
    """The CPU kernels cannot be used here; the torch ops (same numbers, slower) run instead."""


def _cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning_shampoo4"


def _owned_privately(st: os.stat_result) -> bool:
    """Whether a file's status says: ours, and writable by no one else (group / others)."""
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _private_dir(path: Path) -> bool:
    """Create ``path`` (mode 0700) where missing; True when it is a directory of ours that no other
    user can write, so nothing in it can have been put there by someone else."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            os.chmod(path, 0o700)  # ours but group-writable (a umask of 002): close it, files are checked one by one
            st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and _owned_privately(st) and os.access(path, os.W_OK | os.X_OK)


def _trusted_library(path: Path) -> bool:
    """Whether ``path`` is a plain file (not a link) of ours that no other user can write."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and _owned_privately(st)


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


def _library_name(compiler: str) -> str:
    """The library's file name: a hash of the source, compiler, flags and CPU."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), version.encode(), " ".join(FLAGS).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    return f"symmetric-{key}.so"


def _compile(compiler: str, target: Path) -> Path:
    """Compile the kernels to ``target``: built beside it and renamed, so concurrent builds are safe."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o700)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _build(compiler: str) -> Path:
    """The compiled library in the per-user cache, compiling it first when this source, compiler
    and CPU have none there. A library is reused only when it and the cache directory belong to
    the current user and no one else can write them; otherwise :class:`PermissionError`."""
    cache = _cache_dir()
    if not _private_dir(cache):
        raise PermissionError(f"the kernel cache {cache} cannot be created, or is not a directory of this user's "
                              "that only this user can write")
    target = cache / _library_name(compiler)
    if target.exists() or target.is_symlink():
        if _trusted_library(target):
            return target
        raise PermissionError(f"{target} does not belong to this user or others can write it: not loaded")
    return _compile(compiler, target)


@contextlib.contextmanager
def _kernel_path(compiler: str) -> Iterator[Path]:
    """The library to load: the cached one, or where the cache cannot be trusted or written (a
    read-only home, a directory or library of another user), one compiled into a fresh private
    temporary directory that is removed once the library is loaded (one :class:`KernelWarning`)."""
    try:
        cached = _build(compiler)
    except PermissionError as err:
        warnings.warn(f"lightning_shampoo4: {err}; the CPU kernel is compiled afresh in a private temporary "
                      f"directory (set ${CACHE_ENV_VAR} to a directory only you can write to keep it)",
                      KernelWarning, stacklevel=4)
        cached = None
    if cached is not None:
        yield cached
        return
    private = Path(tempfile.mkdtemp(prefix="lightning_shampoo4-kernels-"))  # mode 0700, ours
    try:
        yield _compile(compiler, private / "symmetric.so")
    finally:
        shutil.rmtree(private, ignore_errors=True)  # a loaded library stays mapped


class _Library(NamedTuple):
    rows: ctypes._CFuncPtr
    quantize: ctypes._CFuncPtr
    dense_rows: ctypes._CFuncPtr
    quantize_rows: ctypes._CFuncPtr
    ema: ctypes._CFuncPtr


@functools.lru_cache(maxsize=None)
def _library() -> _Library | None:
    """The kernels' entry points, or None when they cannot be built here (tried once per process,
    with one :class:`KernelWarning` that says why)."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        warnings.warn("lightning_shampoo4: no C compiler found, so stored roots on the CPU are rebuilt with torch "
                      "ops (same numbers, about 3x slower rebuilds). Install one (e.g. `apt-get install gcc`) or "
                      "point $CC at one for the compiled kernel; LIGHTNING_SHAMPOO4_KERNELS=torch silences this.",
                      KernelWarning, stacklevel=2)
        return None
    if not hasattr(os, "geteuid"):  # no file ownership to check (not POSIX)
        warnings.warn("lightning_shampoo4: the CPU kernel is only loaded where file ownership can be checked; "
                      "stored roots are rebuilt with torch ops", KernelWarning, stacklevel=2)
        return None
    try:
        with _kernel_path(compiler) as path:
            lib = ctypes.CDLL(str(path))
        rows, quantize, dense_rows = lib.ls4_symmetric_rows, lib.ls4_quantize_symmetric, lib.ls4_dequantize_rows
        quantize_rows, ema = lib.ls4_quantize_rows, lib.ls4_symmetric_ema
    except Exception as err:  # noqa: BLE001 - any failure means: use torch ops
        warnings.warn(f"lightning_shampoo4: the CPU kernel could not be built ({err}); stored roots are rebuilt "
                      "with torch ops (same numbers, slower)", KernelWarning, stacklevel=2)
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    rows.restype = None
    rows.argtypes = [i64, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, ptr, i64]
    quantize.restype = i64
    quantize.argtypes = [i64, ptr, i64, i64, i64, i64, ptr, i64, ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr]
    dense_rows.restype = None
    dense_rows.argtypes = [i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, ptr]
    quantize_rows.restype = i64
    quantize_rows.argtypes = [i64, ptr, i64, i64, i64, ptr, i64, ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr]
    f32 = ctypes.c_float
    ema.restype = i64
    ema.argtypes = [i64, ptr, ptr, i64, ptr, ptr, ptr, i64, i64, i64, f32, f32, ptr, i64, ptr, i64, i64, i64, i64, i64,
                    ptr, ptr, ptr, ptr]
    return _Library(rows, quantize, dense_rows, quantize_rows, ema)


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


def dequantize_rows(codes: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, rows: int, cols: int,
                    bits: int, block_size: int) -> torch.Tensor | None:
    """``quant.dequantize`` of the row-block layout (no transpose, no diagonal) as fp32
    ``(rows, cols)``, bit for bit; None where the kernel does not apply (no kernel, not on the
    CPU, not a 4- or 8-bit fp32 codebook, fp16 scales, too few codes or scales)."""
    lib = _library()
    if (lib is None or codes.device.type != "cpu" or bits not in (4, 8) or codebook.dtype != torch.float32
            or codebook.numel() != 2**bits or absmax.dtype not in (torch.float32, torch.bfloat16) or block_size < 1):
        return None
    numel = rows * cols
    if codes.numel() < ((numel + 1) // 2 if bits == 4 else numel) or absmax.numel() < rows * -(-cols // block_size):
        return None
    out = torch.empty(rows, cols, device=_CPU)
    if numel:
        codes, absmax, lut = codes.contiguous(), absmax.contiguous(), codebook.contiguous()
        lib.dense_rows(bits, codes.data_ptr(), absmax.data_ptr(), absmax.dtype == torch.bfloat16, lut.data_ptr(),
                       cols, block_size, 0, rows, out.data_ptr())
    return out


def quantize_rows(x: torch.Tensor, codebook: torch.Tensor, bits: int, block_size: int,
                  scale_dtype: torch.dtype) -> Quantized | None:
    """``quant.quantize(x, ...)`` (no transpose, no diagonal) bit for bit, or None where the kernel
    does not apply (see :func:`quantize_symmetric`)."""
    lib = _library()
    if (lib is None or x.device.type != "cpu" or bits not in (4, 8) or codebook.dtype != torch.float32
            or codebook.numel() != 2**bits or scale_dtype not in (torch.float32, torch.bfloat16) or block_size < 1):
        return None
    x = x.detach().to(torch.float32).contiguous()
    rows, cols = (math.prod(x.shape[:-1]), x.shape[-1]) if x.dim() else (1, 1)  # the reference's layout
    codes = torch.empty((x.numel() + 1) // 2 if bits == 4 else x.numel(), dtype=torch.uint8, device=_CPU)
    scales = torch.empty(rows, -(-cols // block_size), dtype=scale_dtype, device=_CPU)
    if x.numel():
        work = torch.empty(cols, dtype=torch.uint8, device=_CPU)
        if lib.quantize_rows(bits, x.data_ptr(), rows, cols, block_size, *_search_bounds(codebook).args(),
                             scale_dtype == torch.bfloat16, codes.data_ptr(), scales.data_ptr(), work.data_ptr()):
            return None
    return Quantized(codes, scales, None)


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


class _Search(NamedTuple):
    """A codebook's search tables for the store kernels (``search_t`` in the C source): the
    midpoints padded with +inf, and for an 8-bit codebook a table of cells that replaces the
    binary search by one lookup and ``nk`` comparisons (``cells`` empty and ``nk`` 0 otherwise):
    equal cells of [-1, 1] (``shift`` 0) for maps whose codes are spread evenly, cells of the
    values' order-preserving bit patterns (``key >> shift``, from cell ``first``) for maps whose
    codes crowd toward 0 (the dynamic maps)."""

    mids: torch.Tensor
    size: int
    cells: torch.Tensor
    nk: int
    shift: int = 0
    first: int = 0

    def args(self) -> tuple:
        cells = self.cells.data_ptr() if self.nk else None
        return self.mids.data_ptr(), self.size, cells, self.cells.numel(), self.nk, self.shift, self.first


EVEN_CELLS = (1024, 2048, 4096)  # even cell tables tried, smallest first (4096 int32: 16 KiB)
KEY_SHIFTS = (19, 18, 17, 16)  # bit-pattern cells tried, fewest first (shift 17: about 16k cells)
MAX_CELL_COMPARISONS = 2  # a table is used when every value needs at most this many comparisons
_EDGE = 1.01  # the normalized values lie in [-1, 1] (a bf16 scale may round a hair below the absmax)

_SEARCH: dict[int, tuple[torch.Tensor, _Search]] = {}


def _keys(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving unsigned keys of fp32 values (as int64): negative values' bits flipped,
    positive values' sign bit set (the C kernels' ``cell_of``)."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits | 0x80000000)


def _table(mids_keys: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cell c's entry counts the midpoints below cell c-1 and its comparisons reach past cell c+1,
    so a value placed one cell off by rounding still gets its exact code: (table, comparisons)."""
    below = torch.searchsorted(mids_keys, lower.contiguous())
    upto = torch.searchsorted(mids_keys, upper.contiguous(), right=True)
    base = torch.cat([torch.zeros(1, dtype=below.dtype, device=_CPU), below[:-1]])
    top = torch.cat([upto[1:], torch.tensor([mids_keys.numel()], device=_CPU)])
    return base.to(torch.int32).contiguous(), int((top - base).max())


_NO_CELLS = (torch.empty(0, dtype=torch.int32, device=_CPU), 0, 0, 0)  # no table: (table, comparisons, shift, first)


def _cells(mids: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """The smallest cell table with at most :data:`MAX_CELL_COMPARISONS` comparisons per value:
    (table, comparisons, shift, first); (empty, 0, 0, 0) when there is none."""
    m = mids.double()
    for count in EVEN_CELLS:
        edges = torch.linspace(-1.0, 1.0, count + 1, dtype=torch.float64, device=_CPU)
        base, nk = _table(m, edges[:-1], edges[1:])
        if nk <= MAX_CELL_COMPARISONS:
            return base, nk, 0, 0
    keys = _keys(mids)
    lo, hi = (int(k) for k in _keys(torch.tensor([-_EDGE, _EDGE], device=_CPU)))
    for shift in KEY_SHIFTS:
        cells = torch.arange(lo >> shift, (hi >> shift) + 1, dtype=torch.int64, device=_CPU)
        base, nk = _table(keys, cells << shift, ((cells + 1) << shift) - 1)
        if nk <= MAX_CELL_COMPARISONS:
            return base, nk, shift, lo >> shift
    return _NO_CELLS


def _search_bounds(codebook: torch.Tensor) -> _Search:
    """The codebook's search tables: made once per codebook tensor (codebooks are cached and
    never modified), not at every store."""
    hit = _SEARCH.get(id(codebook))
    if hit is not None and hit[0] is codebook:
        return hit[1]
    mids = midpoints(codebook.cpu())
    # 4-bit codebooks: the binary search runs in registers (no memory lookups), faster than a table
    cells, nk, shift, first = _cells(mids) if mids.numel() + 1 > 16 else _NO_CELLS
    pad = torch.full((1 + nk,), math.inf, device=_CPU)  # to 2**bits, and nk more for the cell comparisons
    search = _Search(torch.cat([mids, pad]).contiguous(), mids.numel() + 1, cells, nk, shift, first)
    if len(_SEARCH) > 64:  # codebooks made outside the cache: keep the table small
        _SEARCH.clear()
    _SEARCH[id(codebook)] = (codebook, search)  # the codebook is held, so its id is not reused
    return search


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
    starts, blocks = _triangle_layout(n, block_size)
    values, nscales = starts[-1], blocks[-1]
    codes = torch.empty((values + 1) // 2 if bits == 4 else values, dtype=torch.uint8, device=_CPU)
    scales = torch.empty(nscales, dtype=scale_dtype, device=_CPU)
    work = torch.empty(2 * max(n, 1), device=_CPU)
    failed = lib.quantize(bits, x.data_ptr(), x.stride(0), x.stride(1), n, block_size,
                          *_search_bounds(codebook).args(), scale_dtype == torch.bfloat16, codes.data_ptr(),
                          scales.data_ptr(), work.data_ptr())
    if failed:
        return None
    return Quantized(codes, scales, x.diagonal().to(torch.float32, copy=True))


def symmetric_ema(root: QuantizedMatrix, o: torch.Tensor, beta: float, alpha: float,
                  scale_dtype: torch.dtype) -> Quantized | None:
    """``quant.quantize_symmetric(rebuilt * beta + o * alpha)`` of the stored symmetric ``root``
    and the fp32 matrix ``o`` (its upper triangle is read), bit for bit, without forming the
    matrix; None where the kernel does not apply (see :func:`applies` and :func:`quantize_symmetric`)."""
    lib = _library()
    n = root.order
    if (lib is None or not applies(root) or scale_dtype not in (torch.float32, torch.bfloat16)
            or root.absmax.dtype not in (torch.float32, torch.bfloat16) or root.block_size < 1
            or o.device.type != "cpu" or tuple(o.shape) != (n, n)):
        return None
    starts, blocks = _triangle_layout(n, root.block_size)
    values, nscales = starts[-1], blocks[-1]
    code_bytes = (values + 1) // 2 if root.bits == 4 else values
    if root.codes.numel() < code_bytes or root.absmax.numel() < nscales or root.diag.numel() < n:
        return None
    o = o.detach().to(torch.float32)
    if o.stride(1) != 1:
        o = o.contiguous()
    codes_in, scales_in = root.codes.contiguous(), root.absmax.contiguous()
    diag_in = root.diag.to(torch.float32).contiguous()
    lut = root.codebook.contiguous()
    codes = torch.empty(code_bytes, dtype=torch.uint8, device=_CPU)
    scales = torch.empty(nscales, dtype=scale_dtype, device=_CPU)
    diag = torch.empty(n, device=_CPU)
    work = torch.empty(2 * max(n, 1), device=_CPU)
    failed = lib.ema(root.bits, codes_in.data_ptr(), scales_in.data_ptr(), scales_in.dtype == torch.bfloat16,
                     diag_in.data_ptr(), lut.data_ptr(), o.data_ptr(), o.stride(0), n, root.block_size, float(beta),
                     float(alpha), *_search_bounds(root.codebook).args(), scale_dtype == torch.bfloat16,
                     codes.data_ptr(), scales.data_ptr(), diag.data_ptr(), work.data_ptr())
    return None if failed else Quantized(codes, scales, diag)
