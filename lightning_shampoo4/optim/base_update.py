"""The base optimizer that consumes the preconditioned direction: AdamW or SGD.

Moments live beside the Shampoo state as plain tensors: ``exp_avg``, ``exp_avg_sq``,
``momentum_buffer`` in the parameter's dtype (``moment_bits=32``), or their uint8 codes and
scales (``moment_bits`` 8 / 4, see :mod:`lightning_shampoo4.quant.moments`; tensors under
4096 elements stay dense). ``state["step"]`` is a 0-dim fp32 tensor counting the updates that
ran for that parameter (AdamW's bias correction), as in torch.

Dense moments update through torch's fused multi-tensor kernels, which take a device-side
"found inf" flag: a step flagged non-finite leaves parameters, moments and step counts
untouched without the host ever reading the flag. Quantized moments update one fused kernel
per tensor; those steps read the flag and the step counts on the host once.
"""

from __future__ import annotations

from typing import Any

import torch

from ..quant import moments


def init_moments(p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Zero moments for ``p`` (SGD's zero buffer gives torch's first step ``buf = g`` exactly)."""
    return moments.init_moments(p, group["base"], group["moment_bits"], momentum=group["momentum"])


def apply(optimizer, work: list, directions: list[torch.Tensor], found_inf: dict[torch.device, torch.Tensor]) -> None:
    """Run the base update of every ``(param, group, plan)`` in ``work`` on its direction."""
    batches: dict[tuple[int, torch.device, torch.dtype], list] = {}
    for (p, group, _), d in zip(work, directions):
        batches.setdefault((id(group), p.device, p.dtype), [group, []])[1].append((p, d))
    for (_, device, _), (group, items) in batches.items():
        if group["moment_bits"] != 32:
            quantized = [(p, d) for p, d in items if moments.moment_spec(p.numel(), group["moment_bits"]).quantized]
            if quantized:
                _quantized_update(optimizer, group, quantized, found_inf[device])
                items = [(p, d) for p, d in items if not moments.moment_spec(p.numel(), group["moment_bits"]).quantized]
                if not items:
                    continue
        params = [p for p, _ in items]
        grads = [d for _, d in items]
        states = [optimizer.state[p] for p in params]
        flag = found_inf[device]
        # the new counts are stored only once the kernel has run (no advance on a flagged step)
        steps = torch._foreach_add([s["step"] for s in states], [1.0 - flag] * len(states))
        if group["base"] == "adamw":
            beta1, beta2 = group["betas"]
            torch._fused_adamw_(
                params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [], steps,
                lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                amsgrad=False, maximize=False, grad_scale=None, found_inf=flag,
            )
        else:
            bufs = [s["momentum_buffer"] for s in states] if group["momentum"] else []
            torch._fused_sgd_(
                params, grads, bufs, weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                dampening=0.0, nesterov=group["nesterov"], maximize=False, is_first_step=False, grad_scale=None,
                found_inf=flag,
            )
        for s, step in zip(states, steps):
            s["step"] = step


def _quantized_update(optimizer, group: dict, items: list, flag: torch.Tensor) -> None:
    """Quantized moments: one fused update per tensor, skipped when the step is flagged."""
    if bool(flag):
        return
    states = [optimizer.state[p] for p, _ in items]
    steps = torch.stack([s["step"] for s in states]).add(1)
    for (p, d), state, step in zip(items, states, steps.tolist()):
        if group["base"] == "adamw":
            beta1, beta2 = group["betas"]
            moments.adamw_update(
                p, d, state, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], step=int(step), bits=group["moment_bits"],
                backend=group["kernel_backend"],
            )
        else:
            moments.sgd_update(
                p, d, state, lr=group["lr"], momentum=group["momentum"], nesterov=group["nesterov"],
                weight_decay=group["weight_decay"], bits=group["moment_bits"], backend=group["kernel_backend"],
            )
    for state, step in zip(states, steps.unbind(0)):
        state["step"] = step
