"""U-Net noise-prediction network of Ho et al. 2020.

Reference: J. Ho, A. Jain, P. Abbeel, "Denoising Diffusion Probabilistic Models",
NeurIPS 2020, arXiv:2006.11239 (Appendix B, architecture of the PixelCNN++-style
U-Net with sinusoidal time embedding, GroupNorm and self-attention at 16x16).

The net maps a noisy image x_t, a timestep t (integer or continuous) and an
optional class label y to a tensor of the same shape as x_t (epsilon, x_0 or v).
Under an EDM preconditioning (``ddpm.preconditioning``) it is F: it sees c_in x and
the noise label c_noise, and label num_classes is the null class of guidance.

The layers here describe the architecture; :mod:`ddpm.kernels` decides which kernel computes
each of them (native CPU kernels or PyTorch's ops, chosen by ``ddpm.kernels.settings``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm import kernels
from ddpm.config import UNetConfig


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding [B, dim] of (integer or continuous) timesteps t [B]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class GroupNorm(nn.GroupNorm):
    """GroupNorm followed by SiLU if ``silu``, returned in the input dtype; the parameters and the state dict are
    those of ``nn.GroupNorm`` (:func:`ddpm.kernels.normalize` chooses the kernel, with float32 arithmetic whatever
    the input dtype, as CUDA autocast does)."""

    def __init__(self, num_groups: int, num_channels: int, silu: bool = False, eps: float = 1e-5):
        super().__init__(num_groups, num_channels, eps=eps)
        self.silu = silu

    def forward(self, x: Tensor | tuple[Tensor, ...], shift: Tensor | None = None) -> Tensor:
        """(SiLU of) the GroupNorm of x, or of ``torch.cat(x, dim=1)`` for a tuple of tensors, plus
        ``shift[:, :, None, None]`` ([N, C]: a value per image and channel) where given."""
        return kernels.normalize(self, x, silu=self.silu, shift=shift)

    def extra_repr(self) -> str:
        """nn.GroupNorm's description, and whether SiLU follows."""
        return super().extra_repr() + (", silu=True" if self.silu else "")


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) whose output can take a bias per image and a residual
    (:meth:`forward`; :func:`ddpm.kernels.conv2d` chooses the kernel)."""

    def forward(
        self,
        x: Tensor | tuple[Tensor, ...],
        image_bias: Tensor | None = None,
        residual: Tensor | None = None,
        upsample: bool = False,
    ) -> Tensor:
        """The convolution of x (``upsample``: of x upsampled x2, nearest), plus ``image_bias[:, :, None, None]``
        ([N, Cout]: a bias per image) and ``residual`` (shaped like the output) where given; x may be a tuple of
        tensors standing for their concatenation along the channels."""
        return kernels.conv2d(self, x, image_bias=image_bias, residual=residual, upsample=upsample)


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
    """Residual block conditioned on the time(+class) embedding."""

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
        """Return skip(x) + conv2(dropout(norm2(conv1(norm1(x)) + emb_proj(silu(emb))))); the norms carry their SiLU.

        x may be a tuple of tensors that stand for their concatenation along the channels (a decoder block's input
        and skip connection, :func:`ddpm.kernels.lazy_cat`)."""
        time_bias = self.emb_proj(F.silu(emb))
        h = kernels.conv_norm(self.conv1, self.norm2, self.norm1(x), shift=time_bias)
        skip = self.skip(x) if isinstance(self.skip, Conv2d) else kernels.cat(x)
        return self.conv2(self.dropout(h), residual=skip)


class Attention(nn.Module):
    """Multi-head self-attention over spatial positions, with a residual connection."""

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
        """Return x + proj_out(softmax(q k^T / sqrt(d)) v), per head, with q, k, v = qkv(norm(x)) over the H*W
        positions."""
        return kernels.self_attention(x, self.norm(x), self.qkv, self.proj_out, self.num_heads)


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

    The activations and the convolution weights (from construction) take ``ddpm.kernels.settings.memory_format``
    (channels_last by default); the output is contiguous (NCHW), and the state dict holds the same values in either
    layout.
    """

    def __init__(self, config: UNetConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = UNetConfig(**overrides)
        elif overrides:
            config = type(config).from_dict({**config.to_dict(), **overrides})
        self.config = cfg = config

        levels = len(cfg.channel_mult)  # the config checked the structure (UNetConfig)
        resolutions = cfg.resolutions()

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
        self.to(memory_format=kernels.settings.memory_format)

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

        h = self.conv_in(x).contiguous(memory_format=kernels.settings.memory_format)
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
                h = attn(res(kernels.lazy_cat(h, hs.pop()), emb))  # [h, skip] along the channels
            if level.resample is not None:
                h = level.resample(h)

        return self.conv_out(self.norm_out(h)).contiguous()
