"""The norm and attention layers' fast paths, and the decoder's inputs as parts along the channels.

Each function computes what its docstring says whatever the settings (:data:`ddpm.kernels.settings`); the settings
choose how: the native GroupNorm+SiLU and attention kernels (:mod:`ddpm.kernels.ops`), float32 arithmetic under
autocast, where a residual block's time bias is added, and the layout of the attention's projections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.kernels import ops
from ddpm.kernels.conv import cat, uses_winograd
from ddpm.kernels.options import settings


def lazy_cat(*parts: Tensor) -> Tensor | tuple[Tensor, ...]:
    """The concatenation of ``parts`` along the channels: the tuple itself, which the GroupNorm kernel and 1x1
    convolutions read in place (``settings.skip_parts``), or else ``torch.cat(parts, dim=1)``."""
    return parts if settings.skip_parts else torch.cat(parts, dim=1)


def normalize(
    layer: nn.GroupNorm, x: Tensor | tuple[Tensor, ...], silu: bool = False, shift: Tensor | None = None
) -> Tensor:
    """``layer``'s GroupNorm (then SiLU if ``silu``) of x plus ``shift[:, :, None, None]`` ([N, C]: a value per image
    and channel, where given), in x's dtype; x may be a tuple of parts along the channels (:func:`cat`).

    With ``settings.group_norm_float32``, computed in float32 whatever the input dtype (:func:`ops.group_norm`: the
    native kernel where it applies and ``settings.native_group_norm``, which reads the parts where they are and adds
    the shift as it reads); otherwise PyTorch's GroupNorm in the input's dtype."""
    if not settings.group_norm_float32:
        x = cat(x)
        h = F.group_norm(
            x if shift is None else x + shift[:, :, None, None].to(x.dtype),
            layer.num_groups,
            layer.weight,
            layer.bias,
            layer.eps,
        )
        return F.silu(h) if silu else h
    return ops.group_norm(
        x, layer.num_groups, layer.weight, layer.bias, layer.eps, silu, settings.native_group_norm, shift=shift
    )


def conv_norm(conv: nn.Module, norm: nn.Module, x: Tensor, shift: Tensor) -> Tensor:
    """``norm(conv(x) + shift[:, :, None, None])`` (shift [N, C]: a residual block's time bias).

    The shift is added as the Winograd kernel writes the convolution's output where the convolution runs it, or else
    as the GroupNorm kernel reads its input (``settings.bias_in_norm``, in float32; where that kernel does not run,
    to a copy), or else to the convolution's output in place."""
    if uses_winograd(conv, x) or not settings.bias_in_norm:
        return norm(conv(x, image_bias=shift))
    return norm(conv(x), shift=shift)


def self_attention(x: Tensor, h: Tensor, qkv: nn.Conv2d, proj_out: nn.Conv2d, num_heads: int) -> Tensor:
    """``x + proj_out(attention(qkv(h)))``: softmax attention over the H*W positions of the q, k and v that the 1x1
    convolution ``qkv`` makes of h, per head, and the 1x1 convolution ``proj_out`` of its output.

    q, k and v are read where the projection leaves them, [B, HW, 3, heads, d]: in place by the native kernel, and
    with unit stride along the head dimension, which SDPA's fused (flash) kernels need (a strided layout falls back
    to math SDPA). On channels_last activations the 1x1 convolution's output already has that layout, and oneDNN's
    1x1 convolution is about twice as fast as the same matmul on the CPU (``settings.conv_projections``); on NCHW
    activations the tokens [B, HW, C] go through the convolution as a linear map. On the CPU the attention runs in
    float32 under autocast (``settings.attention_float32_on_cpu``), as the native kernel where it applies
    (``settings.native_attention``)."""
    B, C, H, W = x.shape
    channels_last = h.is_contiguous(memory_format=torch.channels_last) and settings.conv_projections
    if channels_last:
        q_k_v = qkv(h).permute(0, 2, 3, 1)
    else:
        q_k_v = F.linear(h.flatten(2).transpose(1, 2), qkv.weight.flatten(1), qkv.bias)
    q_k_v = q_k_v.reshape(B, H * W, 3, num_heads, C // num_heads)
    if x.device.type == "cpu" and settings.attention_float32_on_cpu:
        with torch.autocast("cpu", enabled=False):
            out = ops.attention(q_k_v.float(), native=settings.native_attention)
    else:
        out = ops.attention(q_k_v, native=False)
    out = out.reshape(B, H * W, C)
    if channels_last:
        return proj_out(out.view(B, H, W, C).permute(0, 3, 1, 2).to(x.dtype), residual=x)
    out = F.linear(out, proj_out.weight.flatten(1), proj_out.bias)
    return x + out.transpose(1, 2).reshape(B, C, H, W)
