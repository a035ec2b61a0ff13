"""Which fast paths the net's layers take: one settings object (:data:`settings`) and :func:`using`.

Every field is on by default, the fastest path measured on the CPU (``benchmarks/results.md``, Levers); a field
switched off runs PyTorch's plain ops for that part, with the same results up to float rounding. The fields are
read at every call, so a change applies at once to every net of the process.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch


@dataclasses.dataclass
class Settings:
    """The fast paths of the net's layers (see the module docstring)."""

    memory_format: torch.memory_format = torch.channels_last
    """The layout of the U-Net's activations, and of its convolution weights from construction. channels_last
    (NHWC) lets oneDNN (CPU) and tensor cores (GPU) run the convolutions without reordering each input or weight.
    The net's output is contiguous (NCHW) and its state dict holds the same values in either layout."""
    skip_parts: bool = True
    """A decoder block gets its input and the skip connection as a pair standing for their concatenation along the
    channels, which the GroupNorm kernel and the 1x1 skip convolution read in place (False: the concatenation is
    made first)."""
    native_group_norm: bool = True
    """GroupNorm (+ SiLU) of channels_last CPU activations runs as the native kernel (:func:`ops.group_norm`)."""
    group_norm_float32: bool = True
    """GroupNorm computed in float32 whatever the input dtype (as CUDA autocast does), returned in the input dtype
    (False: PyTorch's GroupNorm in the input's dtype, bf16 under autocast, whose channels_last CPU kernel is ~5x
    slower than float32's)."""
    winograd: bool = True
    """A 3x3 convolution with stride 1 and padding 1 of float32 channels_last CPU activations with a multiple of
    16 channels runs as the native Winograd kernel (:func:`ops.conv3x3`), forward and backward."""
    winograd_tile: int = 4
    """The Winograd kernel's tiles of outputs a side: 4 is F(4x4, 3x3), 4x fewer multiplications than the direct
    convolution, float32 rounding errors up to ~22x PyTorch's own (within 6e-6 of the largest value in the tests);
    2 is F(2x2, 3x3), 2.25x fewer, errors about PyTorch's."""
    separate_bias_grad: bool = True
    """Other convolutions' fp32 CPU training backward computes the bias gradient apart from oneDNN's weight
    gradient, which is faster (:class:`ddpm.kernels.conv._Conv2dBackwardWithBiasSum`)."""
    fused_sum: bool = True
    """Under CPU bf16 autocast, a residual, or a 1x1 convolution's other parts, are added by oneDNN as it writes
    the convolution's output (a binary post-op): PyTorch's bf16 addition on the CPU took longer than the
    convolution itself at the default net's shapes."""
    bias_in_norm: bool = True
    """Where a residual block's first convolution does not run the Winograd kernel, the time embedding's bias goes
    to the second GroupNorm, which adds it as it reads (False: added to the convolution's output in place)."""
    attention_float32_on_cpu: bool = True
    """On the CPU the attention itself runs in float32 under autocast: the CPU's bf16 flash-attention backward is
    ~8x slower than float32's (the attention's FLOPs are a small share of the net's)."""
    conv_projections: bool = True
    """The attention's q/k/v and output projections run as 1x1 convolutions on channels_last activations, whose
    output already has the layout the attention reads (False: as matmuls over the tokens)."""
    native_attention: bool = True
    """The CPU attention runs as the native kernel (:func:`ops.attention`) where it applies (False: PyTorch's
    SDPA)."""


settings = Settings()


@contextlib.contextmanager
def using(**changes: object) -> Iterator[Settings]:
    """Set fields of :data:`settings` while the block runs, then restore them: ``with using(winograd=False): ...``."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise TypeError(f"unknown kernel settings {unknown}; allowed: {sorted(fields)}")
    saved = {name: getattr(settings, name) for name in changes}
    try:
        for name, value in changes.items():
            setattr(settings, name, value)
        yield settings
    finally:
        for name, value in saved.items():
            setattr(settings, name, value)
