"""U-Net noise-prediction network of Ho et al. 2020.

Reference: J. Ho, A. Jain, P. Abbeel, "Denoising Diffusion Probabilistic Models",
NeurIPS 2020, arXiv:2006.11239 (Appendix B, architecture of the PixelCNN++-style
U-Net with sinusoidal time embedding, GroupNorm and self-attention at 16x16).

The net maps a noisy image x_t, a timestep t (integer or continuous) and an
optional class label y to a tensor of the same shape as x_t (epsilon, x_0 or v).
Under an EDM preconditioning (``ddpm.preconditioning``) it is F: it sees c_in x and
the noise label c_noise, and label num_classes is the null class of guidance.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ddpm import kernels
from ddpm.config import Config

PositiveInt = Annotated[int, Field(gt=0)]


class UNetConfig(Config):
    """Hyper-parameters of the DDPM U-Net."""

    in_channels: int = Field(default=1, gt=0)
    image_size: int = Field(default=28, gt=0)
    channels: int = Field(default=64, gt=0)
    channel_mult: tuple[PositiveInt, ...] = Field(default=(1, 2, 2), min_length=1)
    num_res_blocks: int = Field(default=2, gt=0)
    attn_resolutions: tuple[PositiveInt, ...] = (14,)
    num_heads: int = Field(default=4, gt=0)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    num_classes: int | None = Field(default=None, gt=0)
    norm_groups: int = Field(default=32, gt=0)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding [B, dim] of (integer or continuous) timesteps t [B]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as CUDA autocast does), returned in the input dtype.

    ``silu=True`` applies SiLU to the output as well. On channels_last CPU activations both run as one native
    kernel (:mod:`ddpm.kernels`) unless ``native`` is False; the parameters and the state dict are those of
    ``nn.GroupNorm``. ``float32=False`` runs PyTorch's GroupNorm in the input's dtype instead (bf16 under
    autocast: on the CPU its channels_last kernel is ~5x slower than float32's).
    """

    native = True
    float32 = True

    def __init__(self, num_groups: int, num_channels: int, silu: bool = False, eps: float = 1e-5):
        super().__init__(num_groups, num_channels, eps=eps)
        self.silu = silu

    def forward(self, x: Tensor | tuple[Tensor, ...], shift: Tensor | None = None) -> Tensor:
        """(SiLU of) the GroupNorm of x, or of ``torch.cat(x, dim=1)`` for a tuple of tensors (made only where
        the native kernel does not run), plus ``shift[:, :, None, None]`` ([N, C]: a value per image and channel,
        which the native kernel adds as it reads x) where given."""
        if not self.float32:
            x = cat(x)
            h = super().forward(x if shift is None else x + shift[:, :, None, None].to(x.dtype))
            return F.silu(h) if self.silu else h
        return kernels.group_norm(
            x, self.num_groups, self.weight, self.bias, self.eps, self.silu, self.native, shift=shift
        )

    def extra_repr(self) -> str:
        """nn.GroupNorm's description, and whether SiLU follows."""
        return super().extra_repr() + (", silu=True" if self.silu else "")


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


class _Conv2dSum(torch.autograd.Function):
    """``conv(x) + other`` as one oneDNN call (a binary post-op); the backward is the convolution's, and other's
    gradient is the output's."""

    @staticmethod
    def forward(ctx, x: Tensor, other: Tensor, weight: Tensor, bias: Tensor | None, conv: tuple) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.has_bias = conv, bias is not None
        return _POINTWISE(x, other, weight, bias, *conv, "add", None, None, [], None)

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


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) with faster CPU paths, which can add a bias per image and a
    residual to its output (:meth:`forward`).

    - ``winograd``: a 3x3 convolution with stride 1 and padding 1 of float32 channels_last CPU activations with
      a multiple of 16 channels runs as the native Winograd kernel (:func:`ddpm.kernels.conv3x3`), forward
      and backward, on tiles of ``winograd_tile`` x ``winograd_tile`` outputs (4: F(4x4, 3x3), 4x fewer
      multiplications than the direct convolution, float32 rounding errors up to ~22x PyTorch's own, within 6e-6
      of the largest value in the tests; 2: F(2x2, 3x3), 2.25x fewer, errors about PyTorch's). The filters'
      transform is kept until the weight changes.
    - ``separate_bias_grad``: other convolutions' CPU training backward computes the bias gradient apart from
      oneDNN's weight gradient, which is faster (:class:`_Conv2dBackwardWithBiasSum`).

    - ``fused_sum``: under CPU bf16 autocast, a residual, or a 1x1 convolution's other parts, are added by
      oneDNN as it writes the output (a binary post-op; in training :class:`_Conv2dSum`, whose backward is the
      convolution's): PyTorch's bf16 addition on the CPU took longer than the convolution itself at the
      default net's shapes.

    Elsewhere it is ``nn.Conv2d``: on a GPU, inside ``torch.compile``, with a ``padding_mode`` other than zeros,
    or with the switches False. Under CPU bf16 autocast only ``fused_sum`` applies (the separate bias sum measured
    slower there).
    """

    separate_bias_grad = True
    winograd = True
    winograd_tile = 4
    fused_sum = True

    def uses_winograd(self, x: Tensor) -> bool:
        """Whether this convolution of x runs the Winograd kernel."""
        return (
            self.winograd
            and self.kernel_size == (3, 3)
            and self.stride == (1, 1)
            and self.padding == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and not torch.is_autocast_enabled("cpu")
            and kernels.conv3x3_applies(x, self.weight)
        )

    def forward(
        self,
        x: Tensor | tuple[Tensor, ...],
        image_bias: Tensor | None = None,
        residual: Tensor | None = None,
        upsample: bool = False,
    ) -> Tensor:
        """The convolution of x (``upsample``: of x upsampled x2, nearest), plus ``image_bias[:, :, None, None]``
        ([N, Cout]: a bias per image) and ``residual`` (shaped like the output) where given. The Winograd kernel
        reads the upsampled input from x and adds both as it writes the output; elsewhere they are separate
        operations (the additions in place).

        x may be a tuple of tensors standing for their concatenation along the channels: a 1x1 convolution
        (without ``upsample``) then sums the convolutions of each part with its slice of the weight, the same
        values without the concatenated copy (other convolutions make it)."""
        if (
            not isinstance(x, Tensor)
            and len(x) > 1
            and self.kernel_size == (1, 1)
            and self.groups == 1
            and not upsample
        ):
            h = self._conv_parts(x)
        else:
            x = cat(x)
            if self.uses_winograd(x):
                weight, bias = self.weight, self.bias
                if image_bias is not None:
                    bias = image_bias if bias is None else image_bias + bias
                return kernels.conv3x3(x, weight, bias, self._winograd_weights(weight), residual, upsample)
            if upsample:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            if residual is not None and image_bias is None and self._fuses_sum(x, residual):
                return self._conv_sum(x, residual)
            h = self._conv_forward(x, self.weight, self.bias)
        if image_bias is not None:
            h += image_bias[:, :, None, None]
        if residual is not None:
            h += residual
        return h

    def _conv_parts(self, xs: tuple[Tensor, ...]) -> Tensor:
        """A 1x1 convolution of ``torch.cat(xs, dim=1)`` as the sum of each part's convolution with its slice."""
        channels = sum(part.shape[1] for part in xs)
        if channels != self.in_channels:
            raise ValueError(
                f"the parts of x have {channels} channels in all; this convolution takes {self.in_channels}"
            )
        h, c0 = None, 0
        for part in xs:
            c1 = c0 + part.shape[1]
            if h is None:
                h = self._conv_forward(part, self.weight[:, c0:c1], self.bias)
            elif self._fuses_sum(part, h):
                h = self._conv_sum(part, h, (c0, c1), bias=False)
            else:
                h += self._conv_forward(part, self.weight[:, c0:c1], None)
            c0 = c1
        return h

    def _fuses_sum(self, x: Tensor, other: Tensor) -> bool:
        """Whether ``conv(x) + other`` runs as one oneDNN call (:meth:`_conv_sum`): bf16 channels_last CPU
        tensors under CPU bf16 autocast (or with bf16 weights), outside compile."""
        return (
            self.fused_sum
            and _POINTWISE is not None
            and x.device.type == "cpu"
            and x.dtype == other.dtype == torch.bfloat16
            and (
                self.weight.dtype == torch.bfloat16
                or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            )
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and x.is_contiguous(memory_format=torch.channels_last)
            and other.is_contiguous(memory_format=torch.channels_last)
            and not torch.compiler.is_compiling()
        )

    def _conv_sum(self, x: Tensor, other: Tensor, channels: tuple[int, int] | None = None, bias: bool = True) -> Tensor:
        """``conv(x) + other`` (a new tensor) in one oneDNN call, with the weight's input ``channels`` [c0, c1)
        only where given (a part of a 1x1 convolution's input) and without the bias if not ``bias``."""
        conv = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        has_bias = bias and self.bias is not None
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, other, self.weight)):
            weight = self.weight if channels is None else self.weight[:, channels[0] : channels[1]]
            weight = weight.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)  # as autocast casts
            b = self.bias.to(torch.bfloat16) if has_bias else None
            return _Conv2dSum.apply(x, other, weight, b, conv)
        weight = self._bf16("weight", self.weight, channels)
        b = self._bf16("bias", self.bias) if has_bias else None
        return _POINTWISE(x, other, weight, b, *conv, "add", None, None, [], None)

    def _bf16(self, name: str, t: Tensor, channels: tuple[int, int] | None = None) -> Tensor:
        """t (its input ``channels`` only, where given) in bf16, kept while t is the same tensor at the same
        version (autocast casts the weights at every call without autograd)."""
        if t.dtype == torch.bfloat16 and channels is None:
            return t
        key = (id(t), t.data_ptr(), t._version, tuple(t.shape), channels)
        cache = self.__dict__.setdefault("_bf16_cache", {})
        cached = cache.get((name, channels))
        if cached is None or cached[0] != key:
            with torch.no_grad():
                v = t if channels is None else t[:, channels[0] : channels[1]]
                fmt = torch.channels_last if v.dim() == 4 else torch.contiguous_format
                cached = (key, v.to(torch.bfloat16).contiguous(memory_format=fmt))
            cache[(name, channels)] = cached
        return cached[1]

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if (
            self.separate_bias_grad
            and bias is not None
            and x.device.type == "cpu"
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad or bias.requires_grad)
            and not torch.is_autocast_enabled("cpu")
            and x.dtype == weight.dtype == bias.dtype
            and not torch.compiler.is_compiling()
        ):
            conv = (self.stride, self.padding, self.dilation, self.groups)
            return _Conv2dBackwardWithBiasSum.apply(x, weight, bias, conv)
        return super()._conv_forward(x, weight, bias)

    def _winograd_weights(self, weight: Tensor) -> Tensor:
        """The Winograd transform of weight, kept while the weight is the same tensor at the same version."""
        key = (id(weight), weight.data_ptr(), weight._version, tuple(weight.shape), self.winograd_tile)
        cached = self.__dict__.get("_winograd_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, kernels.winograd_weights(weight, self.winograd_tile))
            self.__dict__["_winograd_cache"] = cached
        return cached[1]


def _pointwise_op():
    """oneDNN's convolution with a binary post-op (what inductor's CPU fusions call), if this build has it."""
    try:
        return torch.ops.mkldnn._convolution_pointwise.binary if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


_POINTWISE = _pointwise_op()


def group_norm(ch: int, norm_groups: int, silu: bool = False) -> GroupNorm:
    """GroupNorm (followed by SiLU if ``silu``) over ch channels with min(norm_groups, ch) groups."""
    groups = min(norm_groups, ch)
    if ch % groups:
        raise ValueError(
            f"norm_groups={norm_groups} must divide every channel count of the net "
            f"(groups are capped at the count), but {ch} channels are not divisible "
            f"by {groups}"
        )
    return GroupNorm(groups, ch, silu=silu)


def zero_(module: nn.Module) -> nn.Module:
    """Set every parameter of module to zero and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block conditioned on the time(+class) embedding.

    ``bias_in_norm``: where the first convolution does not run the Winograd kernel, the time embedding's bias
    goes to the second GroupNorm (which adds it as it reads) instead of being added to the convolution's output
    in place (False).
    """

    bias_in_norm = True

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, norm_groups: int):
        super().__init__()
        self.norm1 = group_norm(in_ch, norm_groups, silu=True)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch, norm_groups, silu=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor | tuple[Tensor, ...], emb: Tensor) -> Tensor:
        """Return skip(x) + F(x, emb); x may be a tuple of tensors that stand for their concatenation along the
        channels (a decoder block's input and skip connection), which the GroupNorm kernel and the 1x1 skip
        convolution read in place, so it is not made.

        The norms carry their SiLU. The time embedding is added as the first convolution writes its output
        (Winograd's kernel), or else as the second GroupNorm reads it (the native kernel, in float32; where that
        does not run, to a copy). The skip connection is added as the second convolution writes its output
        (Winograd's kernel; oneDNN's under CPU bf16 autocast), or in place after it (its backward needs only its
        input).
        """
        time_bias = self.emb_proj(F.silu(emb))
        h = self.norm1(x)
        if self.conv1.uses_winograd(h) or not self.bias_in_norm:
            h = self.norm2(self.conv1(h, image_bias=time_bias))  # Winograd's kernel adds it as it writes h
        else:  # the GroupNorm kernel adds it as it reads h
            h = self.norm2(self.conv1(h), shift=time_bias)
        skip = self.skip(x) if isinstance(self.skip, Conv2d) else cat(x)
        return self.conv2(self.dropout(h), residual=skip)


class Attention(nn.Module):
    """Multi-head self-attention over spatial positions, with a residual connection.

    ``float32_on_cpu``: on the CPU the attention itself runs in float32 under autocast, since the CPU's bf16
    flash-attention backward is ~8x slower than float32's (the attention's FLOPs are a small share of the net's).
    ``conv_projections``: the q/k/v and output projections run as 1x1 convolutions on channels_last activations
    (False: as matmuls over the tokens). ``native``: the CPU attention runs as the native kernel
    (:func:`ddpm.kernels.attention`) where it applies (False: PyTorch's SDPA).
    """

    float32_on_cpu = True
    conv_projections = True
    native = True

    def __init__(self, ch: int, num_heads: int, norm_groups: int):
        super().__init__()
        if ch % num_heads:
            raise ValueError(
                f"num_heads={num_heads} must divide the channel count of every "
                f"attention layer, but {ch} channels are not divisible by {num_heads}"
            )
        self.num_heads = num_heads
        self.norm = group_norm(ch, norm_groups)
        self.qkv = Conv2d(ch, 3 * ch, 1)
        self.proj_out = zero_(Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Return x + proj_out(attention(norm(x)))."""
        B, C, H, W = x.shape
        h = self.norm(x)
        # q, k and v are read where the projection leaves them, [B, HW, 3, heads, d]: in place by the native
        # kernel, and with unit stride along the head dimension, which SDPA's fused (flash) kernels need (a strided
        # layout falls back to math SDPA). On channels_last activations the 1x1 convolution's output already has
        # that layout, and oneDNN's 1x1 convolution is about twice as fast as the same matmul on the CPU; on NCHW
        # activations the tokens [B, HW, C] go through the convolution as a linear map.
        channels_last = h.is_contiguous(memory_format=torch.channels_last) and self.conv_projections
        if channels_last:
            qkv = self.qkv(h).permute(0, 2, 3, 1)
        else:
            qkv = F.linear(h.flatten(2).transpose(1, 2), self.qkv.weight.flatten(1), self.qkv.bias)
        qkv = qkv.reshape(B, H * W, 3, self.num_heads, C // self.num_heads)
        if x.device.type == "cpu" and self.float32_on_cpu:
            with torch.autocast("cpu", enabled=False):
                h = kernels.attention(qkv.float(), native=self.native)
        else:
            h = kernels.attention(qkv, native=False)
        h = h.reshape(B, H * W, C)
        if channels_last:
            return self.proj_out(h.view(B, H, W, C).permute(0, 3, 1, 2).to(x.dtype), residual=x)
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Halve the spatial size with a stride-2 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Return the downsampled feature map."""
        return self.conv(x)


class Upsample(nn.Module):
    """Double the spatial size: nearest-neighbour x2 followed by a 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Return the upsampled feature map."""
        return self.conv(x, upsample=True)


class Level(nn.Module):
    """One U-Net resolution: ResBlocks (each maybe with attention) and a resample."""

    def __init__(self, res: list[ResBlock], attn: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.resample = resample


class UNet(nn.Module):
    """DDPM U-Net predicting a tensor shaped like x_t from (x_t, t, y).

    ``memory_format``: the layout of the activations, and of the convolution weights from construction.
    channels_last (NHWC) lets oneDNN (CPU) and tensor cores (GPU) run the convolutions without reordering each
    input or weight. The output is contiguous (NCHW); the state dict holds the same values in either layout.

    ``skip_parts``: a decoder block gets its input and the skip connection as a pair, which stands for their
    concatenation along the channels (:meth:`ResBlock.forward`); False makes the concatenation first.
    """

    memory_format = torch.channels_last
    skip_parts = True

    def __init__(self, config: UNetConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = UNetConfig(**overrides)
        elif overrides:
            config = type(config).from_dict({**config.to_dict(), **overrides})
        self.config = cfg = config

        levels = len(cfg.channel_mult)
        divisor = 2 ** (levels - 1)
        if cfg.image_size % divisor:
            raise ValueError(
                f"image_size={cfg.image_size} must be divisible by {divisor} "
                f"(2**(len(channel_mult)-1) for channel_mult={cfg.channel_mult})"
            )
        resolutions = [cfg.image_size // 2**i for i in range(levels)]
        bad = [r for r in cfg.attn_resolutions if r not in resolutions]
        if bad:
            raise ValueError(
                f"attn_resolutions={cfg.attn_resolutions} contains {bad}, which are "
                f"not level resolutions; allowed: {resolutions}"
            )

        ch, emb_dim, groups = cfg.channels, 4 * cfg.channels, cfg.norm_groups
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes is not None else None
        self.conv_in = Conv2d(cfg.in_channels, ch, 3, padding=1)

        def attention(c: int, resolution: int) -> nn.Module:
            """Attention layer if resolution is in attn_resolutions, else identity."""
            if resolution in cfg.attn_resolutions:
                return Attention(c, cfg.num_heads, groups)
            return nn.Identity()

        skip_chs = [ch]
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.channel_mult):
            out_ch, res, attn = cfg.channels * mult, [], []
            for _ in range(cfg.num_res_blocks):
                res.append(ResBlock(ch, out_ch, emb_dim, cfg.dropout, groups))
                ch = out_ch
                attn.append(attention(ch, resolutions[i]))
                skip_chs.append(ch)
            down = None
            if i < levels - 1:
                down = Downsample(ch)
                skip_chs.append(ch)
            self.down.append(Level(res, attn, down))

        self.mid_res1 = ResBlock(ch, ch, emb_dim, cfg.dropout, groups)
        self.mid_attn = Attention(ch, cfg.num_heads, groups)
        self.mid_res2 = ResBlock(ch, ch, emb_dim, cfg.dropout, groups)

        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            out_ch, res, attn = cfg.channels * mult, [], []
            for _ in range(cfg.num_res_blocks + 1):
                in_ch = ch + skip_chs.pop()
                res.append(ResBlock(in_ch, out_ch, emb_dim, cfg.dropout, groups))
                ch = out_ch
                attn.append(attention(ch, resolutions[i]))
            self.up.append(Level(res, attn, Upsample(ch) if i > 0 else None))

        self.norm_out = group_norm(ch, groups, silu=True)
        self.conv_out = zero_(Conv2d(ch, cfg.in_channels, 3, padding=1))
        # Convolution weights in the activations' layout: no reordered copy of each weight at every call
        self.to(memory_format=self.memory_format)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict epsilon (or x_0, v) from x_t [B, C, H, W], t [B] and labels y [B]."""
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}], got {list(x.shape)}")
        B = x.shape[0]
        if t.ndim == 0:
            t = t.expand(B)
        if tuple(t.shape) != (B,):
            raise ValueError(f"t must have shape [{B}] or be 0-d, got {list(t.shape)}")

        emb = self.time_mlp(timestep_embedding(t, cfg.channels).to(x.dtype))
        if self.class_emb is None:
            if y is not None:
                raise ValueError("y was given but the net is unconditional (num_classes=None)")
        else:
            if y is None:
                y = torch.full((B,), cfg.num_classes, dtype=torch.long, device=x.device)
            elif tuple(y.shape) != (B,):
                raise ValueError(f"y must have shape [{B}], got {list(y.shape)}")
            emb = emb + self.class_emb(y)

        h = self.conv_in(x).contiguous(memory_format=self.memory_format)
        hs = [h]
        for level in self.down:
            for res, attn in zip(level.res, level.attn):
                h = attn(res(h, emb))
                hs.append(h)
            if level.resample is not None:
                h = level.resample(h)
                hs.append(h)

        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)

        for level in self.up:
            for res, attn in zip(level.res, level.attn):
                h = (h, hs.pop())  # the concatenation [h, skip] along the channels
                h = attn(res(h if self.skip_parts else torch.cat(h, dim=1), emb))
            if level.resample is not None:
                h = level.resample(h)

        return self.conv_out(self.norm_out(h)).contiguous()
