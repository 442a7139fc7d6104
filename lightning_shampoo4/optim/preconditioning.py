"""``L^-1/4 G R^-1/4`` for all blocks of a step, same-shape blocks batched on every backend.

A transformer's layers give many blocks of one shape: they are stacked and run as one batched
call per side (``kernels.precondition_batch``): the roots of a side rebuilt in one op call (on
Triton one launch) and two ``bmm``, or on Triton's fused path two launches that decode the roots
inside the matmuls; instead of a rebuild and two matmuls per block. A batch is capped at
``MAX_BATCH_BYTES`` of stacked roots so the step's temporaries stay bounded; lone blocks follow
the batches, largest roots first, when the fewest finished results are held beside their dense
rebuilds.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import kernels
from ..kernels import QuantizedMatrix

MAX_BATCH_BYTES = 32 * 2**20


class Job(NamedTuple):
    """One block to precondition."""

    grad: torch.Tensor  # fp32 m x n
    left: torch.Tensor | QuantizedMatrix
    right: torch.Tensor | QuantizedMatrix
    dtype: torch.dtype
    backend: str


def _fmt(root: torch.Tensor | QuantizedMatrix) -> tuple:
    if isinstance(root, torch.Tensor):
        return ("dense", root.shape[-1])
    return ("q", root.order, root.bits, root.block_size, id(root.codebook), root.diag is not None, root.symmetric,
            root.absmax.dtype)


def run(jobs: list[Job], skip: list[bool] | None = None) -> list[torch.Tensor]:
    """The fp32 preconditioned block of every job, in order.

    ``skip``: jobs another rank computes (DDP sharding), None in the result. They still shape
    the batches, so every job is computed as when all run: ``bmm`` rounds each item alike
    whatever the batch size, but a lone matmul rounds differently from a batched one.
    """
    out: list[torch.Tensor | None] = [None] * len(jobs)
    batches: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        key = (job.grad.shape, job.grad.device, job.dtype, job.backend, _fmt(job.left), _fmt(job.right))
        batches.setdefault(key, []).append(i)

    def root_bytes(idx: list[int]) -> int:
        m, n = jobs[idx[0]].grad.shape
        return 4 * (m * m + n * n)

    # batches as they come, then lone blocks largest roots first: their dense rebuilds then meet
    # the fewest finished results (the step's peak memory)
    batched = [idx for idx in batches.values() if len(idx) > 1]
    lone = sorted((idx for idx in batches.values() if len(idx) == 1), key=root_bytes, reverse=True)
    for idx in batched + lone:
        per_item = root_bytes(idx)
        step = max(1, MAX_BATCH_BYTES // per_item)
        for s in range(0, len(idx), step):
            chunk = idx[s : s + step]
            alone = len(chunk) == 1  # one matmul; a batch stays a bmm, even of one job left by skip
            if skip is not None:
                chunk = [i for i in chunk if not skip[i]]
                if not chunk:
                    continue
            if alone:
                j = jobs[chunk[0]]
                out[chunk[0]] = kernels.precondition(j.grad, j.left, j.right, dtype=j.dtype, backend=j.backend)
                continue
            dtype, backend = jobs[chunk[0]].dtype, jobs[chunk[0]].backend
            res = kernels.precondition_batch([jobs[i].grad for i in chunk], [jobs[i].left for i in chunk],
                                             [jobs[i].right for i in chunk], dtype=dtype, backend=backend)
            for i, r in zip(chunk, res.unbind(0)):
                out[i] = r
    return out  # type: ignore[return-value]
