"""Writes ``legacy_checkpoints.pt``: optimizer states saved by version 0.2.0, before the storage
settings were renamed (``quantize=`` -> ``storage=`` / ``statistic_bits=``).

Kept for the record of how the file was made; the tests only read the file. For each old
``quantize`` value (and ``bits=32``) a tiny model takes a few steps with statistics and roots
updated, then the model's parameters, the optimizer's state dict and the parameters after two
more steps are saved, so a test can check that the state resumes bit for bit.
"""

import copy

import torch

from lightning_shampoo4 import Shampoo4bit

CASES = {
    "cholesky8": dict(quantize="cholesky8"),
    "eigenvectors": dict(quantize="eigenvectors"),
    "cholesky": dict(quantize="cholesky"),
    "preconditioner": dict(quantize="preconditioner"),
    "bits32": dict(bits=32, quantize="eigenvectors"),
    "cholesky8_8bit_sgd": dict(bits=8, quantize="cholesky8", base="sgd", moment_bits=8),
}


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(), torch.nn.Linear(40, 36))


def run(net, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 12, generator=g)
        loss = net(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> None:
    torch.set_num_threads(1)  # as the tests run (tests/conftest.py): the same roundings
    out = {}
    for name, kw in CASES.items():
        net = model()
        opt = Shampoo4bit(net.parameters(), lr=1e-2, stat_interval=2, root_interval=4, min_quant_numel=100, **kw)
        run(net, opt, 8, 1)
        params = {k: v.clone() for k, v in net.state_dict().items()}
        state = copy.deepcopy(opt.state_dict())  # the live state changes with the next steps
        run(net, opt, 2, 2)
        out[name] = {"kwargs": kw, "model": params, "optimizer": state,
                     "after": {k: v.clone() for k, v in net.state_dict().items()}}
    torch.save(out, "tests/data/legacy_checkpoints.pt")


if __name__ == "__main__":
    main()
