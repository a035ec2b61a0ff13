"""Tests for the DDPM U-Net in ddpm.nets."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import needs_native
from ddpm import nets
from ddpm.nets import Attention, Conv2d, GroupNorm, UNet, UNetConfig, group_norm

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


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_inference_writes_in_place_without_changing_the_output(precision):
    """Without autograd the blocks overwrite their own intermediates: the output is bit for bit the training path's,
    and the input and the parameters are left untouched."""
    net = perturb(UNet(num_classes=3, attn_resolutions=(14, 7), **TINY)).eval()
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 500, 999]), torch.tensor([0, 2, 3])
    x_before, params_before = x.clone(), copy.deepcopy(net.state_dict())
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with autocast:
        with_grad = net(x, t, y)
        with torch.no_grad():
            no_grad = net(x, t, y)
        with torch.inference_mode():
            inference = net(x, t, y)
    assert with_grad.requires_grad
    assert torch.equal(no_grad, with_grad.detach()) and torch.equal(inference, no_grad)
    assert torch.equal(x, x_before)
    for name, value in net.state_dict().items():
        assert torch.equal(value, params_before[name]), name


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


def _textbook_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """x + proj_out(softmax(q^T k / sqrt(d)) v) per head, with q, k, v from the 1x1 qkv convolution."""
    B, C, H, W = x.shape
    heads, d = attn.num_heads, C // attn.num_heads
    q, k, v = attn.qkv(attn.norm(x)).reshape(B, 3, heads, d, H * W).unbind(dim=1)  # [B, heads, d, HW]
    weights = torch.softmax(q.transpose(-1, -2) @ k / d**0.5, dim=-1)  # [B, heads, HW (query), HW (key)]
    h = (v @ weights.transpose(-1, -2)).reshape(B, C, H, W)
    return x + attn.proj_out(h)


@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_matches_the_textbook_formula(channels_last):

    attn = perturb(Attention(32, 4, 8))
    x = torch.randn(3, 32, 5, 6)
    expected = _textbook_attention(attn, x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_attention_uses_a_fused_sdpa_kernel():
    """q, k and v have unit stride along the head dimension, so SDPA does not fall back to its math kernel."""
    from torch.profiler import profile

    def kernels(fn) -> set[str]:
        with torch.no_grad(), profile() as prof:
            fn()
        return {e.key for e in prof.key_averages() if "attention" in e.key}

    q = torch.randn(2, 4, 49, 8)
    if "aten::_scaled_dot_product_attention_math" in kernels(lambda: F.scaled_dot_product_attention(q, q, q)):
        pytest.skip("no fused SDPA kernel on this platform")
    attn = Attention(32, 4, 8)
    attn.native = False  # PyTorch's SDPA (the path on GPUs), not the native CPU kernel
    assert "aten::_scaled_dot_product_attention_math" not in kernels(lambda: attn(torch.randn(2, 32, 7, 7)))


def test_group_norm_runs_in_float32_and_keeps_the_dtype():
    norm = perturb(group_norm(32, 8))
    x = torch.randn(2, 32, 5, 5)
    plain = nn.GroupNorm(8, 32)
    plain.load_state_dict(norm.state_dict())
    torch.testing.assert_close(norm(x), plain(x), atol=0, rtol=0)
    reference = F.group_norm(x.bfloat16().float(), 8, norm.weight, norm.bias)
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference.bfloat16())
    assert set(norm.state_dict()) == {"weight", "bias"} and isinstance(norm, nn.GroupNorm)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_activation_layout_does_not_change_the_output(memory_format):
    net = perturb(UNet(in_channels=3, image_size=8, channel_mult=(1, 2), attn_resolutions=(8, 4), **TINY)).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    expected = net(x, t)
    net.memory_format = memory_format
    out = net(x, t)
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_bf16_autocast_is_as_accurate_as_plain_autocast_and_trains():
    """GroupNorm and attention in float32 under bf16 autocast lose no accuracy against torch's own bf16 path."""
    net = perturb(UNet(**TINY))
    plain = copy.deepcopy(net)
    plain.memory_format = torch.contiguous_format
    for m in plain.modules():
        if isinstance(m, GroupNorm):
            m.float32 = False
        if isinstance(m, Attention):
            m.float32_on_cpu = False
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([1, 10, 100, 900])
    expected = net(x, t).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_plain = net(x, t), plain(x, t)
    error, error_plain = ((o.float() - expected).norm() for o in (out, out_plain))
    assert error <= 1.05 * error_plain
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize(("kernel", "stride", "input_grad"), [(3, 1, True), (3, 2, True), (1, 1, True), (3, 1, False)])
def test_conv_with_the_bias_gradient_apart_matches_nn_conv2d(kernel, stride, input_grad):
    """Same output and gradients as nn.Conv2d (input_grad False: the first convolution, on the data)."""
    torch.manual_seed(0)
    conv = Conv2d(6, 5, kernel, stride=stride, padding=kernel // 2).to(memory_format=torch.channels_last)
    plain = nn.Conv2d(6, 5, kernel, stride=stride, padding=kernel // 2)
    plain.load_state_dict(conv.state_dict())
    assert set(conv.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 6, 9, 9).contiguous(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_(input_grad) for _ in range(2)]
    out, expected = conv(xs[0]), plain(xs[1])
    assert type(out.grad_fn).__name__.startswith("_Conv2dBackwardWithBiasSum")
    dy = torch.randn_like(out)
    out.backward(dy)
    expected.backward(dy)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for a, b in ((conv.weight.grad, plain.weight.grad), (conv.bias.grad, plain.bias.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if input_grad:
        torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-5, rtol=1e-5)
    else:
        assert xs[0].grad is None


@needs_native
def test_conv_runs_winograd_for_3x3_stride_1_and_keeps_the_transform_while_the_weight_is_unchanged():
    torch.manual_seed(0)
    conv = Conv2d(32, 16, 3, padding=1).to(memory_format=torch.channels_last)
    plain = nn.Conv2d(32, 16, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 32, 7, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    for tile, tolerance in ((2, 1e-5), (4, 5e-5)):  # F(4x4, 3x3) rounds ~10x more (tests/test_kernels.py)
        conv.winograd_tile = tile
        out = conv(x)
        assert type(out.grad_fn).__name__.startswith("_Conv3x3") and out.grad_fn.m == tile
        torch.testing.assert_close(out, plain(x), atol=tolerance, rtol=tolerance)
    with torch.no_grad():
        first = conv(x)
        u = conv._winograd_cache[1]
        conv(x)
        assert conv._winograd_cache[1] is u  # kept
        conv.weight.mul_(2)  # in place: a new version of the weight
        torch.testing.assert_close(conv(x), 2 * first - conv.bias[:, None, None], atol=5e-5, rtol=5e-5)
        assert conv._winograd_cache[1] is not u
        conv.load_state_dict(plain.state_dict())
        torch.testing.assert_close(conv(x), first, atol=0, rtol=0)
    conv.winograd = False
    assert type(conv(x).grad_fn).__name__.startswith("_Conv2dBackwardWithBiasSum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16


@needs_native
@pytest.mark.parametrize("winograd", [True, False])
def test_conv_adds_the_image_bias_and_the_residual_and_upsamples(winograd):
    torch.manual_seed(0)
    conv = Conv2d(16, 32, 3, padding=1).to(memory_format=torch.channels_last)
    conv.winograd = winograd
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    image_bias, residual = torch.randn(2, 32, requires_grad=True), torch.randn(2, 32, 5, 5, requires_grad=True)
    out = conv(x, image_bias=image_bias, residual=residual)
    assert type(out.grad_fn).__name__.startswith("_Conv3x3") == winograd
    expected = F.conv2d(x, conv.weight, conv.bias, padding=1) + image_bias[:, :, None, None] + residual
    torch.testing.assert_close(out, expected, atol=5e-5, rtol=5e-5)
    up = conv(x, upsample=True)
    assert up.shape == (2, 32, 10, 10)
    torch.testing.assert_close(up, conv(F.interpolate(x, scale_factor=2.0, mode="nearest")), atol=5e-5, rtol=5e-5)
    leaves = (x, conv.weight, conv.bias, image_bias, residual)
    for a, b in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(expected.sum(), leaves)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_of_parts_is_the_conv_of_their_concatenation(kernel):
    """A tuple input stands for its concatenation along the channels: a 1x1 convolution sums each part's
    convolution with its slice of the weight (no concatenated copy), others make the concatenation; the same
    values and gradients either way, with the image bias and residual added."""
    torch.manual_seed(0)
    conv = Conv2d(24, 8, kernel, padding=kernel // 2).to(memory_format=torch.channels_last)
    a = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    b = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    image_bias, residual = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8, 5, 5, requires_grad=True)
    out = conv((a, b), image_bias=image_bias, residual=residual)
    expected = (
        F.conv2d(torch.cat([a, b], 1), conv.weight, conv.bias, padding=kernel // 2)
        + image_bias[:, :, None, None]
        + residual
    )
    torch.testing.assert_close(out, expected, atol=5e-5, rtol=5e-5)
    leaves = (a, b, conv.weight, conv.bias, image_bias, residual)
    for got, want in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(expected.sum(), leaves)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(
            conv((a, b)),
            F.conv2d(torch.cat([a, b], 1), conv.weight, conv.bias, padding=kernel // 2),
            atol=5e-5,
            rtol=5e-5,
        )
    if kernel == 1:
        with pytest.raises(ValueError, match="parts of x have 32 channels in all; this convolution takes 24"):
            conv((a, a))


def test_a_decoder_block_reads_its_input_and_skip_connection_as_parts():
    """The U-Net's decoder blocks take (h, skip) without concatenating them; the net's output and gradients are
    those of the blocks run on the concatenation."""
    torch.manual_seed(0)
    net = perturb(
        UNet(
            in_channels=1,
            image_size=8,
            channels=16,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(4,),
            norm_groups=4,
            dropout=0.0,
        )
    )
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    seen = []
    block = nets.ResBlock.forward

    def made(self, x, emb):
        seen.append(isinstance(x, tuple))
        return block(self, nets.cat(x), emb)

    out = net(x, t)
    grads = torch.autograd.grad(out.square().sum(), list(net.parameters()))
    nets.ResBlock.forward = made
    try:
        want = net(x, t)
        want_grads = torch.autograd.grad(want.square().sum(), list(net.parameters()))
    finally:
        nets.ResBlock.forward = block
    assert seen.count(True) == 2 * 2  # the decoder's blocks: num_res_blocks + 1 per level
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for got, wanted in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, wanted, atol=1e-4, rtol=1e-4)


def test_conv_is_nn_conv2d_under_autocast_and_without_gradients():
    conv = Conv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16 and not type(out.grad_fn).__name__.startswith("_Conv2d")
    with torch.no_grad():
        assert conv(x).grad_fn is None
    conv.separate_bias_grad = False
    assert not type(conv(x).grad_fn).__name__.startswith("_Conv2d")


@pytest.mark.skipif(nets._POINTWISE is None, reason="this torch build has no oneDNN convolution post-ops")
@pytest.mark.parametrize("kernel", [1, 3])
def test_bf16_conv_adds_the_residual_and_the_other_parts_as_onednn_writes_the_output(kernel):
    """Under CPU bf16 autocast a residual (and a 1x1 convolution's second part) is added by oneDNN's post-op, with
    and without autograd alike: at least as close to float64 as the convolution followed by PyTorch's bf16
    addition, the same gradients as that path, and the same forward bits with and without autograd."""
    torch.manual_seed(0)
    conv = Conv2d(24, 16, kernel, padding=kernel // 2).to(memory_format=torch.channels_last)
    leaf = lambda *s: torch.randn(*s).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()  # noqa: E731
    a, b, residual = leaf(2, 16, 6, 6), leaf(2, 8, 6, 6), leaf(2, 16, 6, 6)
    x = (a, b) if kernel == 1 else torch.cat([a, b], 1).detach().requires_grad_()
    inputs = (a, b, residual) if kernel == 1 else (x, residual)
    params = (conv.weight, conv.bias)

    def run(fused: bool, grad: bool = True):
        conv.fused_sum = fused
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            return conv(x, residual=residual)

    fused, plain = run(True), run(False)
    assert fused.dtype == torch.bfloat16 and fused.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        w16, b16 = conv.weight.bfloat16().double(), conv.bias.bfloat16().double()
        xs = torch.cat([a, b], 1).double()
        exact = F.conv2d(xs, w16, b16, padding=kernel // 2) + residual.double()
    err_fused, err_plain = ((o.double() - exact).abs().max().item() for o in (fused, plain))
    assert err_fused <= err_plain + 1e-6 and err_fused < 0.05
    assert torch.equal(run(True, grad=False), fused.detach())
    dy = torch.randn_like(fused)
    leaves = inputs + params
    for got, want in zip(torch.autograd.grad(fused, leaves, dy), torch.autograd.grad(plain, leaves, dy)):
        torch.testing.assert_close(got.double(), want.double(), atol=2e-2, rtol=2e-2)
    if kernel == 3:
        assert type(fused.grad_fn).__name__ == "_Conv2dSumBackward"


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_block_without_winograd_hands_the_time_bias_to_its_second_norm(precision):
    """Where the first convolution is oneDNN's (8 channels: no Winograd; bf16 autocast), the time embedding's
    bias goes to the second GroupNorm, which adds it as it reads: the values and gradients of adding it to the
    convolution's output first."""
    from ddpm.nets import ResBlock

    torch.manual_seed(0)
    block = perturb(ResBlock(8, 8, 16, 0.0, 4).to(memory_format=torch.channels_last))
    x = torch.randn(3, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    emb = torch.randn(3, 16, requires_grad=True)
    shifts = []
    norm = GroupNorm.forward

    def recording(self, h, shift=None):
        shifts.append(shift is not None)
        return norm(self, h, shift)

    def run(in_norm: bool):
        block.bias_in_norm = in_norm
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            out = block(x, emb)
        return out, torch.autograd.grad(out.float().square().sum(), (x, emb, *block.parameters()))

    GroupNorm.forward = recording
    try:
        (out, grads), (want, want_grads) = run(True), run(False)
    finally:
        GroupNorm.forward = norm
        block.bias_in_norm = True
    assert shifts == [False, True, False, False]  # norm1, norm2 with the shift; then norm1, norm2 without it
    tol = 1e-5 if precision == "32-true" else 3e-2
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
    for got, wanted in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, wanted, atol=10 * tol, rtol=10 * tol)
