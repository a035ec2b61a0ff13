"""Tests for the DDPM U-Net in ddpm.nets."""

import pytest
import torch

from ddpm.nets import UNet, UNetConfig

TINY = {"channels": 16, "norm_groups": 8, "num_heads": 2, "num_res_blocks": 1}


def perturb(net: UNet) -> UNet:
    """Add noise to every parameter so zero-initialised layers pass the signal."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.parametrize(
    ("in_channels", "size", "mult", "attn"),
    [(1, 28, (1, 2, 2), (14,)), (3, 8, (1, 2), (4,)), (3, 32, (1, 2, 2, 2), (8,))],
)
def test_output_shape_matches_input(in_channels, size, mult, attn):
    net = UNet(
        in_channels=in_channels,
        image_size=size,
        channel_mult=mult,
        attn_resolutions=attn,
        **TINY,
    )
    x = torch.randn(2, in_channels, size, size)
    assert net(x, torch.tensor([0, 999])).shape == x.shape


def test_output_is_zero_at_init():
    net = UNet(**TINY)
    out = net(torch.randn(2, 1, 28, 28), torch.tensor([3, 7]))
    assert torch.equal(out, torch.zeros_like(out))


def test_long_float_and_scalar_t():
    net = perturb(UNet(**TINY)).eval()
    x = torch.randn(2, 1, 28, 28)
    out_long = net(x, torch.tensor([5, 5]))
    out_float = net(x, torch.tensor([5.0, 5.0]))
    out_scalar = net(x, torch.tensor(5))
    torch.testing.assert_close(out_long, out_float)
    torch.testing.assert_close(out_long, out_scalar)
    assert net(x, torch.rand(2) * 1000).shape == x.shape


def test_config_and_overrides():
    config = UNetConfig(**TINY)
    net = UNet(config, dropout=0.0)
    assert net.config.channels == 16 and net.config.dropout == 0.0
    assert UNet(config).config is config


def test_class_conditioning_and_null_class():
    net = perturb(UNet(num_classes=3, **TINY)).eval()
    x = torch.randn(2, 1, 28, 28)
    t = torch.tensor([10, 10])
    out0 = net(x, t, torch.tensor([0, 0]))
    out1 = net(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(out0, out1)
    torch.testing.assert_close(net(x, t), net(x, t, torch.full((2,), 3)))


def test_unconditional_net_rejects_y():
    net = UNet(**TINY)
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.randn(1, 1, 28, 28), torch.tensor([0]), torch.tensor([0]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_size": 30}, "image_size=30 must be divisible by 4"),
        ({"attn_resolutions": (10,)}, "allowed: \\[28, 14, 7\\]"),
        ({"num_heads": 3}, "num_heads=3 must divide"),
        ({"channels": 24, "norm_groups": 16}, "norm_groups=16 must divide"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        UNet(**{**TINY, **overrides})


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 1, 32, 32), (1, 28, 28)])
def test_wrong_input_shape_raises(shape):
    net = UNet(**TINY)
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        net(torch.randn(shape), torch.tensor([0]))


def test_gradients_reach_all_parameters():
    net = perturb(UNet(num_classes=3, **TINY))
    out = net(torch.randn(2, 1, 28, 28), torch.tensor([1, 500]), torch.tensor([0, 2]))
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_channels_last_matches_contiguous():
    net = perturb(
        UNet(
            in_channels=3,
            image_size=8,
            channel_mult=(1, 2),
            attn_resolutions=(8, 4),
            **TINY,
        )
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([1, 2])
    expected = net(x, t)
    x_cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net(x_cl, t), expected, atol=1e-5, rtol=0)
    net.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net(x_cl, t), expected, atol=1e-5, rtol=0)


def test_batch_independence():
    net = perturb(UNet(num_classes=3, **TINY)).eval()
    x = torch.randn(3, 1, 28, 28)
    t = torch.tensor([0, 400, 999])
    y = torch.tensor([0, 1, 2])
    batched = net(x, t, y)
    single = torch.cat([net(x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
