"""Tests for the model zoo: shapes and gradients, parameter counts, registry behaviour, Swin masking."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from lightning_shampoo4.models import DropPath, UnknownModelError, create_model, list_models, register_model
from lightning_shampoo4.models import _registry
from lightning_shampoo4.models.swin import SwinBlock, shifted_window_mask, window_partition, window_reverse

DIGITS_MODELS = ["mlp", "small_cnn"]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_trains(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    """One forward/backward: logits of the right shape, every parameter gets a finite gradient."""
    model.train()
    logits = model(x)
    assert logits.shape == (x.shape[0], num_classes)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.arange(x.shape[0]) % num_classes).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(param.grad).all(), f"non-finite gradient for {name}"


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_img32(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=3, img_size=32, width=0.125)
    assert_trains(model, torch.randn(2, 3, 32, 32), num_classes=7)


@pytest.mark.parametrize("name", [*DIGITS_MODELS, "resnet18", "vgg19_bn", "vit_tiny"])
def test_forward_backward_digits(name: str) -> None:
    torch.manual_seed(0)
    width = 1.0 if name in DIGITS_MODELS else 0.125
    model = create_model(name, num_classes=10, in_chans=1, img_size=8, width=width)
    assert_trains(model, torch.randn(2, 1, 8, 8), num_classes=10)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet18", 11.2e6),
        ("resnet34", 21.3e6),
        ("vgg19_bn", 20.1e6),
        ("vit_small", 21.3e6),
        ("swin_tiny", 27.5e6),
    ],
)
def test_param_counts_cifar100(name: str, expected: float) -> None:
    model = create_model(name, num_classes=100, img_size=32)
    assert num_params(model) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("name", DIGITS_MODELS)
def test_digits_models_learn(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1, img_size=8)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_width_keeps_dims_valid() -> None:
    vit = create_model("vit_small", width=0.01, depth=1)
    assert vit.num_features % 6 == 0 and vit.num_features >= 6
    swin = create_model("swin_tiny", width=0.01, depths=(1, 1))
    assert swin.num_features == 3 * 2  # base width 3 (one per head), doubled once
    resnet = create_model("resnet18", width=0.01)
    assert resnet.num_features >= 4
    for model in (vit, swin, resnet):
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_kwargs_reach_the_model() -> None:
    vit = create_model("vit_tiny", width=0.125, depth=2, patch_size=8, drop_path_rate=0.0)
    assert len(vit.blocks) == 2
    assert vit.pos_embed.shape[1] == (32 // 8) ** 2 + 1
    swin = create_model("swin_tiny", width=0.125, depths=(2, 2))
    assert len(swin.stages) == 2
    assert swin.stages[1][0].attn.num_heads == 6


def test_swin_img16_and_small_resolutions() -> None:
    model = create_model("swin_tiny", num_classes=5, img_size=16, width=0.125)
    assert_trains(model, torch.randn(2, 3, 16, 16), num_classes=5)
    # Stages at 8, 4, 2, 1 tokens: at or below the window (4), one window covers the map, no shift.
    blocks = [m for m in model.modules() if isinstance(m, SwinBlock)]
    assert {(b.resolution, b.window_size, b.shift_size) for b in blocks} == {
        (8, 4, 0), (8, 4, 2), (4, 4, 0), (2, 2, 0), (1, 1, 0),
    }  # fmt: skip


@pytest.mark.parametrize("img_size", [8, 24, 33])
def test_swin_bad_img_size(img_size: int) -> None:
    with pytest.raises(ValueError, match=f"img_size={img_size}"):
        create_model("swin_tiny", img_size=img_size, width=0.125)


def test_vit_bad_sizes() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        create_model("vit_small", img_size=30, width=0.125)
    model = create_model("vit_small", img_size=32, width=0.125, depth=1)
    with pytest.raises(ValueError, match="32x32"):
        model(torch.randn(1, 3, 16, 16))


def test_window_partition_roundtrip() -> None:
    x = torch.randn(2, 8, 8, 5)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 4, 16, 5)
    assert torch.equal(windows[1], x[0, :4, 4:].reshape(16, 5))
    assert torch.equal(window_reverse(windows, 4, 8, 8), x)


def test_shifted_window_mask_regions() -> None:
    mask = shifted_window_mask(resolution=8, window_size=4, shift_size=2)
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window holds a single region
    # The bottom-right window holds 4 regions of 4 tokens: each token sees 4 of the 16.
    assert ((mask[3] == 0).sum(-1) == 4).all()


def test_window_attention_matches_explicit_softmax() -> None:
    """The fused SDPA path equals softmax(q k^T / sqrt(d) + bias + mask[window]) v, per window,
    for a batch of 2 images (windows ordered batch-major)."""
    torch.manual_seed(0)
    block = SwinBlock(dim=8, resolution=8, num_heads=2, window_size=4, shift_size=2)
    attn, mask = block.attn, block.attn_mask
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(2 * 4, 16, 8)
    q, k, v = attn.qkv(x).view(8, 16, 3, 2, 4).permute(2, 0, 3, 1, 4)
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)]
    bias = bias.view(16, 16, 2).permute(2, 0, 1)
    scores = q @ k.transpose(-1, -2) / 2.0 + bias + mask.repeat(2, 1, 1)[:, None]
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(8, 16, 8))
    torch.testing.assert_close(attn(x, mask), expected)


def test_shifted_window_attention_does_not_wrap_around() -> None:
    """In a shifted block, output (0, 0) depends on its neighbour (1, 1) but not on (7, 7), which
    the cyclic shift puts in the same window."""
    torch.manual_seed(0)
    block = SwinBlock(dim=6, resolution=8, num_heads=2, window_size=4, shift_size=2).eval()
    x = torch.randn(1, 8, 8, 6, requires_grad=True)
    block(x)[0, 0, 0].sum().backward()
    assert x.grad[0, 1, 1].abs().sum() > 0
    assert x.grad[0, 7, 7].abs().sum() == 0


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(UnknownModelError) as info:
        create_model("resnet19")
    message = str(info.value)
    assert "'resnet18'" in message
    assert all(name in message for name in list_models())
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)


def test_width_must_be_positive() -> None:
    with pytest.raises(ValueError, match="width"):
        create_model("resnet18", width=0.0)


def test_list_models_pattern() -> None:
    names = list_models()
    assert names == sorted(names)
    expected = {"resnet18", "resnet34", "vgg19_bn", "vit_small", "vit_tiny", "swin_tiny", "mlp", "small_cnn"}
    assert expected <= set(names)
    assert list_models("vit_*") == ["vit_small", "vit_tiny"]
    assert list_models("resnet*") == ["resnet18", "resnet34"]
    assert list_models("no_such_*") == []


def test_register_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "_MODELS", dict(_registry._MODELS))

    @register_model("linear_probe")
    def build(num_classes: int, in_chans: int, img_size: int, width: float, bias: bool = True) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * img_size**2, num_classes, bias=bias))

    model = create_model("linear_probe", num_classes=3, in_chans=1, img_size=4, bias=False)
    assert model(torch.randn(2, 1, 4, 4)).shape == (2, 3)
    assert "linear_probe" in list_models()
    with pytest.raises(ValueError, match="already registered"):
        register_model(name="linear_probe")(lambda **kwargs: nn.Identity())


def test_drop_path_is_identity_in_eval() -> None:
    x = torch.randn(8, 4)
    layer = DropPath(0.5)
    assert layer.eval()(x) is x
    torch.manual_seed(0)
    out = layer.train()(x)
    kept = (out != 0).all(dim=1)
    assert torch.allclose(out[kept], 2 * x[kept]) and (out[~kept] == 0).all()


@pytest.mark.parametrize("name", ["vit_tiny", "swin_tiny"])
def test_eval_output_deterministic(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, width=0.125, drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


def test_timm_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(ImportError, match="pip install timm"):
        create_model("timm:resnet18")


def test_timm_models_are_delegated(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_create_model(name: str, **kwargs):
        calls.append((name, kwargs))
        if "img_size" in kwargs and name.startswith("resnet"):
            raise TypeError("ResNet.__init__() got an unexpected keyword argument 'img_size'")
        return nn.Identity()

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=fake_create_model))
    create_model("timm:vit_tiny_patch16_224", num_classes=5, in_chans=1, img_size=64)
    assert calls[-1] == (
        "vit_tiny_patch16_224",
        dict(img_size=64, pretrained=False, num_classes=5, in_chans=1),
    )
    create_model("timm:resnet18", num_classes=100, drop_rate=0.1)
    assert calls[-1] == ("resnet18", dict(pretrained=False, num_classes=100, in_chans=3, drop_rate=0.1))
    with pytest.raises(ValueError, match="width"):
        create_model("timm:resnet18", width=0.5)
