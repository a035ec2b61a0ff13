"""Samplers for discrete-time diffusion models, as pure functions over a network.

ddpm: ancestral sampling of Ho et al. 2020, "Denoising Diffusion Probabilistic Models",
      respaced to fewer steps as in Nichol & Dhariwal 2021 (improved-diffusion).
ddim: the generalized (eta) sampler of Song et al. 2021, "Denoising Diffusion Implicit Models",
      with the timestep spacings of diffusers' DDIMScheduler (steps_offset = 0).

Both are one update, x_prev = sqrt(ab_prev) x0 + c_eps eps + sigma z, applied with a
per-step coefficient table precomputed in float64 from ``alphas_cumprod``. The model sees
the original 0-based training timesteps. ``model_fn(x, t)`` gets ``t`` as a LongTensor [B]
and returns the network output for ``prediction``. After the last step alpha_bar is 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddpm import predictions
from ddpm.noise import SampleNoise, randn_like

ModelFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]
Generator = torch.Generator | SampleNoise | None

SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("beta", "beta_tilde")


def _check_table(alphas_cumprod: Tensor) -> Tensor:
    """Validate an alpha_bar table and return it as float64 on the CPU."""
    if not isinstance(alphas_cumprod, Tensor) or alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 2:
        raise ValueError("alphas_cumprod must be a 1-D tensor [T] with T >= 2")
    ab = alphas_cumprod.detach().to("cpu", torch.float64)
    if not bool(((ab > 0) & (ab < 1)).all()):
        raise ValueError("alphas_cumprod values must lie in (0, 1)")
    return ab


def _check_steps(steps: int, T: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps={steps!r} is invalid; allowed: an integer in [1, {T}]")
    return steps


def ddim_timesteps(T: int, steps: int, spacing: str = "leading") -> Tensor:
    """Descending 0-based timesteps of diffusers' DDIMScheduler for ``spacing`` (steps_offset = 0)."""
    _check_steps(steps, T)
    if spacing == "leading":
        ts = np.arange(steps) * (T // steps)
    elif spacing == "trailing":
        ts = np.round(T - np.arange(steps) * (T / steps)) - 1
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, T - 1, steps))
    else:
        raise ValueError(f"spacing={spacing!r} is unknown; allowed: {', '.join(SPACINGS)}")
    return torch.from_numpy(np.sort(ts.astype(np.int64))[::-1].copy())


def respaced_timesteps(T: int, steps: int) -> Tensor:
    """Descending timesteps evenly strided over [0, T - 1], as improved-diffusion's space_timesteps."""
    _check_steps(steps, T)
    if steps == 1:
        return torch.tensor([T - 1])
    ts = np.round(np.arange(steps) * ((T - 1) / (steps - 1))).astype(np.int64)
    return torch.from_numpy(ts[::-1].copy())


def q_sample(x0: Tensor, t: Tensor, alphas_cumprod: Tensor, noise: Tensor) -> Tensor:
    """Forward noising x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (Ho et al. eq. 4)."""
    if t.shape != x0.shape[:1]:
        raise ValueError(f"t must have shape [B]={list(x0.shape[:1])}, got {list(t.shape)}")
    ab = alphas_cumprod.to(x0.device)[t].to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


@dataclass(frozen=True)
class _Plan:
    """Per-step coefficients of x_prev = sqrt(ab_prev) x0 + c_eps eps + sigma z (float64, CPU)."""

    t: list[int]
    ab_t: Tensor
    ab_prev: Tensor
    c_eps: Tensor
    sigma: Tensor

    @classmethod
    def build(cls, ab: Tensor, t: Tensor, eta: float) -> _Plan:
        """DDIM coefficients for descending timesteps ``t``: sigma = eta * sqrt(beta_tilde)."""
        ab_t = ab[t]
        ab_prev = torch.cat([ab_t[1:], ab_t.new_ones(1)])
        beta_tilde = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
        sigma_eta = eta * beta_tilde.sqrt()
        c_eps = (1 - ab_prev - sigma_eta**2).clamp(min=0).sqrt()
        return cls(t.tolist(), ab_t, ab_prev, c_eps, sigma_eta)


def _check_x(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim < 2 or not x.is_floating_point():
        raise ValueError("x must be a floating tensor [B, ...] with a batch dimension")


def _run(
    model_fn: ModelFn,
    x: Tensor,
    plan: _Plan,
    prediction: str,
    clip: bool,
    generator: Generator,
    callback: Callback | None,
) -> Tensor:
    """Apply the planned reverse steps to x_T."""
    predictions.check(prediction)
    sigmas = plan.sigma.tolist()
    batch = x.shape[0]
    for i, t in enumerate(plan.t):
        t_batch = torch.full((batch,), t, device=x.device, dtype=torch.long)
        ab_t = plan.ab_t[i]
        x0, eps = predictions.to_x0_eps(prediction, model_fn(x, t_batch), x, ab_t)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = predictions.eps_from_x0(x0, x, ab_t)
        x = plan.ab_prev[i].sqrt() * x0 + plan.c_eps[i] * eps
        if sigmas[i] > 0:
            x = x + sigmas[i] * randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


def ddim(
    model_fn: ModelFn,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "leading",
    prediction: str = "epsilon",
    clip: bool = False,
    generator: Generator = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM (Song et al. eq. 12): eta = 0 is deterministic, eta = 1 is the generalized DDPM."""
    _check_x(x_T)
    ab = _check_table(alphas_cumprod)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta!r} is invalid; allowed: a number in [0, 1]")
    plan = _Plan.build(ab, ddim_timesteps(len(ab), steps, spacing), eta)
    return _run(model_fn, x_T, plan, prediction, clip, generator, callback)


def ddpm(
    model_fn: ModelFn,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    *,
    steps: int | None = None,
    variance: str = "beta_tilde",
    prediction: str = "epsilon",
    clip: bool = False,
    generator: Generator = None,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral DDPM (Ho et al. Algorithm 2) with sigma^2 = beta or beta_tilde, respaced when steps < T."""
    _check_x(x_T)
    ab = _check_table(alphas_cumprod)
    if variance not in VARIANCES:
        raise ValueError(f"variance={variance!r} is unknown; allowed: {', '.join(VARIANCES)}")
    t = respaced_timesteps(len(ab), len(ab) if steps is None else steps)
    plan = _Plan.build(ab, t, eta=1.0)  # the posterior mean; sigma = sqrt(beta_tilde)
    if variance == "beta":
        beta = 1 - plan.ab_t / plan.ab_prev
        plan = replace(plan, sigma=beta.sqrt() * (plan.ab_prev < 1))
    return _run(model_fn, x_T, plan, prediction, clip, generator, callback)


def ddim_invert(
    model_fn: ModelFn,
    x_0: Tensor,
    alphas_cumprod: Tensor,
    *,
    steps: int = 50,
    spacing: str = "leading",
    prediction: str = "epsilon",
    callback: Callback | None = None,
) -> Tensor:
    """Deterministic DDIM inversion x_0 -> x_T: the eta = 0 update run forward in time."""
    _check_x(x_0)
    ab = _check_table(alphas_cumprod)
    ts = ddim_timesteps(len(ab), steps, spacing).flip(0)
    ab_to = ab[ts]
    ab_from = torch.cat([ab_to.new_ones(1), ab_to[:-1]])
    x, batch = x_0, x_0.shape[0]
    for i, t in enumerate(ts.tolist()):
        out = model_fn(x, torch.full((batch,), t, device=x.device, dtype=torch.long))
        _, eps = predictions.to_x0_eps(prediction, out, x, ab_to[i])
        x0 = (x - (1 - ab_from[i]).sqrt() * eps) / ab_from[i].sqrt()
        x = ab_to[i].sqrt() * x0 + (1 - ab_to[i]).sqrt() * eps
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddim": ddim, "ddpm": ddpm}
