"""The net's fast paths: native CPU kernels and the one seam that decides, layer by layer, which kernel runs.

The U-Net (:mod:`ddpm.nets`) describes the architecture; its layers call this package's layer functions, and one
settings object (:data:`settings`, changed for a block with :func:`using`) decides the paths they take:

- :func:`conv2d` (every convolution; :mod:`ddpm.kernels.conv`): the Winograd kernel, the bias gradient apart from
  oneDNN's weight gradient, oneDNN's fused sums, 1x1 convolutions of inputs given as parts along the channels;
- :func:`normalize` (GroupNorm + SiLU), :func:`conv_norm` (a residual block's convolution, time bias and norm),
  :func:`self_attention`, :func:`lazy_cat` (a decoder block's input and skip connection) and :func:`cat`
  (:mod:`ddpm.kernels.layers`).

The native kernels (:mod:`ddpm.kernels.ops`, C++ in ``csrc/``, built by :mod:`ddpm.kernels.build`):

- GroupNorm, optionally fused with the SiLU after it (:func:`group_norm`, ``csrc/group_norm_silu.cpp``). The U-Net
  normalises every block's input with GroupNorm and most of them go straight into a SiLU. On the CPU, PyTorch runs
  these as separate passes over the activation (and, under bf16 autocast, two casts more), and its channels_last
  GroupNorm walks each image several times; the kernel reads an image once for its statistics and once to write
  the output, while it is still in cache, and its backward likewise; it also takes its input as parts along the
  channels (a decoder block's input and skip connection), so their concatenation is never made, and adds a shift
  per image and channel to it (a block's time-embedding bias) in its per-channel constants.
- Few-token softmax attention (:func:`attention`, ``csrc/attention.cpp``). The attention of the low-resolution
  levels (49 tokens on a 7x7 map) is mostly overhead for PyTorch's flash kernel; the kernel runs one (image, head)
  at a time in cache, reading q, k and v where the channels_last projection leaves them.
- Winograd 3x3 convolutions (:func:`conv3x3`, ``csrc/winograd.cpp``). Most of the net's FLOPs are 3x3
  convolutions; the kernel computes the float32 ones with Winograd's F(4x4, 3x3), 4x fewer multiplications than
  oneDNN's direct convolution (see ``benchmarks/results.md`` for what each gains).

The kernels are compiled the first time they are needed (about 40 s with a C++ compiler; :func:`main` builds them
ahead, as ``make install`` does), once per torch installation, CPU kind and revision of the sources. Where they
cannot be built or do not apply (GPU tensors, NCHW layout, other dtypes, inside ``torch.compile``, which fuses
these ops itself) PyTorch's own ops run instead, with the same results up to float rounding.
Where each runs by default is :data:`build.DEFAULT_KERNELS`: all three where they compiled with their AVX-512 path,
GroupNorm and Winograd on the AVX2 path, none on other CPUs, where PyTorch's ops run instead of their portable loops
(``DDPM_NATIVE_KERNELS=1`` forces the kernels, ``0`` switches them off).
"""

from ddpm.kernels.build import ENV, enabled, extension, main
from ddpm.kernels.conv import cat, conv2d, uses_winograd
from ddpm.kernels.layers import conv_norm, lazy_cat, normalize, self_attention
from ddpm.kernels.ops import (
    ATTENTION_MAX_TOKENS,
    applies,
    attention,
    conv3x3,
    conv3x3_applies,
    conv3x3_weight_grad,
    group_norm,
    winograd_weights,
)
from ddpm.kernels.options import Settings, settings, using

__all__ = [
    "ATTENTION_MAX_TOKENS",
    "ENV",
    "Settings",
    "applies",
    "attention",
    "cat",
    "conv2d",
    "conv3x3",
    "conv3x3_applies",
    "conv3x3_weight_grad",
    "conv_norm",
    "enabled",
    "extension",
    "group_norm",
    "lazy_cat",
    "main",
    "normalize",
    "self_attention",
    "settings",
    "using",
    "uses_winograd",
    "winograd_weights",
]
