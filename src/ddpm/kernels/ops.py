"""The native kernels' operations, each with PyTorch's ops where the kernel does not apply: GroupNorm (+ SiLU),
few-token softmax attention and Winograd 3x3 convolutions, forward and backward (autograd functions).

Each takes tensors and returns tensors; whether a layer of the net calls them is decided by :mod:`ddpm.kernels`'
settings (:mod:`ddpm.kernels.conv`, :mod:`ddpm.kernels.layers`). The kernels run on CPU tensors outside
``torch.compile`` (which fuses these ops itself); elsewhere PyTorch's ops give the same results up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ddpm.kernels.build import enabled, extension

# A 14x14 map; at 256 tokens PyTorch's flash forward measured faster (the kernel keeps [L, L] scores per head)
ATTENTION_MAX_TOKENS = 196
_DTYPES = (torch.float32, torch.bfloat16)


def applies(x: Tensor) -> bool:
    """Whether the native kernel takes x: a 4-d float32 or bfloat16 channels_last CPU tensor, outside compile."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype in _DTYPES
        and x.is_contiguous(memory_format=torch.channels_last)
        and enabled("group_norm")
        and not torch.compiler.is_compiling()
        and extension() is not None
    )


class _GroupNormSiLU(torch.autograd.Function):
    """Autograd of the native kernel: saves x's parts and the per-group statistics, not the normalised activation."""

    @staticmethod
    def forward(
        ctx, weight: Tensor, bias: Tensor, shift: Tensor | None, groups: int, eps: float, silu: bool, *xs: Tensor
    ) -> Tensor:
        y, mean, rstd = extension().forward_parts(list(xs), weight, bias, groups, eps, silu, shift)
        ctx.save_for_backward(weight, bias, shift, mean, rstd, *xs)
        ctx.groups, ctx.silu = groups, silu
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        weight, bias, shift, mean, rstd, *xs = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last)
        *dxs, dweight, dbias = extension().backward_parts(dy, xs, mean, rstd, weight, bias, ctx.groups, ctx.silu, shift)
        dshift = None
        if ctx.needs_input_grad[2]:  # the shift is added to every pixel: its gradient is dx summed over them
            dshift = torch.cat([dx.sum((2, 3), dtype=torch.float32) for dx in dxs], dim=1)
        return dweight, dbias, dshift, None, None, None, *dxs


def group_norm(
    x: Tensor | Sequence[Tensor],
    groups: int,
    weight: Tensor,
    bias: Tensor,
    eps: float = 1e-5,
    silu: bool = False,
    native: bool = True,
    shift: Tensor | None = None,
) -> Tensor:
    """``silu(group_norm(x))`` (or ``group_norm(x)``) in x's dtype, with float32 statistics and arithmetic.

    x is a tensor, or a sequence of tensors that stand for their concatenation along the channels,
    ``torch.cat(x, dim=1)`` (a U-Net decoder block's input and its skip connection): the native kernel reads
    them where they are, so the concatenation is never made. ``shift`` ([N, C], a value per image and channel)
    is added to x before the norm: the native kernel folds it into its per-channel constants (in float32), so
    x + shift is never made either.

    The native kernel where it applies (and ``native``); elsewhere PyTorch's GroupNorm computed in float32 (as
    CUDA autocast does; on the CPU, PyTorch's bf16 GroupNorm on channels_last input is also ~5x slower than
    float32's), then SiLU, in place when no gradient is recorded.
    """
    parts = (x,) if isinstance(x, Tensor) else tuple(x)
    if (
        native
        and all(applies(part) for part in parts)
        and len({(part.dtype, part.shape[0], part.shape[2:]) for part in parts}) == 1
        and weight.dtype == torch.float32
        and bias.dtype == torch.float32
    ):
        weight, bias = weight.contiguous(), bias.contiguous()
        if shift is not None:
            shift = shift.float().contiguous()
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, bias, shift, *parts)):
            return _GroupNormSiLU.apply(weight, bias, shift, groups, eps, silu, *parts)
        with torch.profiler.record_function("ddpm::group_norm_silu"):  # named in the profiler like an aten op
            return extension().forward_parts(list(parts), weight, bias, groups, eps, silu, shift)[0]
    x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if shift is not None:
        x = x + shift[:, :, None, None].to(x.dtype)
    if x.dtype == torch.float32:
        h = F.group_norm(x, groups, weight, bias, eps)
    else:
        with torch.autocast(x.device.type, enabled=False):
            h = F.group_norm(x.float(), groups, weight.float(), bias.float(), eps).to(x.dtype)
    return F.silu(h, inplace=not torch.is_grad_enabled()) if silu else h


class _Attention(torch.autograd.Function):
    """Autograd of the attention kernel: saves qkv, the output and each query's log-sum-exp."""

    @staticmethod
    def forward(ctx, qkv: Tensor, scale: float) -> Tensor:
        out, lse = extension().attention_forward(qkv, scale)
        ctx.save_for_backward(qkv, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:
        qkv, out, lse = ctx.saved_tensors
        return extension().attention_backward(dout, qkv, out, lse, ctx.scale), None


def attention(qkv: Tensor, native: bool = True) -> Tensor:
    """Softmax attention ``softmax(q k^T / sqrt(d)) v`` of ``qkv`` [B, L, 3, heads, d]: [B, L, heads, d].

    The native kernel where it applies (float32 on the CPU, L <= ``ATTENTION_MAX_TOKENS``, outside compile, and
    ``native``); elsewhere PyTorch's ``scaled_dot_product_attention``.
    """
    B, L, three, heads, d = qkv.shape
    if three != 3:
        raise ValueError(f"qkv must have shape [B, L, 3, heads, d], got {list(qkv.shape)}")
    if (
        native
        and qkv.device.type == "cpu"
        and qkv.dtype == torch.float32
        and 0 < L <= ATTENTION_MAX_TOKENS
        and enabled("attention")
        and not torch.compiler.is_compiling()
        and extension() is not None
    ):
        qkv = qkv.contiguous()
        if torch.is_grad_enabled() and qkv.requires_grad:
            return _Attention.apply(qkv, d**-0.5)
        with torch.profiler.record_function("ddpm::attention"):
            return extension().attention_forward(qkv, d**-0.5)[0]
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


# Winograd's F(m x m, 3x3) for tiles of m = 2 or 4 outputs a side: the 3x3 filter g becomes G g G^T, (m+2) x (m+2)
# (csrc/winograd.cpp transforms the inputs and outputs)
_WINOGRAD_G = {
    2: ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
    4: (
        (1 / 4, 0.0, 0.0),
        (-1 / 6, -1 / 6, -1 / 6),
        (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6),
        (0.0, 0.0, 1.0),
    ),
}


def winograd_weights(weight: Tensor, m: int = 4) -> Tensor:
    """The Winograd transform ``G g G^T`` of every 3x3 filter of ``weight`` [Cout, Cin, 3, 3] for tiles of m x m
    outputs: [(m + 2)^2, Cin, Cout], Cin and Cout padded with zeros to multiples of 16 (the kernel's vectors).

    Row ``(m + 2) i + j`` holds element (i, j) of the transformed filters, the matrix that multiplies the inputs'
    transformed patches at that element.
    """
    G = weight.new_tensor(_WINOGRAD_G[m])
    cout, cin = weight.shape[:2]
    u = weight.new_zeros((m + 2) ** 2, -(-cin // 16) * 16, -(-cout // 16) * 16)
    u[:, :cin, :cout] = torch.einsum("ik,ockl,jl->ijco", G, weight, G).reshape((m + 2) ** 2, cin, cout)
    return u


def conv3x3_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`conv3x3` runs the native Winograd kernel: float32 CPU channels_last x with a multiple of 16
    channels (any number out), outside compile."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype == weight.dtype == torch.float32
        and weight.dim() == 4
        and tuple(weight.shape[2:]) == (3, 3)
        and weight.shape[1] == x.shape[1]
        and x.shape[1] % 16 == 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and enabled("winograd")
        and not torch.compiler.is_compiling()
        and extension() is not None
    )


class _Conv3x3(torch.autograd.Function):
    """Autograd of the Winograd convolution: the input gradient is the same kernel run on the output gradient with
    the filters flipped and transposed; the weight and bias gradients come from one more pass of the kernel (the
    transformed filters' gradient, mapped back to 3x3 filters); the residual's gradient is the output's."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, bias: Tensor | None, u: Tensor, residual: Tensor | None, upsample: bool
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.m = math.isqrt(u.shape[0]) - 2
        ctx.per_image_bias = bias is not None and bias.dim() == 2
        ctx.upsample = upsample
        return extension().winograd_conv3x3(x, u, bias, residual, upsample, weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, _, need_r, _ = ctx.needs_input_grad
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx = dw = db = None
        m = ctx.m
        if need_x:
            flipped = winograd_weights(weight.flip(2, 3).transpose(0, 1), m)
            dx = extension().winograd_conv3x3(dy, flipped, out_channels=x.shape[1])
            if ctx.upsample:  # each input pixel fed a 2x2 block of the upsampled input
                dx = F.avg_pool2d(dx, 2).mul_(4.0)
        if need_w or need_b:
            dw, db = conv3x3_weight_grad(x, dy, weight, m, ctx.upsample)
            db = db if ctx.per_image_bias else db.sum(0)
        return dx, dw if need_w else None, db if need_b else None, None, dy if need_r else None, None


def conv3x3_weight_grad(
    x: Tensor, dy: Tensor, weight: Tensor, m: int = 4, upsample: bool = False
) -> tuple[Tensor, Tensor]:
    """The weight and bias gradients of :func:`conv3x3` (F(m x m, 3x3)) from its input x and output gradient dy,
    both channels_last: the kernel's gradient with respect to the transformed filters, mapped back to 3x3 filters
    (``G^T dU G``), in weight's layout, and each image's bias gradient [N, Cout]."""
    du, db = extension().winograd_conv3x3_weight_grad(x, dy, m, upsample)
    G = weight.new_tensor(_WINOGRAD_G[m])
    du = du.view(m + 2, m + 2, weight.shape[1], weight.shape[0])
    return torch.empty_like(weight).copy_(torch.einsum("ik,ijco,jl->ockl", G, du, G)), db


def conv3x3(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    u: Tensor | None = None,
    residual: Tensor | None = None,
    upsample: bool = False,
) -> Tensor:
    """``conv2d(x, weight, padding=1) + bias (+ residual)`` of a 3x3 ``weight`` (stride 1), channels_last.

    ``bias`` is [Cout], or [N, Cout] for one per image (a ResBlock's bias plus its time embedding); ``residual``
    is added to the output (a ResBlock's skip connection); ``upsample`` convolves x upsampled x2 (nearest), read
    from x as the kernel goes (an Upsample layer). The native Winograd kernel where it applies
    (:func:`conv3x3_applies`), adding both while it writes the output, with ``u`` the filters' transform if given
    (:func:`winograd_weights`: its row count sets the tiles, F(2x2, 3x3) or F(4x4, 3x3); by default F(4x4, 3x3));
    elsewhere PyTorch's convolution and additions. F(4x4, 3x3) does 4x fewer multiplications than the direct
    convolution (2.25x for F(2x2, 3x3)); its float32 rounding errors measured up to ~22x PyTorch's own, within
    6e-6 of the largest value in the tests (F(2x2, 3x3): within 7e-7, about PyTorch's).
    """
    if bias is not None and bias.dim() not in (1, 2):
        raise ValueError(f"bias must be [Cout] or [N, Cout], got {list(bias.shape)}")
    if (
        not conv3x3_applies(x, weight)
        or (bias is not None and bias.dtype != torch.float32)
        or (residual is not None and residual.dtype != torch.float32)
    ):
        if upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        y = F.conv2d(x, weight, bias if bias is not None and bias.dim() == 1 else None, padding=1)
        if bias is not None and bias.dim() == 2:
            y = y + bias[:, :, None, None]
        return y if residual is None else y + residual
    if u is None:
        with torch.no_grad():
            u = winograd_weights(weight)
    if bias is not None:
        bias = bias.contiguous()
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        return _Conv3x3.apply(x, weight, bias, u, residual, upsample)
    with torch.profiler.record_function("ddpm::winograd_conv3x3"):
        return extension().winograd_conv3x3(x, u, bias, residual, upsample, weight.shape[0])
