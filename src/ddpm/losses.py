"""Per-sample diffusion losses and their timestep weightings.

min_snr: Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy":
the x0-space weight min(SNR, gamma) re-expressed for each prediction target, since the
eps-loss is SNR times the x0-loss and the v-loss is (SNR + 1) times the x0-loss.

DenoiserLoss: Karras et al. 2022 (EDM) eq. 2, lambda(sigma) ||D(x0 + n; sigma) - x0||^2, with the
weighting lambda that comes with the preconditioning (``ddpm.preconditioning``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ddpm import predictions

if TYPE_CHECKING:  # the schema only names the fields read here
    from ddpm.config import DDPMConfig

ELEMENTWISE: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "mse": lambda a, b, _delta: (a - b) ** 2,
    "l1": lambda a, b, _delta: (a - b).abs(),
    "huber": lambda a, b, delta: F.huber_loss(a, b, reduction="none", delta=delta),
}
WEIGHTINGS = ("uniform", "min_snr")


def snr_weight(weighting: str, prediction: str, alpha_bar: Tensor, gamma: float = 5.0) -> Tensor:
    """Loss weight per sample for ``weighting`` applied to a ``prediction``-space loss."""
    if weighting == "uniform":
        return torch.ones_like(alpha_bar)
    if weighting != "min_snr":
        raise ValueError(f"weighting={weighting!r} is unknown; allowed: {', '.join(WEIGHTINGS)}")
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    denominator = {"epsilon": snr, "x0": torch.ones_like(snr), "v": snr + 1}[predictions.check(prediction)]
    return clipped / denominator


@dataclass(frozen=True)
class DiffusionLoss:
    """Weighted per-sample regression loss on the network output; the caller reduces over the batch."""

    loss: str = "mse"
    prediction: str = "epsilon"
    weighting: str = "uniform"
    snr_gamma: float = 5.0
    huber_delta: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in ELEMENTWISE:
            raise ValueError(f"loss={self.loss!r} is unknown; allowed: {', '.join(ELEMENTWISE)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r} is unknown; allowed: {', '.join(WEIGHTINGS)}")
        predictions.check(self.prediction)

    def __call__(self, output: Tensor, target: Tensor, alpha_bar: Tensor) -> Tensor:
        """Loss per sample [B] for outputs [B, ...] at noise levels alpha_bar [B]."""
        per_sample = per_sample_loss(self.loss, output, target, self.huber_delta)
        w = snr_weight(self.weighting, self.prediction, alpha_bar, self.snr_gamma)
        return per_sample * w.to(per_sample.dtype)


def per_sample_loss(loss: str, output: Tensor, target: Tensor, huber_delta: float = 1.0) -> Tensor:
    """Elementwise ``loss`` averaged over all but the batch dimension: [B]."""
    if output.shape != target.shape:
        raise ValueError(f"output shape {tuple(output.shape)} != target shape {tuple(target.shape)}")
    return ELEMENTWISE[loss](output, target, huber_delta).flatten(1).mean(1)


@dataclass(frozen=True)
class DenoiserLoss:
    """EDM eq. 2 per sample: lambda(sigma) loss(D(x0 + n; sigma), x0); the caller reduces over the batch."""

    loss: str = "mse"
    huber_delta: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in ELEMENTWISE:
            raise ValueError(f"loss={self.loss!r} is unknown; allowed: {', '.join(ELEMENTWISE)}")

    def __call__(self, denoised: Tensor, x0: Tensor, weight: Tensor) -> Tensor:
        """Loss per sample [B] of denoised images [B, ...] against x0, times lambda(sigma) = weight [B]."""
        per_sample = per_sample_loss(self.loss, denoised, x0, self.huber_delta)
        return per_sample * weight.to(per_sample.dtype)


def for_config(config: DDPMConfig) -> DiffusionLoss | DenoiserLoss:
    """The per-sample training loss a DDPMConfig names (a denoiser loss for edm, vp and ve)."""
    if config.preconditioning != "ddpm":
        return DenoiserLoss(config.loss, config.huber_delta)
    return DiffusionLoss(config.loss, config.prediction, config.weighting, config.snr_gamma, config.huber_delta)
