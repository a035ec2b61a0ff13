"""Inputs and references shared by the tests of the native kernels and of the net's fast paths."""

import torch
import torch.nn.functional as F

from ddpm.nets import UNet

CL = torch.channels_last


def reference(x, groups, weight, bias, silu, eps=1e-5):
    """PyTorch's GroupNorm (+ SiLU) in float64: the exact values the kernel approximates in float32."""
    h = F.group_norm(x.double(), groups, weight.double(), bias.double(), eps)
    return F.silu(h) if silu else h


def inputs(shape, dtype, groups, offset=0.0, seed=0):
    """A channels_last input of ``shape`` and ``dtype`` (spread 2 around ``offset``), and a GroupNorm's weight and
    bias for it."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + offset).to(dtype).contiguous(memory_format=CL)
    weight = torch.randn(shape[1], generator=g)
    bias = torch.randn(shape[1], generator=g)
    return x, weight, bias


def perturb(net: UNet) -> UNet:
    """Add noise to every parameter so zero-initialised layers pass the signal."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net
