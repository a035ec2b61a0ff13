"""``UNetConfig``: the hyper-parameters of the DDPM U-Net (the ``model`` section), checked for a buildable net."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from ddpm.config.base import Config

PositiveInt = Annotated[int, Field(gt=0)]
MAX_PARAMETERS = 2**40  # far beyond any net this project trains; larger values are typos


class UNetConfig(Config):
    """Hyper-parameters of the DDPM U-Net; the validator checks the structure the net is built with."""

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

    def resolutions(self) -> list[int]:
        """Feature-map size of each level, from the input's down."""
        return [self.image_size // 2**i for i in range(len(self.channel_mult))]

    def widths(self) -> list[int]:
        """Channel count of each level."""
        return [self.channels * mult for mult in self.channel_mult]

    def normalized_widths(self) -> list[int]:
        """Channel count of every GroupNorm of the net: each residual block's input and output (a decoder block's
        input is its level's width plus a skip connection's) and each attention layer's."""
        ch, skips, counts = self.channels, [self.channels], []
        for i, width in enumerate(self.widths()):
            for _ in range(self.num_res_blocks):
                counts += [ch, width]
                ch = width
                skips.append(ch)
            if i < len(self.channel_mult) - 1:
                skips.append(ch)
        counts.append(ch)  # the middle blocks and attention
        for width in reversed(self.widths()):
            for _ in range(self.num_res_blocks + 1):
                counts += [ch + skips.pop(), width]
                ch = width
        return counts

    @model_validator(mode="after")
    def _buildable(self) -> UNetConfig:
        levels = len(self.channel_mult)
        divisor = 2 ** (levels - 1)
        if self.image_size % divisor:
            raise ValueError(
                f"image_size={self.image_size} must be divisible by {divisor} "
                f"(2**(len(channel_mult)-1) for channel_mult={self.channel_mult})"
            )
        resolutions, widths = self.resolutions(), self.widths()
        bad = [r for r in self.attn_resolutions if r not in resolutions]
        if bad:
            raise ValueError(
                f"attn_resolutions={self.attn_resolutions} contains {bad}, which are not level resolutions; "
                f"allowed: {resolutions}"
            )
        for ch in sorted(set(self.normalized_widths())):  # GroupNorm caps its groups at the channel count
            groups = min(self.norm_groups, ch)
            if ch % groups:
                raise ValueError(
                    f"norm_groups={self.norm_groups} must divide every channel count of the net (groups are capped "
                    f"at the count), but {ch} channels are not divisible by {groups}"
                )
        attended = [widths[-1]] + [w for w, r in zip(widths, resolutions) if r in self.attn_resolutions]
        for ch in attended:
            if ch % self.num_heads:
                raise ValueError(
                    f"num_heads={self.num_heads} must divide the channel count of every attention layer, "
                    f"but {ch} channels are not divisible by {self.num_heads}"
                )
        widest = max(widths)
        estimate = 9 * widest * widest * 2 * (self.num_res_blocks + 1) * levels  # 3x3 convolutions dominate
        if estimate > MAX_PARAMETERS:
            raise ValueError(f"the net would have about {estimate:.3g} parameters; allowed: at most {MAX_PARAMETERS}")
        return self
