"""Preconditioning: a network F as the denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM), Table 1.
Each family fixes the four scalings together with its training noise distribution p_train(sigma) and
loss weighting lambda(sigma) (EDM eq. 2: E lambda(sigma) ||D(x0 + n; sigma) - x0||^2, n ~ N(0, sigma^2)):

edm: sigma_data = 0.5, c_noise = ln(sigma) / 4, ln(sigma) ~ N(P_mean, P_std^2),
     lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
vp:  Song et al. 2021 VP-SDE, c_noise = (M - 1) t(sigma), t ~ U(epsilon_t, 1), lambda = 1 / sigma^2.
ve:  Song et al. 2021 VE-SDE, c_noise = ln(sigma / 2), ln(sigma) ~ U(ln sigma_min, ln sigma_max), lambda = 1 / sigma^2.

``DDPM`` reads a discrete-time network (Ho et al. 2020; Song et al. 2021, DDIM) trained on
``alphas_cumprod`` as a denoiser: x_t = sqrt(alpha_bar) x with sigma = sqrt((1 - alpha_bar) / alpha_bar),
each sigma snapped to the nearest trained timestep. It is for sampling only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ddpm import predictions, schedules

if TYPE_CHECKING:  # the schema only names the fields read here
    from ddpm.config import DDPMConfig

Scalings = tuple[Tensor, Tensor, Tensor, Tensor]
Device = torch.device | str | None


@dataclass(frozen=True)
class EDM:
    """EDM preconditioning (Table 1, "EDM" column) with its log-normal training sigmas and weighting."""

    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2

    def scalings(self, sigma: Tensor) -> Scalings:
        """(c_skip, c_out, c_in, c_noise) at noise levels sigma [B]."""
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        c_in = 1 / (self.sigma_data**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def sample_sigma(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: Device = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Training noise levels: ln(sigma) ~ N(P_mean, P_std^2)."""
        z = torch.randn(n, generator=generator, device=device, dtype=dtype)
        return (self.P_mean + self.P_std * z).exp()

    def weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


@dataclass(frozen=True)
class VP:
    """VP preconditioning (Table 1, "VP" column): c_noise = (M - 1) t(sigma), uniform training t."""

    beta_d: float = 19.9
    beta_min: float = 0.1
    epsilon_t: float = 1e-5
    M: int = 1000

    def scalings(self, sigma: Tensor) -> Scalings:
        """(c_skip, c_out, c_in, c_noise) at noise levels sigma [B]."""
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * schedules.vp_sigma_inv(sigma, self.beta_d, self.beta_min)
        return c_skip, c_out, c_in, c_noise

    def sample_sigma(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: Device = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Training noise levels sigma(t) with t ~ U(epsilon_t, 1)."""
        t = self.epsilon_t + (1 - self.epsilon_t) * torch.rand(n, generator=generator, device=device, dtype=dtype)
        return schedules.vp_sigma(t, self.beta_d, self.beta_min)

    def weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) = 1 / sigma^2."""
        return sigma**-2


@dataclass(frozen=True)
class VE:
    """VE preconditioning (Table 1, "VE" column): c_noise = ln(sigma / 2), log-uniform training sigma."""

    sigma_min: float = 0.02
    sigma_max: float = 100.0

    def scalings(self, sigma: Tensor) -> Scalings:
        """(c_skip, c_out, c_in, c_noise) at noise levels sigma [B]."""
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise

    def sample_sigma(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: Device = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Training noise levels: ln(sigma) ~ U(ln sigma_min, ln sigma_max)."""
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return (lo + (hi - lo) * torch.rand(n, generator=generator, device=device, dtype=dtype)).exp()

    def weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) = 1 / sigma^2."""
        return sigma**-2


class DDPM:
    """A discrete-time epsilon/x0/v network as a denoiser: sigma snaps to the nearest trained timestep t."""

    def __init__(self, alphas_cumprod: Tensor, prediction: str = "epsilon") -> None:
        self.prediction = predictions.check(prediction)
        self.alpha_bar = alphas_cumprod.to(torch.float64)
        self.log_sigmas = schedules.sigma(self.alpha_bar).log()

    def timestep(self, sigma: Tensor) -> Tensor:
        """Trained timestep t [B] (LongTensor) whose sigma_t is nearest to sigma in log space."""
        log_sigma = sigma.to(self.log_sigmas.device, torch.float64).log()
        i = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        below = log_sigma - self.log_sigmas[i - 1] < self.log_sigmas[i] - log_sigma
        return torch.where(below, i - 1, i)

    def snap(self, sigmas: Tensor) -> Tensor:
        """A schedule ending with 0 moved onto trained sigmas: each snapped, repeats merged, the final 0 kept."""
        trained = schedules.sigma(self.alpha_bar)
        snapped = torch.unique_consecutive(trained[self.timestep(sigmas[:-1])])
        return torch.cat([snapped, snapped.new_zeros(1)])

    def scalings(self, sigma: Tensor) -> Scalings:
        """(c_skip, c_out, c_in, c_noise = t) of the snapped alpha_bar_t for the configured prediction."""
        t = self.timestep(sigma)
        a = self.alpha_bar[t]
        c_in = a.sqrt()
        if self.prediction == "epsilon":  # x0 = x - sigma eps
            c_skip, c_out = torch.ones_like(a), -schedules.sigma(a)
        elif self.prediction == "x0":
            c_skip, c_out = torch.zeros_like(a), torch.ones_like(a)
        else:  # x0 = sqrt(a) x_t - sqrt(1 - a) v, with x_t = sqrt(a) x
            c_skip, c_out = a, -(1 - a).sqrt()
        dtype = sigma.dtype
        return c_skip.to(dtype), c_out.to(dtype), c_in.to(dtype), t


class Denoiser(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise[, y]) of a network F under a preconditioning."""

    def __init__(self, net: Callable[..., Tensor], preconditioning: EDM | VP | VE | DDPM) -> None:
        super().__init__()
        self.net = net
        self.preconditioning = preconditioning

    def forward(self, x: Tensor, sigma: Tensor, y: Tensor | None = None) -> Tensor:
        """Denoised estimate of x [B, ...] at noise levels sigma [B] (class labels y [B] if conditional)."""
        c_skip, c_out, c_in, c_noise = self.preconditioning.scalings(sigma)
        shape = (-1, *[1] * (x.ndim - 1))
        args = () if y is None else (y,)
        return c_skip.reshape(shape) * x + c_out.reshape(shape) * self.net(c_in.reshape(shape) * x, c_noise, *args)


PRECONDITIONINGS: dict[str, type] = {"edm": EDM, "vp": VP, "ve": VE}


def for_config(config: DDPMConfig, alphas_cumprod: Tensor | None = None) -> EDM | VP | VE | DDPM:
    """The preconditioning a DDPMConfig names; for ddpm, the sigma view of ``alphas_cumprod`` (default: the
    config's schedule)."""
    if config.preconditioning == "ddpm":
        table = schedules.alphas_cumprod(config.schedule, config.T) if alphas_cumprod is None else alphas_cumprod
        return DDPM(table, config.prediction)
    if config.preconditioning == "edm":
        return EDM(config.sigma_data, config.P_mean, config.P_std)
    if config.preconditioning == "vp":
        return VP(config.beta_d, config.beta_min, config.epsilon_t)
    return VE(config.sigma_min, config.sigma_max)
