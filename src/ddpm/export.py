"""The exported model (``model.pt``): the EMA network's config, weights and DDPMConfig, for sampling.

A plain dict saved with ``torch.save`` and read with ``weights_only=True``, so loading a crafted file
never runs code. Loading needs the network and the schemas only, not the training code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ddpm import io
from ddpm.config import DDPMConfig, UNetConfig
from ddpm.nets import UNet

MODEL_FORMAT = "ddpm-model/1"


@dataclass(frozen=True)
class Model:
    """A network ready to sample (eval mode) and the DDPMConfig it was trained with."""

    net: UNet
    config: DDPMConfig


def save_model(path: str | Path, net: nn.Module, config: DDPMConfig, **extra: Any) -> None:
    """Write ``net`` (a UNet: its config and weights) and ``config`` atomically as a model file; ``extra`` are
    further plain entries (an EMA snapshot's profile, say) that loading ignores."""
    payload = {**extra, "format": MODEL_FORMAT, "net": net.config.to_dict(), "config": config.to_dict()}
    io.save_payload(path, {**payload, "state_dict": net.state_dict()})


def load_model(path: str | Path) -> Model:
    """Load a model file; a missing, corrupt or mismatched file raises one line naming it."""
    payload = io.load_payload(path, "model", {"format", "net", "config", "state_dict"})
    if payload["format"] != MODEL_FORMAT:
        raise ValueError(f"{path}: unknown model format {payload['format']!r}; expected {MODEL_FORMAT!r}")
    net_cfg = UNetConfig.from_dict(payload["net"], f"{path}: net")
    config = DDPMConfig.from_dict(payload["config"], f"{path}: config")
    if (net_cfg.in_channels, net_cfg.image_size) != (config.channels, config.image_size):
        raise ValueError(
            f"{path}: the net's (in_channels, image_size)={(net_cfg.in_channels, net_cfg.image_size)} do not match "
            f"the config's (channels, image_size)={(config.channels, config.image_size)}"
        )
    net = UNet(net_cfg)
    io.load_state(net, payload["state_dict"], path, "model")
    return Model(net.eval().requires_grad_(False), config)
