"""The convolution layers' fast paths (:func:`conv2d`): the Winograd kernel, the bias gradient apart from oneDNN's
weight gradient, oneDNN's fused sums, and 1x1 convolutions of inputs given as parts along the channels.

- ``settings.winograd``: a 3x3 convolution with stride 1 and padding 1 of float32 channels_last CPU activations
  with a multiple of 16 channels runs as the native Winograd kernel (:func:`ddpm.kernels.ops.conv3x3`), forward and
  backward, on tiles of ``settings.winograd_tile`` outputs a side. The filters' transform is kept until the weight
  changes.
- ``settings.separate_bias_grad``: other convolutions' CPU training backward computes the bias gradient apart from
  oneDNN's weight gradient, which is faster (:class:`_Conv2dBackwardWithBiasSum`).
- ``settings.fused_sum``: under CPU bf16 autocast, a residual, or a 1x1 convolution's other parts, are added by
  oneDNN as it writes the output (a binary post-op; in training :class:`_Conv2dSum`, whose backward is the
  convolution's): PyTorch's bf16 addition on the CPU took longer than the convolution itself at the default net's
  shapes.

Elsewhere it is ``nn.Conv2d``'s convolution: on a GPU, inside ``torch.compile``, with a ``padding_mode`` other than
zeros, or with the settings off. Under CPU bf16 autocast only ``fused_sum`` applies (the separate bias sum measured
slower there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.kernels import ops
from ddpm.kernels.options import settings


def cat(x: Tensor | tuple[Tensor, ...]) -> Tensor:
    """x, or for a tuple of tensors (parts along the channels) their concatenation ``torch.cat(x, dim=1)``."""
    return x if isinstance(x, Tensor) else x[0] if len(x) == 1 else torch.cat(x, dim=1)


class _Conv2dBackwardWithBiasSum(torch.autograd.Function):
    """A convolution whose backward leaves the bias gradient out of oneDNN's weight gradient.

    The bias gradient is the output gradient summed over batch and pixels. Asked for it with the weight
    gradient, oneDNN's fp32 CPU backward took longer per convolution of the default net than the same call
    without it plus a ``sum`` (``benchmarks/results.md``, Levers); the values are the same sums.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, conv: tuple) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conv = conv
        return F.conv2d(x, weight, bias, *conv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_x or need_w:
            mask = [need_x, need_w, False]
            dx, dw, _ = torch.ops.aten.convolution_backward(
                dy, x, weight, None, stride, padding, dilation, False, [0, 0], groups, mask
            )
        if need_b:
            db = dy.sum((0, 2, 3))
        return dx, dw, db, None


def _pointwise_op():
    """oneDNN's convolution with a binary post-op (what inductor's CPU fusions call), if this build has it and
    this CPU runs oneDNN's bf16 path (AVX-512 or AVX-NE-CONVERT; an AVX2 CPU has no such path)."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return None
        return torch.ops.mkldnn._convolution_pointwise.binary
    except (AttributeError, RuntimeError):
        return None


POINTWISE = _pointwise_op()


class _Conv2dSum(torch.autograd.Function):
    """``conv(x) + other`` as one oneDNN call (a binary post-op); the backward is the convolution's, and other's
    gradient is the output's."""

    @staticmethod
    def forward(ctx, x: Tensor, other: Tensor, weight: Tensor, bias: Tensor | None, conv: tuple) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.has_bias = conv, bias is not None
        return POINTWISE(x, other, weight, bias, *conv, "add", None, None, [], None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        padding, stride, dilation, groups = ctx.conv
        need_x, need_other, need_w, need_b = ctx.needs_input_grad[:4]
        dx = dw = db = None
        if need_x or need_w or need_b:
            dx, dw, db = torch.ops.aten.convolution_backward(
                dy, x, weight, [weight.shape[0]] if ctx.has_bias else None, stride, padding, dilation, False,
                [0, 0], groups, [need_x, need_w, need_b and ctx.has_bias],
            )  # fmt: skip
        return dx, dy if need_other else None, dw, db, None


def uses_winograd(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether the convolution ``conv`` of x runs the Winograd kernel."""
    return (
        settings.winograd
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not torch.is_autocast_enabled("cpu")
        and ops.conv3x3_applies(x, conv.weight)
    )


def conv2d(
    conv: nn.Conv2d,
    x: Tensor | tuple[Tensor, ...],
    image_bias: Tensor | None = None,
    residual: Tensor | None = None,
    upsample: bool = False,
) -> Tensor:
    """The convolution ``conv`` of x (``upsample``: of x upsampled x2, nearest), plus ``image_bias[:, :, None, None]``
    ([N, Cout]: a bias per image) and ``residual`` (shaped like the output) where given. The Winograd kernel reads
    the upsampled input from x and adds both as it writes the output; elsewhere they are separate operations (the
    additions in place).

    x may be a tuple of tensors standing for their concatenation along the channels: a 1x1 convolution (without
    ``upsample``) then sums the convolutions of each part with its slice of the weight, the same values without the
    concatenated copy (other convolutions make it)."""
    if not isinstance(x, Tensor) and len(x) > 1 and conv.kernel_size == (1, 1) and conv.groups == 1 and not upsample:
        h = _conv_parts(conv, x)
    else:
        x = cat(x)
        if uses_winograd(conv, x):
            weight, bias = conv.weight, conv.bias
            if image_bias is not None:
                bias = image_bias if bias is None else image_bias + bias
            return ops.conv3x3(x, weight, bias, _winograd_weights(conv, weight), residual, upsample)
        if upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if residual is not None and image_bias is None and _fuses_sum(conv, x, residual):
            return _conv_sum(conv, x, residual)
        h = _conv_forward(conv, x, conv.weight, conv.bias)
    if image_bias is not None:
        h += image_bias[:, :, None, None]
    if residual is not None:
        h += residual
    return h


def _conv_parts(conv: nn.Conv2d, xs: tuple[Tensor, ...]) -> Tensor:
    """A 1x1 convolution of ``torch.cat(xs, dim=1)`` as the sum of each part's convolution with its slice."""
    channels = sum(part.shape[1] for part in xs)
    if channels != conv.in_channels:
        raise ValueError(f"the parts of x have {channels} channels in all; this convolution takes {conv.in_channels}")
    h, c0 = None, 0
    for part in xs:
        c1 = c0 + part.shape[1]
        if h is None:
            h = _conv_forward(conv, part, conv.weight[:, c0:c1], conv.bias)
        elif _fuses_sum(conv, part, h):
            h = _conv_sum(conv, part, h, (c0, c1), bias=False)
        else:
            h += _conv_forward(conv, part, conv.weight[:, c0:c1], None)
        c0 = c1
    return h


def _fuses_sum(conv: nn.Conv2d, x: Tensor, other: Tensor) -> bool:
    """Whether ``conv(x) + other`` runs as one oneDNN call (:func:`_conv_sum`): bf16 channels_last CPU tensors
    under CPU bf16 autocast (or with bf16 weights), outside compile."""
    return (
        settings.fused_sum
        and POINTWISE is not None
        and x.device.type == "cpu"
        and x.dtype == other.dtype == torch.bfloat16
        and (
            conv.weight.dtype == torch.bfloat16
            or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        )
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and x.is_contiguous(memory_format=torch.channels_last)
        and other.is_contiguous(memory_format=torch.channels_last)
        and not torch.compiler.is_compiling()
    )


def _conv_sum(
    conv: nn.Conv2d, x: Tensor, other: Tensor, channels: tuple[int, int] | None = None, bias: bool = True
) -> Tensor:
    """``conv(x) + other`` (a new tensor) in one oneDNN call, with the weight's input ``channels`` [c0, c1) only
    where given (a part of a 1x1 convolution's input) and without the bias if not ``bias``."""
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    has_bias = bias and conv.bias is not None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, other, conv.weight)):
        weight = conv.weight if channels is None else conv.weight[:, channels[0] : channels[1]]
        weight = weight.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)  # as autocast casts
        b = conv.bias.to(torch.bfloat16) if has_bias else None
        return _Conv2dSum.apply(x, other, weight, b, args)
    weight = _bf16(conv, "weight", conv.weight, channels)
    b = _bf16(conv, "bias", conv.bias) if has_bias else None
    return POINTWISE(x, other, weight, b, *args, "add", None, None, [], None)


def _bf16(conv: nn.Conv2d, name: str, t: Tensor, channels: tuple[int, int] | None = None) -> Tensor:
    """t (its input ``channels`` only, where given) in bf16, kept on ``conv`` while t is the same tensor at the same
    version (autocast casts the weights at every call without autograd)."""
    if t.dtype == torch.bfloat16 and channels is None:
        return t
    key = (id(t), t.data_ptr(), t._version, tuple(t.shape), channels)
    cache = conv.__dict__.setdefault("_bf16_cache", {})
    cached = cache.get((name, channels))
    if cached is None or cached[0] != key:
        with torch.no_grad():
            v = t if channels is None else t[:, channels[0] : channels[1]]
            fmt = torch.channels_last if v.dim() == 4 else torch.contiguous_format
            cached = (key, v.to(torch.bfloat16).contiguous(memory_format=fmt))
        cache[(name, channels)] = cached
    return cached[1]


def _conv_forward(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv``'s convolution of x with ``weight`` and ``bias``: with the bias gradient apart where it applies."""
    if (
        settings.separate_bias_grad
        and bias is not None
        and x.device.type == "cpu"
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad or bias.requires_grad)
        and not torch.is_autocast_enabled("cpu")
        and x.dtype == weight.dtype == bias.dtype
        and not torch.compiler.is_compiling()
    ):
        args = (conv.stride, conv.padding, conv.dilation, conv.groups)
        return _Conv2dBackwardWithBiasSum.apply(x, weight, bias, args)
    return nn.Conv2d._conv_forward(conv, x, weight, bias)


def _winograd_weights(conv: nn.Conv2d, weight: Tensor) -> Tensor:
    """The Winograd transform of weight, kept on ``conv`` while the weight is the same tensor at the same version."""
    tile = settings.winograd_tile
    key = (id(weight), weight.data_ptr(), weight._version, tuple(weight.shape), tile)
    cached = conv.__dict__.get("_winograd_cache")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, ops.winograd_weights(weight, tile))
        conv.__dict__["_winograd_cache"] = cached
    return cached[1]
