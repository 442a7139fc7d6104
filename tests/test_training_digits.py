"""4-bit Shampoo trains like 32-bit Shampoo on real data (sklearn's 8x8 digits)."""

import functools

import pytest
import torch
from torch import nn

from lightning_shampoo4 import Shampoo4bit


def _digits():
    sklearn = pytest.importorskip("sklearn.datasets")
    d = sklearn.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    x = (x - x[:1400].mean(0)) / (x[:1400].std(0) + 1e-3)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def _run(**opt_kwargs):
    (xt, yt), (xv, yv) = _digits()
    torch.manual_seed(0)
    # hidden layers of order 128 so the factors are quantized (>= min_quant_numel = 4096 elements)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))
    opt = Shampoo4bit(model.parameters(), lr=2e-3, weight_decay=1e-4, stat_interval=5, root_interval=20, **opt_kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):  # epochs
        for idx in torch.randperm(len(yt), generator=g).split(100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    with torch.no_grad():
        logits = model(xv)
        return nn.functional.cross_entropy(logits, yv).item(), (logits.argmax(1) == yv).float().mean().item(), opt


@functools.cache
def _run32():
    return _run(bits=32)[:2]


@pytest.mark.parametrize("storage, key", [(None, "0.L.chol_codes"), ("eigenvectors", "0.L.eigvecs_codes")],
                         ids=["default", "eigenvectors"])
def test_4bit_trains_like_32bit_on_digits(storage, key):
    loss4, acc4, opt4 = _run(bits=4, **({"storage": storage} if storage else {}))
    loss32, acc32 = _run32()
    assert opt4.state[next(iter(opt4.state))]  # state exists
    assert key in opt4.state[opt4.param_groups[0]["params"][2]]  # really quantized
    assert opt4.counters["root_updates"] > 0 and opt4.counters["failed_updates"] == 0
    # both learn the task; 4-bit within 0.05 nats and 2 points of accuracy of 32-bit
    assert acc32 > 0.93 and acc4 > 0.93
    assert abs(loss4 - loss32) < 0.05, (loss4, loss32)
    assert abs(acc4 - acc32) < 0.02, (acc4, acc32)
