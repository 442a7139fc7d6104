"""The settings table: the single declaration of every optimizer argument, the deprecated
``quantize=`` spelling, and states saved before the rename resuming bit for bit."""

from __future__ import annotations

import copy
import inspect
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lightning_shampoo4 import Shampoo4bit
from lightning_shampoo4.optim import settings as S
from lightning_shampoo4.optim.settings import OPTIMIZERS, SHAMPOO_SETTINGS, Setting, SettingsTable

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
from make_legacy_checkpoints import CASES, model, run  # noqa: E402

sys.path.remove(str(DATA))


def _signature(cls) -> dict:
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if n not in ("self", "params")}


@pytest.mark.parametrize("table", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_every_constructor_argument_is_declared_once_with_its_default(table):
    module, _, name = table.class_path.rpartition(".")
    cls = getattr(__import__(module, fromlist=[name]), name)
    assert cls.SETTINGS is table
    assert _signature(cls) == table.defaults()  # names, order and defaults
    # a fresh optimizer's groups hold exactly the per-group settings
    opt = cls([torch.nn.Parameter(torch.zeros(3, 3))])
    group = opt.param_groups[0]
    assert set(table.group_keys) <= set(group) and not {s.name for s in table.settings if s.deprecated} & set(group)
    assert set(table.format_keys) <= set(table.group_keys)


def test_the_table_derives_checks_and_docs():
    table = SHAMPOO_SETTINGS
    assert table["storage"].choices == S.STORAGES
    assert None in table["codebook"].choices and "linear1.5" in table["codebook"].choices
    assert table["lr"].choices is None
    doc = table.markdown()
    for s in table.settings:
        assert f"| `{s.name}` |" in doc
    with pytest.raises(ValueError, match="declared twice"):
        SettingsTable("X", "x.X", (table["lr"], table["lr"]))
    # a new optimizer's table: rows reused, one of its own, its own cross check
    own = Setting.integer("update_every", 10, "steps between eigenbasis updates", 1)

    def check(group):
        if group["update_every"] > 100:
            raise ValueError("update_every too large")

    table2 = SettingsTable("Other", "x.Other", (*S.BASE_SETTINGS, own), checks=(check,))
    group = table2.defaults()
    table2.validate(group)
    assert group["update_every"] == 10 and table2.format_keys == ("base",)
    for bad, match in ((dict(update_every=0), "update_every"), (dict(update_every=500), "too large"),
                       (dict(base="adam"), "base")):
        with pytest.raises(ValueError, match=match):
            table2.validate(table2.defaults() | bad)


@pytest.mark.parametrize("old, bits, new", [
    ("cholesky8", 4, dict(storage="cholesky", statistic_bits=8, error_feedback=False)),
    ("cholesky", 4, dict(storage="cholesky", statistic_bits=4, error_feedback=True)),
    ("cholesky", 8, dict(storage="cholesky", statistic_bits=8, error_feedback=True)),
    ("eigenvectors", 4, dict(storage="eigenvectors", statistic_bits=4, error_feedback=False)),
    ("preconditioner", 8, dict(storage="naive", statistic_bits=8, error_feedback=False)),
    ("eigenvectors", 32, dict(storage="eigenvectors", statistic_bits=32, error_feedback=False)),
])
def test_quantize_still_works_with_a_warning_naming_the_new_spelling(old, bits, new):
    p = torch.nn.Parameter(torch.zeros(80, 80))
    with pytest.warns(DeprecationWarning, match=f"quantize={old!r} is deprecated.*storage={new['storage']!r}"):
        opt = Shampoo4bit([p], bits=bits, quantize=old)
    group = opt.param_groups[0]
    assert {k: group[k] for k in new} == new and "quantize" not in group
    spelled = Shampoo4bit([torch.nn.Parameter(torch.zeros(80, 80))], bits=bits, **new).param_groups[0]
    assert {k: v for k, v in group.items() if k != "params"} == {k: v for k, v in spelled.items() if k != "params"}
    # per group too
    with pytest.warns(DeprecationWarning):
        opt = Shampoo4bit([{"params": [p], "quantize": old}], bits=bits)
    assert {k: opt.param_groups[0][k] for k in new} == new


def test_new_spelling_defaults_resolve_per_storage():
    def group(**kw):
        return Shampoo4bit([torch.nn.Parameter(torch.zeros(4, 4))], **kw).param_groups[0]

    keys = ("statistic_bits", "error_feedback", "codebook", "block_size", "root_block_size")
    assert tuple(group()[k] for k in keys) == (8, False, "linear1.5", 1200, 40)
    assert tuple(group(storage="cholesky", statistic_bits=4)[k] for k in keys) == (4, True, "linear2", 64, 256)
    assert tuple(group(storage="eigenvectors", bits=8)[k] for k in keys) == (8, False, "linear2", 64, 256)
    assert tuple(group(storage="naive")[k] for k in keys) == (4, False, "linear2", 64, 256)
    assert tuple(group(bits=32)[k] for k in keys[:2]) == (32, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling never warns
        group(storage="naive", statistic_bits=8)


LEGACY = torch.load(DATA / "legacy_checkpoints.pt", weights_only=True)


@pytest.fixture
def one_thread(monkeypatch):
    """The conditions the states were saved in, whatever an earlier test changed: one torch thread
    (as tests/conftest.py sets it; matmuls round alike only with the same thread count) and
    moments quantized from 4096 elements on (0.2.0's threshold)."""
    from lightning_shampoo4.quant import moments

    monkeypatch.setattr(moments, "MIN_QUANTIZED_NUMEL", 4096)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(CASES))
def test_states_saved_before_the_rename_resume_bit_for_bit(name, one_thread):
    """States saved by 0.2.0 (``quantize=``), loaded into an optimizer built with today's
    defaults, continue exactly as the optimizer that saved them did."""
    case = LEGACY[name]
    net = model()
    net.load_state_dict(case["model"])
    opt = Shampoo4bit(net.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an old checkpoint is no mistake of the user: no warning
        opt.load_state_dict(copy.deepcopy(case["optimizer"]))
    assert "quantize" not in opt.param_groups[0]
    run(net, opt, 2, 2)
    for key, value in net.state_dict().items():
        assert torch.equal(value, case["after"][key]), key
    # and today's spelling of the same settings gives the same run from scratch
    new = S.quantize_to_storage(case["kwargs"]["quantize"], case["kwargs"].get("bits", 4))
    kwargs = {k: v for k, v in case["kwargs"].items() if k != "quantize"} | new
    fresh = model()
    opt = Shampoo4bit(fresh.parameters(), lr=1e-2, stat_interval=2, root_interval=4, min_quant_numel=100, **kwargs)
    run(fresh, opt, 8, 1)
    run(fresh, opt, 2, 2)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, case["after"][key]), key
