"""The native kernels (GroupNorm+SiLU, attention, Winograd convolution) against PyTorch's ops: values, gradients,
layouts, fallbacks and bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_native
from ddpm import kernels
from ddpm.nets import Conv2d, UNet, group_norm

CL = torch.channels_last


def reference(x, groups, weight, bias, silu, eps=1e-5):
    """PyTorch's GroupNorm (+ SiLU) in float64: the exact values the kernel approximates in float32."""
    h = F.group_norm(x.double(), groups, weight.double(), bias.double(), eps)
    return F.silu(h) if silu else h


def inputs(shape, dtype, groups, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + offset).to(dtype).contiguous(memory_format=CL)
    weight = torch.randn(shape[1], generator=g)
    bias = torch.randn(shape[1], generator=g)
    return x, weight, bias


@needs_native
def test_the_kernel_builds_on_this_machine():
    ext = kernels.extension()
    assert ext is not None, kernels._error
    assert ext.vector_isa in ("avx512", "portable")
    assert kernels.applies(torch.randn(2, 8, 3, 3).contiguous(memory_format=CL))


@needs_native
def test_a_process_with_another_ninja_first_on_path_reuses_the_build(tmp_path):
    """Every process builds with the ``ninja`` package's tool, whatever ``ninja`` comes first on its PATH: ninja
    versions keep their logs in different formats, and one that finds another's log rebuilds from scratch."""
    pytest.importorskip("ninja")
    ext = kernels.extension()
    assert ext is not None, kernels._error
    log = Path(ext.__file__).with_name(".ninja_log")
    before = log.read_bytes()
    impostor = tmp_path / "bin" / "ninja"  # a system ninja of another version, as far as the build can tell
    impostor.parent.mkdir()
    impostor.write_text(f"#!/bin/sh\ntouch {tmp_path / 'called'}\nexit 1\n")
    impostor.chmod(0o755)
    env = {**os.environ, "PATH": f"{impostor.parent}{os.pathsep}{os.environ['PATH']}"}
    code = "from ddpm import kernels; e = kernels.extension(); print(e.__file__ if e else kernels._error)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == ext.__file__, done.stdout + done.stderr
    assert not (tmp_path / "called").exists(), "the ninja first on PATH ran"
    assert log.read_bytes() == before, "nothing was rebuilt"


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
def test_the_net_with_the_kernel_matches_the_net_without_it():
    """The whole U-Net, forward and backward, with the kernel and with PyTorch's GroupNorm and SiLU."""
    torch.manual_seed(0)
    net = UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(14,), norm_groups=4, dropout=0.0)
    for p in net.parameters():  # no zero-initialised layers: every path carries signal
        p.data.add_(torch.randn_like(p) * 0.05)
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([3, 300, 900])
    outs, grads = [], []
    for native in (True, False):
        for m in net.modules():
            if hasattr(m, "native"):
                m.native = native
            if isinstance(m, Conv2d):  # the 3x3 convolutions of 16 and 32 channels: Winograd's kernel
                m.winograd = native
        net.zero_grad()
        out = net(x, t)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert (grads[0] - grads[1]).abs().max() / grads[1].abs().max() < 1e-4


def test_the_switch_and_the_layouts_it_does_not_take(monkeypatch):
    x, weight, bias = inputs((2, 8, 4, 4), torch.float32, 2)
    nchw = x.contiguous()
    assert not kernels.applies(nchw) and not kernels.applies(x.double())
    monkeypatch.setenv(kernels.ENV, "0")
    assert not kernels.applies(x)
    # PyTorch's ops run instead, with the same values
    torch.testing.assert_close(
        kernels.group_norm(nchw, 2, weight, bias, silu=True), F.silu(F.group_norm(nchw, 2, weight, bias))
    )
    norm = group_norm(8, 2, silu=True)
    assert "silu=True" in repr(norm) and set(norm.state_dict()) == {"weight", "bias"}


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


def test_a_failed_build_warns_once_and_pytorch_runs(monkeypatch, tmp_path):
    """No compiler (here: a builder that fails): one warning naming the cause, then PyTorch's ops, same values."""
    from torch.utils import cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(kernels, "_extension", None)
    monkeypatch.setattr(kernels, "_error", None)
    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setenv("DDPM_KERNELS_DIR", str(tmp_path))
    x, weight, bias = inputs((2, 8, 4, 4), torch.float32, 2)
    with pytest.warns(RuntimeWarning, match="could not be built.*command not found"):
        assert kernels.extension() is None
    assert not kernels.applies(x)
    out = kernels.group_norm(x, 2, weight, bias, silu=True)
    torch.testing.assert_close(out, F.silu(F.group_norm(x, 2, weight, bias)))


# ---- the attention kernel


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
