"""The native Winograd 3x3 convolution against PyTorch's: values, gradients, a bias per image, the residual, the
upsampled input, fallbacks and bad input."""

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_native
from ddpm import kernels
from kernel_inputs import CL

# (N, Cin, Cout, H, W): the net's maps (28, 14, 7), odd and tiny maps, images with fewer tiles than a task holds,
# output channels padded within the kernel (the net's last convolution has one)
CONV_SHAPES = [
    (3, 32, 32, 28, 28),
    (2, 128, 64, 14, 14),
    (5, 64, 16, 7, 7),
    (2, 16, 48, 5, 9),
    (3, 32, 16, 1, 1),
    (2, 32, 1, 9, 9),
    (2, 16, 24, 6, 6),
]


def conv_inputs(N, Cin, Cout, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, Cin, H, W, generator=g).contiguous(memory_format=CL)
    weight = torch.randn(Cout, Cin, 3, 3, generator=g) / (9 * Cin) ** 0.5
    return x, weight, torch.randn(Cout, generator=g)


# per tile size: the bound on the error, as a multiple of PyTorch's own float32 error or a fraction of the largest
# value (where float32 rounds exactly); F(4x4, 3x3)'s transforms weigh inputs by up to 8 and filters by 1/6, 1/24
WINOGRAD_ERROR = {2: (2.0, 2e-6), 4: (24.0, 2e-5)}


@needs_native
@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_convolution_matches_float64(shape, with_bias, tile):
    """Values and all three gradients against float64 PyTorch, within WINOGRAD_ERROR."""
    x, weight, bias = conv_inputs(*shape)
    bias = bias if with_bias else None
    assert kernels.conv3x3_applies(x, weight)
    leaves = [t.clone().requires_grad_() for t in (x, weight) + ((bias,) if with_bias else ())]
    out = kernels.conv3x3(*leaves[:2], leaves[2] if with_bias else None, kernels.winograd_weights(weight, tile))
    assert type(out.grad_fn).__name__.startswith("_Conv3x3") and out.is_contiguous(memory_format=CL)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dy)
    exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
    exact = F.conv2d(*exact_leaves, padding=1)
    exact_grads = torch.autograd.grad(exact, exact_leaves, dy.double())
    plain_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    plain = F.conv2d(*plain_leaves, padding=1)
    plain_grads = torch.autograd.grad(plain, plain_leaves, dy)
    factor, fraction = WINOGRAD_ERROR[tile]
    for ours, theirs, truth in zip((out, *grads), (plain, *plain_grads), (exact, *exact_grads)):
        error = (ours.double() - truth).abs().max().item()
        assert error <= max(factor * (theirs.double() - truth).abs().max().item(), fraction * truth.abs().max().item())


@needs_native
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_adds_a_bias_per_image_and_a_residual_as_it_writes(tile):
    """conv + bias[n] + residual in one pass, with the gradients of all five inputs, against float64 PyTorch."""
    x, weight, _ = conv_inputs(3, 32, 16, 7, 7)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(3, 16, generator=g)
    residual = torch.randn(3, 16, 7, 7, generator=g).contiguous(memory_format=CL)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, residual)]
    out = kernels.conv3x3(leaves[0], leaves[1], leaves[2], kernels.winograd_weights(weight, tile), leaves[3])
    assert type(out.grad_fn).__name__.startswith("_Conv3x3")
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dy)
    exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
    xe, we, be, re = exact_leaves
    exact = F.conv2d(xe, we, padding=1) + be[:, :, None, None] + re
    exact_grads = torch.autograd.grad(exact, exact_leaves, dy.double())
    for ours, truth in zip((out, *grads), (exact, *exact_grads)):
        assert (ours.double() - truth).abs().max() <= WINOGRAD_ERROR[tile][1] * truth.abs().max()
    with torch.inference_mode():  # and without autograd, where PyTorch's ops run: the same sums
        fast = kernels.conv3x3(x, weight, bias, None, residual)
        plain = kernels.conv3x3(x.contiguous(), weight, bias, None, residual)
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)


@needs_native
@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("size", [7, 4])
def test_winograd_convolves_the_upsampled_input_read_from_x(tile, size):
    """upsample=True: the convolution of x upsampled x2 (nearest), values and gradients against float64 PyTorch."""
    x, weight, bias = conv_inputs(2, 32, 16, size, size)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = kernels.conv3x3(*leaves, kernels.winograd_weights(weight, tile), upsample=True)
    assert out.shape == (2, 16, 2 * size, 2 * size) and type(out.grad_fn).__name__.startswith("_Conv3x3")
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dy)
    exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
    up = F.interpolate(exact_leaves[0], scale_factor=2.0, mode="nearest")
    exact = F.conv2d(up, *exact_leaves[1:], padding=1)
    exact_grads = torch.autograd.grad(exact, exact_leaves, dy.double())
    for ours, truth in zip((out, *grads), (exact, *exact_grads)):
        assert ours.shape == truth.shape
        assert (ours.double() - truth).abs().max() <= WINOGRAD_ERROR[tile][1] * truth.abs().max()


@needs_native
def test_winograd_inference_matches_training_mode_and_takes_given_weights():
    x, weight, bias = conv_inputs(2, 32, 16, 9, 9)
    with torch.inference_mode():
        inferred = kernels.conv3x3(x, weight, bias)
        given = kernels.conv3x3(x, weight, bias, kernels.winograd_weights(weight))
    assert inferred.grad_fn is None and torch.equal(inferred, given)
    trained = kernels.conv3x3(x.clone().requires_grad_(), weight, bias)
    assert torch.equal(inferred, trained.detach()) and torch.equal(inferred, kernels.conv3x3(x, weight, bias))
    # the transform of one filter: G g G^T (Lavin and Gray's G of F(2x2, 3x3) and F(4x4, 3x3))
    G2 = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1.0]])
    G4 = torch.tensor([[6.0, 0, 0], [-4, -4, -4], [-4, 4, -4], [1, 2, 4], [1, -2, 4], [0, 0, 24]]) / 24
    for m, G in ((2, G2), (4, G4)):
        u = kernels.winograd_weights(weight, m)
        torch.testing.assert_close(u[:, 3, 5].reshape(m + 2, m + 2), G @ weight[5, 3] @ G.T)
        padded = kernels.winograd_weights(weight[:5], m)  # 5 filters: padded with zeros to 16 columns
        assert padded.shape == ((m + 2) ** 2, 32, 16) and not padded[:, :, 5:].any()
        assert torch.equal(padded[:, :, :5], u[:, :, :5])


@needs_native
def test_winograd_falls_back_to_pytorch_where_it_does_not_apply(monkeypatch):
    """NCHW activations, input channels not a multiple of 16, float64, other filter sizes and the switch off:
    PyTorch's convolution, same values."""
    x, weight, bias = conv_inputs(2, 32, 16, 6, 6)
    cases = [
        (x.contiguous(), weight),
        (x[:, :24].contiguous(memory_format=CL), weight[:, :24]),
        (x.double(), weight.double()),
    ]
    for xi, wi in cases:
        assert not kernels.conv3x3_applies(xi, wi)
        out = kernels.conv3x3(xi.requires_grad_(), wi, bias[: wi.shape[0]].to(wi.dtype))
        assert not type(out.grad_fn).__name__.startswith("_Conv3x3")
        torch.testing.assert_close(out, F.conv2d(xi, wi, bias[: wi.shape[0]].to(wi.dtype), padding=1))
    assert not kernels.conv3x3_applies(x, torch.randn(16, 32, 5, 5))
    monkeypatch.setenv(kernels.ENV, "0")
    assert not kernels.conv3x3_applies(x, weight)


@needs_native
def test_bad_input_to_the_winograd_kernel_is_named():
    ext = kernels.extension()
    x, weight, bias = conv_inputs(2, 32, 16, 6, 6)
    u = kernels.winograd_weights(weight)
    with pytest.raises(RuntimeError, match="channels_last float32"):
        ext.winograd_conv3x3(x.contiguous(), u, bias)
    with pytest.raises(RuntimeError, match=r"\[16 or 36, Cin, Cout\], Cin = x.size\(1\), both padded with zeros"):
        ext.winograd_conv3x3(x, u[:, :16].contiguous(), bias)
    with pytest.raises(RuntimeError, match=r"\[16 or 36, Cin, Cout\]"):
        ext.winograd_conv3x3(x, u[:25].contiguous(), bias)
    with pytest.raises(RuntimeError, match=r"\[16 or 36, Cin, Cout\]"):
        ext.winograd_conv3x3(x, u[:, :, :8].contiguous(), bias)
    with pytest.raises(RuntimeError, match="out_channels=17 does not round up to the transformed weights' 16 columns"):
        ext.winograd_conv3x3(x, u, None, None, False, 17)
    with pytest.raises(RuntimeError, match=r"bias must be float32 \[Cout\] or, one per image, \[N, Cout\]"):
        ext.winograd_conv3x3(x, u, bias[:8])
    with pytest.raises(RuntimeError, match=r"residual must be a channels_last float32 tensor shaped like the output"):
        ext.winograd_conv3x3(x, u, bias, torch.zeros(2, 16, 6, 6))
    with pytest.raises(ValueError, match=r"bias must be \[Cout\] or \[N, Cout\], got \[1, 2, 16\]"):
        kernels.conv3x3(x, weight, bias[None, None].expand(1, 2, 16))
    dy = torch.randn(2, 16, 6, 6).contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match="dy must be a channels_last float32 tensor"):
        ext.winograd_conv3x3_weight_grad(x, dy[:, :, :5].contiguous(memory_format=CL), 4)
    with pytest.raises(RuntimeError, match="tiles of 2x2 or 4x4 outputs, got m=3"):
        ext.winograd_conv3x3_weight_grad(x, dy, 3)
