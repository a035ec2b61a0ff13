"""The native attention kernel against PyTorch's SDPA: values, gradients, fallbacks and bad input."""

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_native
from ddpm import kernels


def attention_reference(qkv):
    """PyTorch's SDPA in float64 on qkv [B, L, 3, heads, d]: [B, L, heads, d]."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


ATTENTION_SHAPES = [(3, 49, 4, 16), (2, 7, 2, 5), (2, 1, 1, 3), (2, 100, 3, 32), (1, 17, 2, 20), (2, 196, 2, 16)]


@needs_native
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("spread", [1.0, 8.0])
def test_attention_kernel_matches_float64_sdpa(shape, spread):
    """Values and the gradient of qkv, through autograd, against float64, within 2e-5 of the largest or as close
    as PyTorch's own float32 SDPA. ``spread`` 8 makes scores of a few hundred, where each softmax is nearly
    one-hot (exp must neither overflow nor lose the small probabilities' gradients) and float32 scores carry
    errors the softmax amplifies."""
    B, L, H, d = shape
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(B, L, 3, H, d, generator=g) * spread).requires_grad_()
    dout = torch.randn(B, L, H, d, generator=g)
    out = kernels.attention(qkv)
    assert type(out.grad_fn).__name__.startswith("_Attention") and out.shape == (B, L, H, d)
    out.backward(dout)
    ref_in = qkv.detach().double().requires_grad_()
    ref = attention_reference(ref_in)
    ref.backward(dout.double())
    torch_in = qkv.detach().clone().requires_grad_()
    torch_out = attention_reference(torch_in)
    torch_out.backward(dout)
    assert torch.isfinite(out).all() and torch.isfinite(qkv.grad).all()
    for got, by_torch, want in ((out, torch_out, ref), (qkv.grad, torch_in.grad, ref_in.grad)):
        error = (got.double() - want).abs().max() / want.abs().max()
        torch_error = (by_torch.double() - want).abs().max() / want.abs().max()
        assert error < max(2e-5, 2 * torch_error), (error, torch_error)


@needs_native
def test_attention_inference_matches_training_mode_and_is_deterministic():
    qkv = torch.randn(4, 49, 3, 4, 16)
    with torch.inference_mode():
        inferred = kernels.attention(qkv)
    assert inferred.grad_fn is None
    trained = kernels.attention(qkv.clone().requires_grad_())
    assert torch.equal(inferred, trained.detach()) and torch.equal(inferred, kernels.attention(qkv))


@needs_native
def test_attention_falls_back_to_sdpa_where_the_kernel_does_not_apply(monkeypatch):
    """Over ATTENTION_MAX_TOKENS tokens, with ``native=False``, for float64, and with the switch off: PyTorch's
    SDPA, same values."""
    for L, native in ((kernels.ATTENTION_MAX_TOKENS + 1, True), (49, False)):
        qkv = torch.randn(2, L, 3, 2, 8, requires_grad=True)
        out = kernels.attention(qkv, native=native)
        assert not type(out.grad_fn).__name__.startswith("_Attention")
        torch.testing.assert_close(out.double(), attention_reference(qkv.detach().double()), atol=1e-5, rtol=1e-5)
    qkv = torch.randn(2, 49, 3, 2, 8, dtype=torch.float64)  # float64 stays float64: SDPA, not a float32 kernel
    out = kernels.attention(qkv)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, attention_reference(qkv), atol=1e-12, rtol=1e-12)
    monkeypatch.setenv(kernels.ENV, "0")
    out = kernels.attention(torch.randn(2, 49, 3, 2, 8, requires_grad=True))
    assert not type(out.grad_fn).__name__.startswith("_Attention")


@needs_native
def test_bad_input_to_the_attention_kernel_is_named():
    with pytest.raises(ValueError, match=r"qkv must have shape \[B, L, 3, heads, d\], got \[2, 49, 2, 4, 8\]"):
        kernels.attention(torch.randn(2, 49, 2, 4, 8))
    ext = kernels.extension()
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ext.attention_forward(torch.randn(2, 3, 49, 4, 8).transpose(1, 2), 0.5)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ext.attention_forward(torch.randn(2, 49, 3, 4, 8).double(), 0.5)
    qkv = torch.randn(2, 49, 3, 4, 8)
    out, lse = ext.attention_forward(qkv, 0.5)
    with pytest.raises(RuntimeError, match="dout and out"):
        ext.attention_backward(out[:, :10], qkv, out, lse, 0.5)
