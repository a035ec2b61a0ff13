"""Noise schedules: the cumulative signal level alpha_bar of a discrete diffusion.

linear: Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (beta_1=1e-4 .. beta_T=0.02).
cosine: Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models".
exp: the exponential (VP-SDE-style) form alpha_bar(s) = exp(-(beta_d s^2 + beta_0) / 2), s = (t+1)/T.
sigmoid: Jabri et al. 2022 / Chen 2023, "On the Importance of Noise Scheduling for Diffusion Models".
vp_sigma: the VP-SDE noise level sigma(t) of Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations", as written in Karras et al. 2022 (EDM), Table 1.

The noise levels the sigma samplers visit, sigma_0 > ... > sigma_{n-1} then 0 (Karras et al. 2022, section 3
and Table 1): karras (eq. 5, rho), exponential (geometric; VE), vp (uniform in the VP-SDE's t).

Element ``t`` (0-based) of ``alphas_cumprod(name, T)`` is alpha_bar after t + 1 noising steps.
All schedules are float64 and computed without Python loops over T.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor

MAX_BETA = 0.999


def _grid(T: int) -> Tensor:
    """Normalised times s_t = t / T for t = 0..T (float64)."""
    return torch.arange(T + 1, dtype=torch.float64) / T


def _from_alpha_bar_fn(f: Callable[[Tensor], Tensor], T: int, max_beta: float) -> Tensor:
    """Discretise a continuous alpha_bar(s) via betas clipped at max_beta (Nichol & Dhariwal eq. 17)."""
    a = f(_grid(T))
    betas = (1.0 - a[1:] / a[:-1]).clamp(0.0, max_beta)
    return torch.cumprod(1.0 - betas, dim=0)


def linear(T: int, beta_start: float = 1e-4, beta_end: float = 0.02, max_beta: float = MAX_BETA) -> Tensor:
    """Ho et al. linear betas; values are given for T = 1000 and scaled by 1000 / T for other T."""
    scale = 1000.0 / T
    betas = torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64).clamp(max=max_beta)
    return torch.cumprod(1.0 - betas, dim=0)


def cosine(T: int, s: float = 0.008, max_beta: float = MAX_BETA) -> Tensor:
    """Nichol & Dhariwal cosine schedule, alpha_bar(s) = cos^2((s + s0) / (1 + s0) * pi / 2)."""
    return _from_alpha_bar_fn(lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2, T, max_beta)


def exp(T: int, beta_d: float = 19.9, beta_0: float = 1e-4) -> Tensor:
    """Exponential schedule alpha_bar(s) = exp(-0.5 (beta_d s^2 + beta_0)) at s = (t + 1) / T."""
    s = _grid(T)[1:]
    return torch.exp(-0.5 * (beta_d * s**2 + beta_0))


def sigmoid(T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = MAX_BETA) -> Tensor:
    """Sigmoid schedule: alpha_bar(s) falls as 1 - sigmoid((s (end - start) + start) / tau), rescaled to [0, 1]."""
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))

    def f(u: Tensor) -> Tensor:
        return (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)

    return _from_alpha_bar_fn(f, T, max_beta)


SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "linear": linear,
    "cosine": cosine,
    "exp": exp,
    "sigmoid": sigmoid,
}


def alphas_cumprod(name: str, T: int = 1000, **kw: float) -> Tensor:
    """alpha_bar_t for t = 0..T-1 of the named schedule, as a float64 tensor [T]."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is unknown; allowed: {', '.join(SCHEDULES)}")
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        raise ValueError(f"T={T!r} is invalid; allowed: an integer >= 2")
    fn = SCHEDULES[name]
    allowed = [p for p in inspect.signature(fn).parameters if p != "T"]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ValueError(f"schedule {name!r} got unknown options {unknown}; allowed: {', '.join(allowed)}")
    return fn(T, **kw)


def betas(alpha_bar: Tensor) -> Tensor:
    """Per-step betas recovered from alpha_bar: beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}."""
    prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return 1.0 - alpha_bar / prev


def snr(alpha_bar: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar)."""
    return alpha_bar / (1.0 - alpha_bar)


def sigma(alpha_bar: Tensor) -> Tensor:
    """Noise level of the variance-exploding view x / sqrt(alpha_bar): sigma = sqrt((1 - alpha_bar) / alpha_bar)."""
    return ((1.0 - alpha_bar) / alpha_bar).sqrt()


def vp_sigma(t: Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    """VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM Table 1)."""
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


def vp_sigma_inv(sigma: Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    """Inverse of ``vp_sigma``: t = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d."""
    return ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d


# ------------------------------------------ noise levels of the sigma samplers (EDM section 3, Table 1)


def _check_schedule(n: int, sigma_min: float, sigma_max: float) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} is invalid; allowed: an integer >= 1")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(
            f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r} are invalid; allowed: 0 < sigma_min < sigma_max"
        )


def _ramp(n: int) -> Tensor:
    """i / (n - 1) for i = 0 .. n - 1 (float64; [0] when n = 1)."""
    return torch.linspace(0.0, 1.0, n, dtype=torch.float64)


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """EDM eq. 5: (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0: [n + 1]."""
    _check_schedule(n, sigma_min, sigma_max)
    if not rho > 0:
        raise ValueError(f"rho={rho!r} is invalid; allowed: a number > 0")
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((hi + _ramp(n) * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Tensor:
    """Geometric sigmas from sigma_max to sigma_min, then 0: [n + 1] (EDM's VE discretisation, Table 1)."""
    _check_schedule(n, sigma_min, sigma_max)
    hi, lo = math.log(sigma_max), math.log(sigma_min)
    return _append_zero(torch.exp(hi + _ramp(n) * (lo - hi)))


def vp_sigmas(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, beta_d: float = 19.9, beta_min: float = 0.1
) -> Tensor:
    """EDM Table 1 VP discretisation: sigma(t) at t uniform from t(sigma_max) to t(sigma_min), then 0: [n + 1]."""
    _check_schedule(n, sigma_min, sigma_max)
    t_hi, t_lo = vp_sigma_inv(torch.tensor([sigma_max, sigma_min], dtype=torch.float64), beta_d, beta_min)
    return _append_zero(vp_sigma(t_hi + _ramp(n) * (t_lo - t_hi), beta_d, beta_min))


SIGMA_SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
    "vp": vp_sigmas,
    "ve": exponential_sigmas,  # VE: t_i geometric in sigma^2 = t, hence geometric in sigma
}
