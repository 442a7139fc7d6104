"""Loading a checkpoint into a ``Shampoo4bit``: check that it fits, then load it unchanged.

A checkpoint of another model, another optimizer configuration, a truncated file or a run that
had already diverged is refused with an error naming the parameter and the mismatch, before
anything is changed. Second-order tensors keep their saved dtype (uint8 codes stay codes);
moments are cast to the parameter's dtype as torch does, so a bf16 run resumes in fp32.

The expected entries come from ``optimizer._new_state(p, group, device="meta")``, which lists
every block of a parameter (of its local shard under FSDP2), so a full checkpoint checks before
a DDP rank drops the blocks it does not own. A rank-local DDP state (``partial_blocks``) may
lack whole blocks, never parts of one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .settings import quantize_to_storage
from .state_keys import block_of

_MOMENTS = ("exp_avg", "exp_avg_sq", "momentum_buffer")
_NON_NEGATIVE = ("exp_avg_sq", "_absmax")  # key endings whose values are >= 0 in any valid state


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit this optimizer and its parameters."""


def _describe(index: int, position: int, p: torch.Tensor, group: dict) -> str:
    """``parameter '<name>' (shape ...)``, or ``#<index>`` (over all groups) without names."""
    names = group.get("param_names")
    where = f"'{names[position]}'" if names and position < len(names) else f"#{index}"
    return f"parameter {where} (shape {tuple(p.shape)})"


def _count(name: str, value) -> int:
    """A non-negative integer count from the checkpoint (a clock or a step number)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CheckpointMismatchError(f"{name} should be an integer >= 0, the checkpoint holds {value!r}")
    return value


def load_optimizer_state(
    optimizer, state_dict: dict[str, Any], torch_load: Callable[[dict], None], partial_blocks: bool = False
) -> None:
    """Check ``state_dict`` against ``optimizer``, then load it (``torch_load`` loads the groups).

    ``partial_blocks``: the state of some Shampoo blocks may be absent as a whole (a DDP rank's
    own blocks only); what is there is checked as usual."""
    saved_groups = _check_form(state_dict)
    groups, by_id = _merge_groups(optimizer, saved_groups)
    _check_settings(optimizer.SETTINGS, groups)
    loaded: dict[torch.Tensor, dict[str, Any]] = {}
    flags: list[tuple[torch.Tensor, str, str]] = []
    for pid, saved_state in state_dict["state"].items():
        if pid not in by_id:
            raise CheckpointMismatchError(f"the checkpoint has state for parameter id {pid!r}, which no group lists")
        index, position, p, group, merged = by_id[pid]
        what = _describe(index, position, p, group)
        loaded[p] = _param_state(optimizer, p, merged, saved_state, what, partial_blocks, flags)
    _check_finite(flags)
    clock = max([g["clock"] for g in groups] or [0])
    torch_load({**state_dict, "state": {}, "param_groups": [g | {"params": s["params"]} for g, s in zip(groups, saved_groups)]})
    for group in optimizer.param_groups:
        group["clock"] = clock
    optimizer.state.clear()
    for p, st in loaded.items():
        optimizer.state[p] = st


def _check_form(state_dict: Any) -> list:
    """The saved groups, once ``state_dict`` has the form of an optimizer state dict."""
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise CheckpointMismatchError("not an optimizer state dict: it needs 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if not isinstance(state_dict["state"], Mapping) or not isinstance(saved_groups, (list, tuple)) or not all(
        isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in saved_groups
    ):
        raise CheckpointMismatchError(
            "not an optimizer state dict: 'state' must map parameter ids to dicts and 'param_groups' be a list "
            "of dicts with 'params'"
        )
    return list(saved_groups)


def _merge_groups(optimizer, saved_groups: list) -> tuple[list[dict], dict[Any, tuple]]:
    """Each saved group over this optimizer's (keys an older version lacks keep this one's values),
    and ``parameter id -> (index, position, param, group, merged group)``."""
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointMismatchError(
            f"the checkpoint has {len(saved_groups)} parameter groups, this optimizer {len(optimizer.param_groups)}"
        )
    groups = []
    by_id: dict[Any, tuple[int, int, torch.Tensor, dict, dict]] = {}
    index = 0
    for gi, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise CheckpointMismatchError(
                f"parameter group {gi} has {len(saved['params'])} parameters in the checkpoint and "
                f"{len(group['params'])} here"
            )
        merged = {k: v for k, v in group.items() if k != "params"} | _upgrade_group(saved)
        merged["clock"] = _count(f"the clock of parameter group {gi}", merged.get("clock", 0))
        groups.append(merged)
        for position, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            if pid in by_id:
                raise CheckpointMismatchError(f"the checkpoint lists parameter id {pid!r} twice")
            by_id[pid] = (index, position, p, group, merged)
            index += 1
    return groups, by_id


def _check_settings(table, groups: list[dict]) -> None:
    """The saved groups' settings pass the optimizer's own checks."""
    for merged in groups:
        check = {k: v for k, v in merged.items() if k in table.group_keys}
        try:
            table.validate(check)
        except ValueError as err:
            raise CheckpointMismatchError(f"the checkpoint's hyper-parameters are invalid: {err}") from None


def _param_state(optimizer, p: torch.Tensor, merged: dict, saved_state: Any, what: str, partial_blocks: bool,
                 flags: list) -> dict[str, Any]:
    """One parameter's saved state checked against the entries its settings give (names, shapes,
    dtypes) and copied to its device; float tensors' finiteness checks are added to ``flags``."""
    if not isinstance(saved_state, Mapping):
        raise CheckpointMismatchError(f"the state of {what} should be a dict, the checkpoint holds "
                                      f"{type(saved_state).__name__}")
    expected = optimizer._new_state(p, merged, device="meta")
    state = _upgrade(dict(saved_state), p, merged, expected)
    missing = sorted(set(expected) - set(state))
    if partial_blocks and missing:
        absent = {block_of(k) for k in missing}
        if None not in absent and not any(block_of(k) in absent for k in state):  # whole blocks only
            expected = {k: v for k, v in expected.items() if k in state}
            missing = []
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"the checkpoint's state for {what} does not fit this optimizer's settings: "
            f"missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}"
        )
    return {key: _entry(key, want, state[key], p, what, flags) for key, want in expected.items()}


def _entry(key: str, want: Any, got: Any, p: torch.Tensor, what: str, flags: list) -> Any:
    """One saved entry checked against the expected one (a step number, or a meta tensor)."""
    if not isinstance(want, torch.Tensor):  # step numbers such as last_root_step
        return _count(f"'{key}' of {what}", got)
    if not isinstance(got, torch.Tensor):
        raise CheckpointMismatchError(f"'{key}' of {what} should be a tensor, the checkpoint holds {type(got).__name__}")
    if got.device.type == "meta":
        raise CheckpointMismatchError(f"'{key}' of {what} is a meta tensor: the checkpoint has no data for it")
    if tuple(got.shape) != tuple(want.shape):
        raise CheckpointMismatchError(
            f"'{key}' of {what} has shape {tuple(got.shape)} in the checkpoint; this optimizer expects "
            f"{tuple(want.shape)} (a checkpoint of another model or other settings?)"
        )
    if key in _MOMENTS:
        if not got.is_floating_point():
            raise CheckpointMismatchError(f"'{key}' of {what} has dtype {got.dtype}; expected a float tensor")
        got = got.to(p.dtype)
    elif got.dtype != want.dtype:
        raise CheckpointMismatchError(f"'{key}' of {what} has dtype {got.dtype}; expected {want.dtype}")
    got = got.detach().to(p.device, copy=True)
    if got.is_floating_point():
        ok = torch.isfinite(got).all()
        if key.endswith(_NON_NEGATIVE):
            ok = ok & (got >= 0).all()
        flags.append((ok, key, what))
    return got


def _check_finite(flags: list[tuple[torch.Tensor, str, str]]) -> None:
    """One host sync for every float entry's finiteness check."""
    if not flags:
        return
    ok = torch.stack([f.cpu() for f, _, _ in flags]).tolist()
    bad = [f"'{key}' of {what}" for good, (_, key, what) in zip(ok, flags) if not good]
    if bad:
        raise CheckpointMismatchError(f"the checkpoint holds inf / NaN (or a negative second moment or "
                                      f"scale) in {', '.join(bad[:5])}"
                                      + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))


def _upgrade_group(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved parameter group in today's settings: version 0.2 stored ``quantize`` where
    ``storage`` / ``statistic_bits`` / ``error_feedback`` are now (the same state format)."""
    group = dict(saved)
    quantize = group.pop("quantize", None)
    if quantize is not None:
        try:
            group.update(quantize_to_storage(quantize, group.get("bits", 4)))
        except ValueError as err:
            raise CheckpointMismatchError(f"the checkpoint's hyper-parameters are invalid: {err}") from None
    return group


def _upgrade(state: dict[str, Any], p: torch.Tensor, group: dict, expected: dict[str, Any]) -> dict[str, Any]:
    """Fill in what checkpoints of version 0.1 stored differently (Python step counts, a
    momentum buffer created lazily) and the per-optimizer clock they lacked."""
    step = state.get("step")
    if step is not None and not isinstance(step, torch.Tensor):
        state["step"] = torch.tensor(float(step), dtype=torch.float32)
        group.setdefault("clock", int(step))
        group["clock"] = max(group["clock"], int(step))
    if "momentum_buffer" in expected and "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(p)
    return state
