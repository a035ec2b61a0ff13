"""Samplers for diffusion models, as pure functions over a network.

Timestep samplers, over ``model_fn(x, t)`` and an ``alphas_cumprod`` table:

ddpm: ancestral sampling of Ho et al. 2020, "Denoising Diffusion Probabilistic Models",
      respaced to fewer steps as in Nichol & Dhariwal 2021 (improved-diffusion).
ddim: the generalized (eta) sampler of Song et al. 2021, "Denoising Diffusion Implicit Models",
      with the timestep spacings of diffusers' DDIMScheduler (steps_offset = 0).

Both are one update, x_prev = sqrt(ab_prev) x0 + c_eps eps + sigma z, applied with a
per-step coefficient table precomputed in float64 from ``alphas_cumprod``. The model sees
the original 0-based training timesteps. ``model_fn(x, t)`` gets ``t`` as a LongTensor [B]
and returns the network output for ``prediction``. After the last step alpha_bar is 1.

Sigma samplers, over a denoiser ``denoiser(x, sigma) -> D(x; sigma)`` (``sigma`` a Tensor [B]) and a
decreasing noise-level tensor ``sigmas`` [n + 1] (usually ending with 0), starting from
x = sigmas[0] * noise; Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models" (EDM); the noise levels come from :mod:`ddpm.schedules`:
euler:          Euler steps of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (EDM eq. 3).
heun:           EDM Algorithm 1 (2n - 1 denoiser calls: the last step, to sigma = 0, is Euler);
                S_churn > 0 gives the stochastic sampler of EDM Algorithm 2.
euler_maruyama: Euler-Maruyama steps of the reverse-time SDE (EDM eq. 6 with beta(t) = 1 / sigma).
dpmpp_2m:       DPM-Solver++(2M) of Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
                Diffusion Probabilistic Models", Algorithm 2, in lambda = -ln(sigma).
Per-step noise levels are Python floats, so no step synchronises with the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ddpm import predictions
from ddpm.config.diffusion import SPACINGS, VARIANCES
from ddpm.noise import SampleNoise, randn_like

ModelFn = Callable[[Tensor, Tensor], Tensor]
DenoiserFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]
Generator = torch.Generator | SampleNoise | None


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


def _check_span(start: int, stop: int | None, steps: int) -> tuple[int, int]:
    """Validate the step range start .. stop - 1 of a ``steps``-step schedule (stop None: to the end)."""
    stop = steps if stop is None else stop
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, stop)) or not 0 <= start < stop <= steps:
        raise ValueError(f"start={start!r}, stop={stop!r} are invalid; allowed: integers 0 <= start < stop <= {steps}")
    return start, stop


def _run(
    model_fn: ModelFn,
    x: Tensor,
    plan: _Plan,
    prediction: str,
    clip: bool,
    generator: Generator,
    callback: Callback | None,
    start: int = 0,
    stop: int | None = None,
) -> Tensor:
    """Apply the planned reverse steps start .. stop - 1 to x."""
    predictions.check(prediction)
    start, stop = _check_span(start, stop, len(plan.t))
    sigmas = plan.sigma.tolist()
    batch = x.shape[0]
    for i in range(start, stop):
        t = plan.t[i]
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
    start: int = 0,
    stop: int | None = None,
) -> Tensor:
    """DDIM (Song et al. eq. 12): eta = 0 is deterministic, eta = 1 is the generalized DDPM.

    ``start`` and ``stop`` run only steps start .. stop - 1 (a RePaint segment); x_T is then the state at step start.
    """
    _check_x(x_T)
    ab = _check_table(alphas_cumprod)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta!r} is invalid; allowed: a number in [0, 1]")
    plan = _Plan.build(ab, ddim_timesteps(len(ab), steps, spacing), eta)
    return _run(model_fn, x_T, plan, prediction, clip, generator, callback, start, stop)


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
    start: int = 0,
    stop: int | None = None,
) -> Tensor:
    """Ancestral DDPM (Ho et al. Algorithm 2) with sigma^2 = beta or beta_tilde, respaced when steps < T.

    ``start`` and ``stop`` run only steps start .. stop - 1, as in ``ddim``.
    """
    _check_x(x_T)
    ab = _check_table(alphas_cumprod)
    if variance not in VARIANCES:
        raise ValueError(f"variance={variance!r} is unknown; allowed: {', '.join(VARIANCES)}")
    t = respaced_timesteps(len(ab), len(ab) if steps is None else steps)
    plan = _Plan.build(ab, t, eta=1.0)  # the posterior mean; sigma = sqrt(beta_tilde)
    if variance == "beta":
        beta = 1 - plan.ab_t / plan.ab_prev
        plan = replace(plan, sigma=beta.sqrt() * (plan.ab_prev < 1))
    return _run(model_fn, x_T, plan, prediction, clip, generator, callback, start, stop)


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


# ---------------------------------------------------------------- sigma samplers


def _check_sigmas(sigmas: Tensor) -> list[float]:
    """Validate a noise-level schedule and return it as Python floats."""
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("sigmas must be a 1-D tensor [n + 1] with n >= 1")
    s = sigmas.detach().to("cpu", torch.float64)
    if not bool((s[:-1] > s[1:]).all()) or s[-1].item() < 0:
        raise ValueError("sigmas must decrease strictly to a last value >= 0")
    return s.tolist()


def _gammas(sigmas: list[float], S_churn: float, S_tmin: float, S_tmax: float, S_noise: float) -> list[float]:
    """EDM Algorithm 2: gamma_i = min(S_churn / n, sqrt(2) - 1) where S_tmin <= sigma_i <= S_tmax, else 0."""
    if not (S_churn >= 0 and S_tmin >= 0 and S_tmax >= S_tmin and S_noise > 0):
        raise ValueError(
            f"S_churn={S_churn!r}, S_tmin={S_tmin!r}, S_tmax={S_tmax!r}, S_noise={S_noise!r} are invalid; "
            "allowed: S_churn >= 0, 0 <= S_tmin <= S_tmax, S_noise > 0"
        )
    gamma = min(S_churn / (len(sigmas) - 1), math.sqrt(2) - 1)
    return [gamma if S_tmin <= sigma <= S_tmax else 0.0 for sigma in sigmas[:-1]]


def _churn(x: Tensor, sigma: float, gamma: float, S_noise: float, generator: Generator) -> tuple[Tensor, float]:
    """EDM Algorithm 2, lines 5-6: raise the noise level to sigma_hat = (1 + gamma) sigma with fresh noise."""
    if gamma == 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + math.sqrt(sigma_hat**2 - sigma**2) * S_noise * randn_like(x, generator), sigma_hat


def _denoise(denoiser: DenoiserFn, x: Tensor, sigma: float) -> Tensor:
    return denoiser(x, x.new_full((x.shape[0],), sigma))


def _edm_steps(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    second_order: bool,
    S_churn: float,
    S_tmin: float,
    S_tmax: float,
    S_noise: float,
    generator: Generator,
    callback: Callback | None,
) -> Tensor:
    """EDM Algorithm 2: churn, an Euler step, and (if ``second_order``) Heun's correction except to sigma = 0."""
    _check_x(x)
    sigmas_ = _check_sigmas(sigmas)
    gammas = _gammas(sigmas_, S_churn, S_tmin, S_tmax, S_noise)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas_, sigmas_[1:])):
        x_hat, sigma_hat = _churn(x, sigma, gammas[i], S_noise, generator)
        denoised = _denoise(denoiser, x_hat, sigma_hat)
        d = (x_hat - denoised) / sigma_hat
        x = x_hat + (sigma_next - sigma_hat) * d
        if second_order and sigma_next > 0:
            d_next = (x - _denoise(denoiser, x, sigma_next)) / sigma_next
            x = x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        if callback is not None:
            callback({"i": i, "sigma": sigma, "x": x, "x0": denoised})
    return x


def euler(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = math.inf,
    S_noise: float = 1.0,
    generator: Generator = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler steps of the probability-flow ODE (EDM eq. 3), with the churn of EDM Algorithm 2."""
    return _edm_steps(denoiser, x, sigmas, False, S_churn, S_tmin, S_tmax, S_noise, generator, callback)


def heun(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = math.inf,
    S_noise: float = 1.0,
    generator: Generator = None,
    callback: Callback | None = None,
) -> Tensor:
    """EDM Algorithm 2 (Algorithm 1 when S_churn = 0): Heun steps, Euler for the last step to sigma = 0."""
    return _edm_steps(denoiser, x, sigmas, True, S_churn, S_tmin, S_tmax, S_noise, generator, callback)


def euler_maruyama(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generator = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler-Maruyama for dx = -2 sigma score dsigma + sqrt(2 sigma) dw (EDM eq. 6, beta = 1 / sigma); ODE step to 0."""
    _check_x(x)
    sigmas_ = _check_sigmas(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas_, sigmas_[1:])):
        denoised = _denoise(denoiser, x, sigma)
        if sigma_next > 0:
            x = x + 2 * (sigma_next - sigma) / sigma * (x - denoised)
            x = x + math.sqrt(2 * sigma * (sigma - sigma_next)) * randn_like(x, generator)
        else:
            x = denoised
        if callback is not None:
            callback({"i": i, "sigma": sigma, "x": x, "x0": denoised})
    return x


def dpmpp_2m(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generator = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in lambda = -ln(sigma); first-order first and last steps."""
    _check_x(x)
    sigmas_ = _check_sigmas(sigmas)
    previous, h_previous = None, 0.0
    for i, (sigma, sigma_next) in enumerate(zip(sigmas_, sigmas_[1:])):
        denoised = _denoise(denoiser, x, sigma)
        d = denoised
        h = math.log(sigma / sigma_next) if sigma_next > 0 else math.inf
        if previous is not None and sigma_next > 0:
            r = h_previous / h
            d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * previous
        x = sigma_next / sigma * x + (1 - sigma_next / sigma) * d
        previous, h_previous = denoised, h
        if callback is not None:
            callback({"i": i, "sigma": sigma, "x": x, "x0": denoised})
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddim": ddim,
    "ddpm": ddpm,
    "euler": euler,
    "heun": heun,
    "euler_maruyama": euler_maruyama,
    "dpmpp_2m": dpmpp_2m,
}
