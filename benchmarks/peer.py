"""The peer: diffusers' UNet2DModel at the same architecture as our net (widths, blocks, attention, groups, heads)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ddpm.nets import UNetConfig


def peer_version() -> str | None:
    """diffusers' version, or None if the ``bench`` extra is not installed."""
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers.__version__


def peer_kwargs(cfg: UNetConfig) -> dict[str, Any]:
    """UNet2DModel arguments of the same architecture as ``cfg``: widths, blocks, attention levels, groups, heads."""
    resolutions = [cfg.image_size // 2**i for i in range(len(cfg.channel_mult))]
    attention = [r in cfg.attn_resolutions for r in resolutions]
    return {
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "block_out_channels": tuple(cfg.channels * m for m in cfg.channel_mult),
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        "norm_num_groups": cfg.norm_groups,
        "attention_head_dim": cfg.channels * cfg.channel_mult[-1] // cfg.num_heads,
        "dropout": cfg.dropout,
    }


class PeerNet(nn.Module):
    """diffusers' UNet2DModel behind our net's signature ``net(x, t) -> output`` (unconditional)."""

    def __init__(self, cfg: UNetConfig) -> None:
        from diffusers import UNet2DModel

        super().__init__()
        self.unet = UNet2DModel(**peer_kwargs(cfg))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if y is not None:
            raise ValueError("the peer is unconditional")
        return self.unet(x, t).sample
