"""The native GroupNorm(+SiLU) kernel against PyTorch's ops: values, gradients, parts along the channels, the shift,
layouts, fallbacks and bad input."""

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_native
from ddpm import kernels
from kernel_inputs import CL, inputs, reference

SHAPES = [
    ((4, 32, 7, 9), 8),
    ((3, 64, 14, 14), 8),
    ((1, 12, 5, 5), 3),
    ((2, 16, 1, 1), 4),
    ((5, 8, 6, 6), 1),
    ((2, 8, 3, 3), 8),
]


@needs_native
@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("passes", ["best", "portable"])
def test_forward_and_backward_match_pytorch(shape, groups, silu, dtype, passes):
    """``best`` is what runs (AVX-512 where the CPU has it), through autograd; ``portable`` the plain-loop passes
    that CPUs without AVX-512 run, called directly."""
    x, weight, bias = inputs(shape, dtype, groups, offset=3.0)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).contiguous(memory_format=CL)
    if passes == "best":
        x.requires_grad_()
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        out = kernels.group_norm(x, groups, w, b, silu=silu)
        assert out.grad_fn is not None
        out.backward(dy)
        grads = x.grad, w.grad, b.grad
    else:
        ext = kernels.extension()
        out, mean, rstd = ext.forward_portable(x, weight, bias, groups, 1e-5, silu)
        grads = ext.backward_portable(dy, x, mean, rstd, weight, bias, groups, silu)
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
    xd = x.detach().double().requires_grad_()
    wd, bd = weight.double().requires_grad_(), bias.double().requires_grad_()
    expected = reference(xd, groups, wd, bd, silu)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 output: 8 bits of mantissa
    torch.testing.assert_close(out.detach().double(), expected, atol=tol, rtol=tol)

    expected.backward(dy.double())
    for got, want in zip(grads, (xd.grad, wd.grad, bd.grad)):
        scale = want.abs().max().item() + 1e-12
        # bf16 gradients: dx is rounded to bf16 and x itself was rounded before the reference saw it
        limit = 2e-5 if dtype == torch.float32 else 1e-2
        assert (got.double() - want).abs().max().item() / scale < limit


PARTS = [
    ((4, 7, 9), (32, 16), 8),  # a group of 6 channels straddles the parts
    ((3, 14, 14), (64, 32, 16), 8),
    ((2, 5, 5), (5, 11), 4),  # channel counts that are not multiples of the 16-lane vectors
    ((2, 1, 1), (8, 8, 4, 4), 3),
]


@needs_native
@pytest.mark.parametrize("size,channels,groups", PARTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("passes", ["best", "portable"])
def test_parts_stand_for_their_concatenation(size, channels, groups, dtype, passes):
    """A tuple of tensors is normalised as their concatenation along the channels, which is never made: values
    and the gradients of every part, against float64 PyTorch on the concatenation."""
    n, h, w = size
    g = torch.Generator().manual_seed(0)
    parts = [
        (torch.randn(n, c, h, w, generator=g) * 2 + k).to(dtype).contiguous(memory_format=CL)
        for k, c in enumerate(channels)
    ]
    C = sum(channels)
    weight, bias = torch.randn(C, generator=g), torch.randn(C, generator=g)
    dy = torch.randn(n, C, h, w, generator=g).to(dtype).contiguous(memory_format=CL)
    if passes == "best":
        parts = [p.requires_grad_() for p in parts]
        wt, bt = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        out = kernels.group_norm(tuple(parts), groups, wt, bt, silu=True)
        out.backward(dy)
        grads = [p.grad for p in parts] + [wt.grad, bt.grad]
    else:
        ext = kernels.extension()
        out, mean, rstd = ext.forward_parts_portable(parts, weight, bias, groups, 1e-5, True)
        grads = ext.backward_parts_portable(dy, parts, mean, rstd, weight, bias, groups, True)
    assert out.shape == (n, C, h, w) and out.is_contiguous(memory_format=CL)
    assert all(d.shape == p.shape and d.is_contiguous(memory_format=CL) for d, p in zip(grads, parts))
    xd = torch.cat([p.detach() for p in parts], 1).double().requires_grad_()
    wd, bd = weight.double().requires_grad_(), bias.double().requires_grad_()
    expected = reference(xd, groups, wd, bd, True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.detach().double(), expected, atol=tol, rtol=tol)
    expected.backward(dy.double())
    wanted = list(xd.grad.split(list(channels), 1)) + [wd.grad, bd.grad]
    for got, want in zip(grads, wanted, strict=True):
        scale = want.abs().max().item() + 1e-12
        assert (got.double() - want).abs().max().item() / scale < (2e-5 if dtype == torch.float32 else 1e-2)


@needs_native
def test_parts_equal_the_single_tensor_kernel_exactly():
    """Per channel the same sums in the same order: a concatenation given as parts normalises to the same bits."""
    x, weight, bias = inputs((3, 48, 9, 9), torch.float32, 8)
    a, b = x[:, :32].contiguous(memory_format=CL), x[:, 32:].contiguous(memory_format=CL)
    with torch.no_grad():
        assert torch.equal(
            kernels.group_norm((a, b), 8, weight, bias, silu=True), kernels.group_norm(x, 8, weight, bias, silu=True)
        )


def test_parts_fall_back_to_the_concatenation():
    """Where the kernel does not take them (NCHW parts, float64, native off), the concatenation is made."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 8, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    weight, bias = torch.randn(12, generator=g), torch.randn(12, generator=g)
    want = F.silu(F.group_norm(torch.cat([a, b], 1), 4, weight, bias))
    torch.testing.assert_close(kernels.group_norm((a, b), 4, weight, bias, silu=True), want)
    a64, b64 = a.double(), b.double()
    torch.testing.assert_close(
        kernels.group_norm((a64, b64), 4, weight.double(), bias.double(), silu=True), want.double()
    )
    cl = tuple(t.contiguous(memory_format=CL) for t in (a, b))
    torch.testing.assert_close(kernels.group_norm(cl, 4, weight, bias, silu=True, native=False), want)


@needs_native
def test_bad_parts_are_named():
    ext = kernels.extension()
    x, weight, bias = inputs((2, 8, 4, 4), torch.float32, 2)
    other = inputs((2, 8, 5, 4), torch.float32, 2)[0]
    w16, b16 = torch.randn(16), torch.randn(16)
    with pytest.raises(RuntimeError, match="share dtype, batch size, height and width"):
        ext.forward_parts([x, other], w16, b16, 2, 1e-5, True)
    with pytest.raises(RuntimeError, match="share dtype"):
        ext.forward_parts([x, x.bfloat16()], w16, b16, 2, 1e-5, True)
    with pytest.raises(RuntimeError, match="1 to 4 tensors"):
        ext.forward_parts([x] * 5, torch.randn(40), torch.randn(40), 2, 1e-5, True)
    with pytest.raises(RuntimeError, match="1 to 4 tensors"):
        ext.forward_parts([], weight, bias, 2, 1e-5, True)
    with pytest.raises(RuntimeError, match="C=16 values"):
        ext.forward_parts([x, x], weight, bias, 2, 1e-5, True)
    y, mean, rstd = ext.forward_parts([x, x], w16, b16, 2, 1e-5, True)
    with pytest.raises(RuntimeError, match="dy must be"):
        ext.backward_parts(x, [x, x], mean, rstd, w16, b16, 2, True)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [(32,), (16, 16)])
@pytest.mark.parametrize("passes", ["best", "portable"])
def test_a_shift_is_added_to_the_input_without_making_the_sum(dtype, channels, passes):
    """GroupNorm+SiLU of x + shift[:, :, None, None] (a bias per image and channel, as a residual block's time
    embedding adds), folded into the kernel's constants: values and the gradients of x, the shift, the weight
    and the bias against float64 PyTorch on the sum made; the shift moves the mean far from the spread."""
    n, h, w, groups = 3, 5, 6, 4
    g = torch.Generator().manual_seed(1)
    parts = [(torch.randn(n, c, h, w, generator=g) * 2).to(dtype).contiguous(memory_format=CL) for c in channels]
    C = sum(channels)
    shift = torch.randn(n, C, generator=g) * 20
    weight, bias = torch.randn(C, generator=g), torch.randn(C, generator=g)
    dy = torch.randn(n, C, h, w, generator=g).to(dtype).contiguous(memory_format=CL)
    if passes == "best":
        parts = [p.requires_grad_() for p in parts]
        st, wt, bt = (t.clone().requires_grad_() for t in (shift, weight, bias))
        out = kernels.group_norm(tuple(parts), groups, wt, bt, silu=True, shift=st)
        out.backward(dy)
        grads = [p.grad for p in parts] + [wt.grad, bt.grad, st.grad]
        with torch.no_grad():  # without autograd: the same forward
            assert torch.equal(kernels.group_norm(tuple(parts), groups, weight, bias, silu=True, shift=shift), out)
    else:
        ext = kernels.extension()
        out, mean, rstd = ext.forward_parts_portable(parts, weight, bias, groups, 1e-5, True, shift)
        grads = ext.backward_parts_portable(dy, parts, mean, rstd, weight, bias, groups, True, shift)
    xd = torch.cat([p.detach() for p in parts], 1).double().requires_grad_()
    sd, wd, bd = (t.double().requires_grad_() for t in (shift, weight, bias))
    expected = reference(xd + sd[:, :, None, None], groups, wd, bd, True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.detach().double(), expected, atol=tol, rtol=tol)
    expected.backward(dy.double())
    wanted = list(xd.grad.split(list(channels), 1)) + [wd.grad, bd.grad]
    if passes == "best":
        wanted.append(sd.grad)
    for got, want in zip(grads, wanted, strict=True):
        scale = want.abs().max().item() + 1e-12
        assert (got.double() - want).abs().max().item() / scale < (2e-5 if dtype == torch.float32 else 1e-2)


def test_a_shift_falls_back_to_the_sum():
    """Where the kernel does not run (NCHW, native off) the sum is made: the same values."""
    g = torch.Generator().manual_seed(0)
    x, shift = torch.randn(2, 8, 5, 5, generator=g), torch.randn(2, 8, generator=g) * 3
    weight, bias = torch.randn(8, generator=g), torch.randn(8, generator=g)
    want = F.silu(F.group_norm(x + shift[:, :, None, None], 4, weight, bias))
    torch.testing.assert_close(kernels.group_norm(x, 4, weight, bias, silu=True, shift=shift), want)
    cl = x.contiguous(memory_format=CL)
    torch.testing.assert_close(kernels.group_norm(cl, 4, weight, bias, silu=True, native=False, shift=shift), want)
    if kernels.applies(cl):
        got = kernels.group_norm(cl, 4, weight, bias, silu=True, shift=shift)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_native
def test_a_bad_shift_is_named():
    ext = kernels.extension()
    x, weight, bias = inputs((2, 8, 4, 4), torch.float32, 2)
    for bad in (torch.randn(2, 7), torch.randn(3, 8), torch.randn(2, 8).double(), torch.randn(8, 2).t()):
        with pytest.raises(RuntimeError, match=r"shift must be a contiguous float32 CPU tensor \[N, C\] = \[2, 8\]"):
            ext.forward_parts([x], weight, bias, 2, 1e-5, True, bad)


@needs_native
def test_statistics_stay_exact_when_the_mean_dwarfs_the_spread():
    """Per-channel shifted sums: no cancellation in E[x^2] - E[x]^2 when |mean| is 10^4 times the std."""
    x, weight, bias = inputs((2, 16, 8, 8), torch.float32, 4)
    x = (x * 1e-3 + 10.0).contiguous(memory_format=CL)
    out = kernels.group_norm(x, 4, weight, bias)
    torch.testing.assert_close(out.double(), reference(x, 4, weight, bias, False), atol=2e-3, rtol=0)
    naive = F.group_norm(x, 4, weight, bias)  # float32 PyTorch for comparison: the kernel is at least as close
    err = (out.double() - reference(x, 4, weight, bias, False)).abs().max()
    assert err <= (naive.double() - reference(x, 4, weight, bias, False)).abs().max() + 1e-6


@needs_native
def test_results_are_deterministic_and_nan_propagates():
    x, weight, bias = inputs((8, 32, 10, 10), torch.float32, 8)
    a, b = (kernels.group_norm(x, 8, weight, bias, silu=True) for _ in range(2))
    assert torch.equal(a, b)
    x[3, 5, 2, 2] = float("nan")
    out = kernels.group_norm(x, 8, weight, bias, silu=True)
    assert out[3, 4:8].isnan().all()  # the group of channel 5 (channels 4..7) of image 3
    assert not out[3, :4].isnan().any() and not out[:3].isnan().any()


@needs_native
def test_inference_does_not_record_a_graph_and_matches_training_mode():
    x, weight, bias = inputs((2, 16, 6, 6), torch.float32, 4)
    with torch.inference_mode():
        inferred = kernels.group_norm(x, 4, weight, bias, silu=True)
    assert inferred.grad_fn is None
    trained = kernels.group_norm(x.requires_grad_(), 4, weight, bias, silu=True)
    assert torch.equal(inferred, trained.detach())


@needs_native
def test_bad_input_to_the_kernel_is_named():
    ext = kernels.extension()
    x, weight, bias = inputs((2, 8, 4, 4), torch.float32, 2)
    with pytest.raises(RuntimeError, match="channels_last"):
        ext.forward(x.contiguous(), weight, bias, 2, 1e-5, True)
    with pytest.raises(RuntimeError, match="groups=3 must divide C=8"):
        ext.forward(x, weight, bias, 3, 1e-5, True)
    with pytest.raises(RuntimeError, match="weight and bias"):
        ext.forward(x, weight[:4], bias, 2, 1e-5, True)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ext.forward(x.double(), weight, bias, 2, 1e-5, True)
