"""ddpm: denoising diffusion models (DDPM, DDIM and the EDM family) as pure math, a U-Net and a Lightning module.

The names below are imported on first use, so ``import ddpm.config`` (what every pipeline stage does to
validate params.yaml) loads the schemas only, not torch or Lightning.
"""

from importlib import import_module
from typing import Any

_PUBLIC = {
    "ConfigError": "ddpm.config",
    "DDPMConfig": "ddpm.config",
    "OptimConfig": "ddpm.config",
    "UNetConfig": "ddpm.config",
    "DiffusionModule": "ddpm.module",
    "UNet": "ddpm.nets",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'ddpm' has no attribute {name!r}")
