"""Quantized first-order optimizer state: AdamW's ``exp_avg`` / ``exp_avg_sq`` and SGD's
``momentum_buffer`` kept at 32, 8 or 4 bits.

With 4-bit moments the base optimizer's state shrinks from 8 bytes per parameter (fp32
AdamW) to about 1.06, so 4-bit Shampoo grafted onto 4-bit AdamW keeps less state in total
than plain fp32 AdamW.

API
---
``moment_spec(numel_or_shape, bits) -> MomentSpec``
    How a tensor's moments are stored: ``bits`` (32 when asked for, or when the tensor has
    fewer than ``MIN_QUANTIZED_NUMEL`` elements, like small Shampoo factors) and the block size.
``init_moments(p, base, bits, momentum=None) -> dict[str, Tensor]``
    Zero state for ``base`` ``"adamw"`` (``exp_avg``, ``exp_avg_sq``) or ``"sgd"``
    (``momentum_buffer``; nothing when ``momentum == 0``). The caller keeps ``step``.
``adamw_update(p, grad, state, *, lr, beta1, beta2, eps, weight_decay, step, bits, backend)``
    One AdamW step in place (decoupled weight decay, bias correction; ``step`` counts from 1).
``sgd_update(p, grad, state, *, lr, momentum, nesterov, weight_decay, bits, backend)``
    One SGD step in place (coupled L2 weight decay, optional Nesterov).
``adamw_update_foreach(params, grads, exp_avgs, exp_avg_sqs, *, lr, ..., step)``
    The fp32 multi-tensor step for the tensors kept dense: the ``torch._foreach_*`` ops of
    ``torch.optim.AdamW(foreach=True)``, equal to the single-tensor step up to fp32 rounding.
``moment_bytes(numel_or_shape, base, bits) -> int``
    Exact bytes of the state ``init_moments`` creates.

Exactness: with 32 bits (and for tensors below the threshold) the updates are the ops of
``torch.optim.AdamW(foreach=False)`` / ``torch.optim.SGD`` in the same order, bit for bit,
with the moments in the parameter's dtype like torch. The SGD buffer starts at zero instead
of torch's lazy ``clone(grad)``: ``0 * momentum + grad`` is exactly ``grad``, so the state
exists from the start (no flag needed) and the steps are the same.

Quantized state (plain tensors only, so checkpoints load with ``torch.load(weights_only=True)``):

* ``<name>_codes``: uint8, the moment's elements in row-major order cut into flat blocks of
  ``block_size`` (128 at 4 bits, 256 at 8 bits; the last block may be partial); 4-bit codes
  packed two per byte (element 2k in the low nibble, 2k + 1 in the high nibble).
* ``<name>_absmax``: fp32, one scale per block (``ceil(numel / block_size)``).

Every key starts with the moment's name (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``),
which is how the memory accounting attributes it.

Maps: the signed moments (``exp_avg``, ``momentum_buffer``) use the package's ``dynamic``
codebook (decimal-exponent tree, with an exact zero). ``exp_avg_sq`` uses
:func:`unsigned_map`, a dynamic tree over (0, 1] *without zero*: a second moment that
rounds to zero turns ``m / (sqrt(v) + eps)`` into ``m / eps``, an update many orders of
magnitude too large (the zero-point problem). m and v share the block partition, so a block
whose v scale is zero also has m == 0 and its update is zero. Rounding is to the nearest code
(deterministic: resumed runs are bit-identical, and Triton matches torch).

Math at 8 / 4 bits: the moments are dequantized to fp32, updated, used for the parameter
update at full precision, then re-quantized (the quantization error only enters the next
step). bf16 / fp16 parameters are updated in fp32 and rounded back to their dtype. The step
runs through the fused update registered with :func:`set_fused_update` (the kernel dispatcher
registers ``kernels.moment_update`` when it is imported: on CUDA tensors one fused Triton kernel
per tensor); before that, or without it, the torch reference below runs. This module never
imports the kernels: they depend on it. The hyper-parameters are read at every call as
plain floats (a 0-dim tensor ``lr`` or ``step`` is read with ``item()``, a host sync on a
GPU), so a learning-rate scheduler
that writes new values into the param group is always seen, and the kernel, which takes
them as runtime arguments, never recompiles.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .blockwise import Quantized, dequantize, packed_numel, quantize
from .codebooks import get_codebook

__all__ = [
    "BASES",
    "BLOCK_SIZES",
    "MIN_QUANTIZED_NUMEL",
    "MOMENT_BITS",
    "MomentSpec",
    "adamw_update",
    "adamw_update_foreach",
    "dequantize_moment",
    "init_moments",
    "moment_bytes",
    "moment_codebook",
    "moment_names",
    "moment_spec",
    "quantize_moment",
    "reference_update",
    "set_fused_update",
    "sgd_update",
    "unsigned_map",
]

MOMENT_BITS = (32, 8, 4)
BASES = ("adamw", "sgd")
MIN_QUANTIZED_NUMEL = 4096
"""Tensors with fewer elements keep dense moments (biases, norm scales, small heads): their bytes
are negligible next to the large matrices, and they keep torch's exact update."""
BLOCK_SIZES = {8: 256, 4: 128}

_NAMES = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}
_UNSIGNED = frozenset({"exp_avg_sq"})


class MomentSpec(NamedTuple):
    """How one tensor's moments are stored: ``bits`` 32 (dense, the parameter's dtype) or 8 / 4."""

    numel: int
    bits: int
    block_size: int = 0

    @property
    def quantized(self) -> bool:
        return self.bits != 32

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.block_size) if self.quantized else 0

    @property
    def code_bytes(self) -> int:
        return packed_numel(self.numel, self.bits) if self.quantized else 0


def _check_bits(bits: int) -> None:
    if bits not in MOMENT_BITS:
        raise ValueError(f"moment bits={bits!r} is not supported; choose one of {MOMENT_BITS}")


def _check_base(base: str) -> None:
    if base not in BASES:
        raise ValueError(f"base={base!r} is not supported; choose one of {BASES}")


def moment_spec(numel_or_shape: int | Sequence[int], bits: int) -> MomentSpec:
    """The storage of the moments of a tensor with ``numel_or_shape`` elements at ``bits``."""
    _check_bits(bits)
    numel = int(numel_or_shape) if isinstance(numel_or_shape, int) else math.prod(numel_or_shape)
    if bits == 32 or numel < MIN_QUANTIZED_NUMEL:
        return MomentSpec(numel, 32)
    return MomentSpec(numel, bits, BLOCK_SIZES[bits])


def moment_names(base: str) -> tuple[str, ...]:
    """The moments of ``base``: ``("exp_avg", "exp_avg_sq")`` or ``("momentum_buffer",)``."""
    _check_base(base)
    return _NAMES[base]


def moment_bytes(numel_or_shape: int | Sequence[int], base: str, bits: int, param_bytes: int = 4) -> int:
    """Exact bytes of the state :func:`init_moments` creates (``param_bytes``: size of the
    parameter's dtype, which the fp32 path's dense moments use)."""
    spec = moment_spec(numel_or_shape, bits)
    per = spec.code_bytes + 4 * spec.nblocks if spec.quantized else spec.numel * param_bytes
    return per * len(moment_names(base))


# ----------------------------------------------------------------------------- maps


@functools.lru_cache(maxsize=None)
def _unsigned_cpu(bits: int) -> torch.Tensor:
    # ``bits`` decimal levels, level i holding 2**i fractions in (0.1, 1) scaled by
    # 10**(i - bits + 1): 2**bits - 1 values, plus 1.0. Smallest: 5.5e-4 (4 bits), 5.5e-8 (8 bits).
    values = [1.0]
    for i in range(bits):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float64)
        values += ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - bits + 1)).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


_UNSIGNED_CACHE: dict[tuple, torch.Tensor] = {}


def unsigned_map(bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The sorted fp32 map of the second moment: 2**bits values in (0, 1], no zero (cached; a
    plain dict lookup once cached, which ``torch.compile`` reads without breaking its graph)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    key = (bits, device.type, device.index)
    hit = _UNSIGNED_CACHE.get(key)
    if hit is not None:
        return hit
    if bits not in BLOCK_SIZES:
        raise ValueError(f"bits={bits!r}: quantized moments have 8 or 4 bits")
    table = _UNSIGNED_CACHE[key] = _unsigned_cpu(bits).to(device)
    return table


def moment_codebook(name: str, bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The map of moment ``name``: :func:`unsigned_map` for ``exp_avg_sq``, else ``dynamic``."""
    if name in _UNSIGNED:
        return unsigned_map(bits, device)
    return get_codebook("dynamic", bits, device)


# ----------------------------------------------------------------------------- quantizer


def quantize_moment(x: torch.Tensor, codebook: torch.Tensor, bits: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of ``x`` in flat blocks (the layout of the module docstring).

    The flat layout is the block-wise quantizer's layout of one long row, so that runs here.
    """
    q = quantize(x.detach().reshape(-1), codebook, bits, block_size)
    return q.codes, q.absmax.view(-1)


def dequantize_moment(
    codes: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, numel: int, bits: int, block_size: int
) -> torch.Tensor:
    """The flat fp32 moment of ``numel`` elements stored as ``codes`` / ``absmax``."""
    return dequantize(Quantized(codes, absmax.view(1, -1)), codebook, (numel,), bits, block_size)


# ----------------------------------------------------------------------------- state


def init_moments(p: torch.Tensor, base: str, bits: int, *, momentum: float | None = None) -> dict[str, torch.Tensor]:
    """Zero moments of ``p`` for ``base`` at ``bits`` (SGD with ``momentum == 0``: none)."""
    _check_base(base)
    spec = moment_spec(p.numel(), bits)
    if base == "sgd" and momentum is not None and momentum == 0:
        return {}
    state = {}
    for name in _NAMES[base]:
        if spec.quantized:
            state[f"{name}_codes"] = torch.zeros(spec.code_bytes, dtype=torch.uint8, device=p.device)
            state[f"{name}_absmax"] = torch.zeros(spec.nblocks, dtype=torch.float32, device=p.device)
        else:
            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def _moment_parts(state: dict, name: str, spec: MomentSpec) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        codes, absmax = state[f"{name}_codes"], state[f"{name}_absmax"]
    except KeyError:
        raise KeyError(
            f"the state has no quantized {name!r} ({spec.bits}-bit moments were asked for; keys: {sorted(state)}): "
            "was it created with other bits?"
        ) from None
    if codes.dtype != torch.uint8 or codes.numel() != spec.code_bytes or absmax.numel() != spec.nblocks:
        raise ValueError(
            f"{name}: the stored codes / absmax ({codes.numel()} / {absmax.numel()}) do not fit {spec.bits}-bit "
            f"moments of {spec.numel} elements ({spec.code_bytes} / {spec.nblocks})"
        )
    return codes, absmax


def _dense(state: dict, name: str) -> torch.Tensor:
    try:
        return state[name]
    except KeyError:
        raise KeyError(f"the state has no fp32 {name!r} (keys: {sorted(state)}): was it created with other bits?") from None


# ----------------------------------------------------------------------------- updates

# ``fn(base, p, grad, moments, *, bits, block_size, hyper, backend)``: the fused quantized step
# (``kernels.moment_update``, registered by the kernel dispatcher); None: the torch reference.
_fused_update: Callable[..., None] | None = None


def set_fused_update(fn: Callable[..., None] | None) -> None:
    """Route the quantized steps of :func:`adamw_update` / :func:`sgd_update` through ``fn`` (None:
    the torch reference :func:`reference_update`)."""
    global _fused_update
    _fused_update = fn


def _update(base, p, grad, moments, *, bits, block_size, hyper, backend) -> None:
    if _fused_update is None:
        reference_update(base, p, grad, moments, bits=bits, block_size=block_size, hyper=hyper)
    else:
        _fused_update(base, p, grad, moments, bits=bits, block_size=block_size, hyper=hyper, backend=backend)


def _f32(x: float) -> float:
    """``x`` rounded to the nearest fp32 value: the scalar both the reference and the kernel use."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _scalar(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def adamw_update(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    bits: int,
    backend: str = "auto",
) -> None:
    """One AdamW step on ``p`` and its moments in ``state`` (in place).

    ``step`` counts this update from 1 (an int, or a 0-dim tensor read with ``item()``).
    """
    lr, beta1, beta2, eps, weight_decay, step = map(_scalar, (lr, beta1, beta2, eps, weight_decay, step))
    spec = moment_spec(p.numel(), bits)
    if not spec.quantized:
        exp_avg, exp_avg_sq = _dense(state, "exp_avg"), _dense(state, "exp_avg_sq")
        # torch.optim.adam._single_tensor_adam with decoupled weight decay, op for op.
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)
        return
    if step < 1:
        raise ValueError(f"step={step!r}: AdamW steps count from 1")
    hyper = {
        "w1": _f32(1 - beta1),
        "beta2": _f32(beta2),
        "w2": _f32(1 - beta2),
        "eps": _f32(eps),
        "inv_bc2": _f32(1 / math.sqrt(1 - beta2**step)),
        "decay": _f32(1 - lr * weight_decay) if weight_decay != 0 else 1.0,
        "neg_step": _f32(-lr / (1 - beta1**step)),
    }
    moments = [
        (*_moment_parts(state, name, spec), moment_codebook(name, bits, p.device)) for name in _NAMES["adamw"]
    ]
    _update("adamw", p, grad, moments, bits=bits, block_size=spec.block_size, hyper=hyper, backend=backend)


def sgd_update(
    p: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    momentum: float,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    bits: int,
    backend: str = "auto",
) -> None:
    """One SGD step on ``p`` and its ``momentum_buffer`` in ``state`` (in place)."""
    lr, momentum, weight_decay = map(_scalar, (lr, momentum, weight_decay))
    if nesterov and momentum <= 0:
        raise ValueError("Nesterov momentum needs momentum > 0")
    spec = moment_spec(p.numel(), bits)
    if not spec.quantized or momentum == 0:
        # torch.optim.sgd._single_tensor_sgd (dampening 0), op for op.
        if weight_decay != 0:
            grad = grad.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = _dense(state, "momentum_buffer")
            buf.mul_(momentum).add_(grad)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        p.add_(grad, alpha=-lr)
        return
    hyper = {
        "momentum": _f32(momentum),
        "weight_decay": _f32(weight_decay),
        "neg_lr": _f32(-lr),
        "nesterov": bool(nesterov),
    }
    moments = [(*_moment_parts(state, "momentum_buffer", spec), moment_codebook("momentum_buffer", bits, p.device))]
    _update("sgd", p, grad, moments, bits=bits, block_size=spec.block_size, hyper=hyper, backend=backend)


def adamw_update_foreach(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int | Sequence[int],
) -> None:
    """AdamW on many fp32-state tensors at once, the ops of torch's foreach AdamW.

    ``step`` is one count for all tensors or one per tensor. Tensors are grouped by device
    and dtype, as the ``_foreach`` kernels need.
    """
    lr, beta1, beta2, eps, weight_decay = map(_scalar, (lr, beta1, beta2, eps, weight_decay))
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n):
        raise ValueError("params, grads, exp_avgs and exp_avg_sqs must have the same length")
    steps = [_scalar(s) for s in step] if isinstance(step, Sequence) else [_scalar(step)] * n
    if len(steps) != n:
        raise ValueError(f"{len(steps)} steps for {n} tensors")
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    for idx in groups.values():
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        ms = [exp_avgs[i] for i in idx]
        vs = [exp_avg_sqs[i] for i in idx]
        if weight_decay != 0:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, 1 - beta2)
        step_size = [-(lr / (1 - beta1 ** steps[i])) for i in idx]
        bias_correction2_sqrt = [(1 - beta2 ** steps[i]) ** 0.5 for i in idx]
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, ms, denom, step_size)


# ----------------------------------------------------------------------------- torch reference


def _encode_into(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, bits: int, block_size: int) -> None:
    new_codes, new_absmax = quantize_moment(x, codebook, bits, block_size)
    codes.copy_(new_codes)
    absmax.copy_(new_absmax)


def reference_update(
    base: str,
    p: torch.Tensor,
    grad: torch.Tensor,
    moments: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    bits: int,
    block_size: int,
    hyper: dict,
) -> None:
    """The torch reference of the fused quantized step (what ``triton_moments`` computes).

    ``moments``: (codes, absmax, codebook) per moment, updated in place with ``p``. The ops are
    single roundings in a fixed order (no lerp / fused multiply-adds), so the Triton kernel in
    the interpreter reproduces them exactly.
    """
    numel = p.numel()
    pf = p.detach().reshape(-1).float()
    g = grad.detach().reshape(-1).float()
    decoded = [dequantize_moment(c, a, cb, numel, bits, block_size) for c, a, cb in moments]
    if base == "adamw":
        m, v = decoded
        m = m + (g - m) * hyper["w1"]
        v = v * hyper["beta2"] + (g * g) * hyper["w2"]
        # torch.sqrt on the CPU may miss the correctly rounded fp32 root by an ulp; via fp64 it is
        # exact, like the kernel's sqrt_rn.
        denom = torch.sqrt(v.double()).float() * hyper["inv_bc2"] + hyper["eps"]
        if hyper["decay"] != 1.0:
            pf = pf * hyper["decay"]
        pf = pf + (m / denom) * hyper["neg_step"]
        new = (m, v)
    elif base == "sgd":
        (buf,) = decoded
        if hyper["weight_decay"] != 0:
            g = g + pf * hyper["weight_decay"]
        buf = buf * hyper["momentum"] + g
        upd = g + buf * hyper["momentum"] if hyper["nesterov"] else buf
        pf = pf + upd * hyper["neg_lr"]
        new = (buf,)
    else:
        _check_base(base)
    p.copy_(pf.view(p.shape))
    for x, (codes, absmax, cb) in zip(new, moments):
        _encode_into(x, codes, absmax, cb, bits, block_size)
