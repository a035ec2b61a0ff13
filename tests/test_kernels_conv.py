"""The convolution and residual block fast paths (``ddpm.kernels.conv2d``, ``conv_norm``, ``lazy_cat``) against
``nn.Conv2d`` and the plain sums: the Winograd kernel, the bias gradient apart, oneDNN's fused sums, inputs as parts
and the time bias in the GroupNorm kernel."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ci_skips import NO_BF16_CPU
from conftest import needs_native
from ddpm import kernels, nets
from ddpm.nets import Conv2d, GroupNorm, UNet
from kernel_inputs import perturb


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
    for tile, tolerance in ((2, 1e-5), (4, 5e-5)):  # F(4x4, 3x3) rounds ~10x more (tests/test_kernels_winograd.py)
        with kernels.using(winograd_tile=tile):
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
    with kernels.using(winograd=False):
        assert type(conv(x).grad_fn).__name__.startswith("_Conv2dBackwardWithBiasSum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16


@needs_native
@pytest.mark.parametrize("winograd", [True, False])
def test_conv_adds_the_image_bias_and_the_residual_and_upsamples(winograd):
    torch.manual_seed(0)
    conv = Conv2d(16, 32, 3, padding=1).to(memory_format=torch.channels_last)
    with kernels.using(winograd=winograd):
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
        return block(self, kernels.cat(x), emb)

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
    with kernels.using(separate_bias_grad=False):
        assert not type(conv(x).grad_fn).__name__.startswith("_Conv2d")


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason=NO_BF16_CPU)
@pytest.mark.skipif(
    torch.ops.mkldnn._is_mkldnn_bf16_supported() and kernels.conv.POINTWISE is None,
    reason="this torch build has no oneDNN convolution post-ops",
)
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
        with kernels.using(fused_sum=fused), torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
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
        bf16 = precision == "bf16-mixed"
        with kernels.using(bias_in_norm=in_norm), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = block(x, emb)
        return out, torch.autograd.grad(out.float().square().sum(), (x, emb, *block.parameters()))

    GroupNorm.forward = recording
    try:
        (out, grads), (want, want_grads) = run(True), run(False)
    finally:
        GroupNorm.forward = norm
    assert shifts == [False, True, False, False]  # norm1, norm2 with the shift; then norm1, norm2 without it
    tol = 1e-5 if precision == "32-true" else 3e-2
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
    for got, wanted in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, wanted, atol=10 * tol, rtol=10 * tol)
