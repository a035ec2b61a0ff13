"""Exact denoisers for Gaussian data x0 ~ N(mu, s^2), used as closed-form test oracles."""

from __future__ import annotations

import torch
from torch import Tensor

from ddpm.noise import SampleNoise


class GaussianOracle:
    """Closed-form E[eps | x_t], E[x0 | x_t] and v for data N(mu, s^2) under alphas_cumprod."""

    def __init__(self, alphas_cumprod: Tensor, mu: float, s: float) -> None:
        self.ab, self.mu, self.s = alphas_cumprod.double(), mu, s

    def _ab(self, x: Tensor, t: Tensor) -> Tensor:
        return self.ab.to(x.device)[t].to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        a = self._ab(x, t)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)

    def x0(self, x: Tensor, t: Tensor) -> Tensor:
        a = self._ab(x, t)
        return self.mu + a.sqrt() * self.s**2 * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)

    def v(self, x: Tensor, t: Tensor) -> Tensor:
        a = self._ab(x, t)
        return a.sqrt() * self.eps(x, t) - (1 - a).sqrt() * self.x0(x, t)

    def model_fn(self, prediction: str):
        return {"epsilon": self.eps, "x0": self.x0, "v": self.v}[prediction]


def normal(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """n standard normal scalars shaped [n, 1]."""
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def edm_denoiser(mu: float, s: float):
    """Exact D(x; sigma) = mu + (x - mu) s^2 / (s^2 + sigma^2) for data N(mu, s^2); sigma is a Tensor [B]."""

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        s2 = sigma.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1)) ** 2
        return mu + (x - mu) * s**2 / (s**2 + s2)

    return denoiser


class ImpulseNoise(SampleNoise):
    """Noise draw k is 1 in row ``first + k`` and 0 elsewhere.

    For an affine sampler (an exact Gaussian denoiser makes every step affine), one run on rows
    [0, 1, 0, 0, ...] gives the map x_T -> x_0 (rows 0 and 1) and the gain of every noise draw
    (row first + k), hence the exact output mean and variance; see ``exact_moments``.
    """

    def __init__(self, first: int = 2) -> None:
        super().__init__(0)
        self.first = first

    def randn_like(self, x: Tensor) -> Tensor:
        z = torch.zeros_like(x)
        if self.first + self.draws < len(x):
            z[self.first + self.draws] = 1
        self.draws += 1
        return z


def exact_moments(sampler, denoiser, sigmas: Tensor, **kw) -> tuple[float, float]:
    """Exact mean and std of ``sampler`` output for scalar x = sigmas[0] * N(0, 1), at most len(sigmas) draws."""
    n_draws = len(sigmas)
    x = torch.zeros(2 + n_draws + 1, 1, dtype=torch.float64)
    x[1] = 1.0
    noise = ImpulseNoise()
    out = sampler(denoiser, x, sigmas, generator=noise, **kw)[:, 0]
    assert noise.draws <= n_draws
    b = out[0].item()
    slope, gains = out[1].item() - b, out[2:] - b
    return b, (slope**2 * sigmas[0].item() ** 2 + (gains**2).sum().item()) ** 0.5


class GaussianPair:
    """Two correlated pixels x0 ~ N(mu, cov), stored in the last dimension of x: the exact denoiser
    D(x; sigma) = mu + cov (cov + sigma^2 I)^-1 (x - mu), the exact E[eps | x_t] under ``alphas_cumprod``, and
    the exact conditional N(mean, std^2) of pixel 1 given pixel 0."""

    def __init__(self, mu: tuple[float, float], cov: list[list[float]], alphas_cumprod: Tensor) -> None:
        self.mu, self.cov = torch.tensor(mu, dtype=torch.float64), torch.tensor(cov, dtype=torch.float64)
        self.ab = alphas_cumprod.double()

    def denoiser(self, x: Tensor, sigma: Tensor) -> Tensor:
        """In the eigenbasis cov = Q diag(lam) Q^T: mu + Q diag(lam / (lam + sigma^2)) Q^T (x - mu)."""
        lam, q = torch.linalg.eigh(self.cov.to(x))
        s2 = sigma.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1)) ** 2
        mu = self.mu.to(x)
        return mu + (lam / (lam + s2) * ((x - mu) @ q)) @ q.T

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        """E[eps | x_t] for x_t = sqrt(ab) x0 + sqrt(1 - ab) eps: the denoiser at sigma^2 = (1 - ab) / ab."""
        ab = self.ab.to(x.device)[t].to(x.dtype)
        a = ab.reshape(-1, *[1] * (x.ndim - 1))
        x0 = self.denoiser(x / a.sqrt(), ((1 - ab) / ab).sqrt())
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    def conditional(self, known: float) -> tuple[float, float]:
        """Mean and std of pixel 1 given pixel 0 = known."""
        (c00, c01), (_, c11) = self.cov.tolist()
        mu0, mu1 = self.mu.tolist()
        return mu1 + c01 / c00 * (known - mu0), (c11 - c01**2 / c00) ** 0.5
