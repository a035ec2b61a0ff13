"""ddpm: denoising diffusion models (DDPM, DDIM) as pure math, a U-Net and a Lightning module."""

from ddpm.config import ConfigError, DDPMConfig, EMAConfig, OptimConfig
from ddpm.module import DiffusionModule
from ddpm.nets import UNet, UNetConfig

__all__ = ["ConfigError", "DDPMConfig", "DiffusionModule", "EMAConfig", "OptimConfig", "UNet", "UNetConfig"]
