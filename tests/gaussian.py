"""Exact denoisers for Gaussian data x0 ~ N(mu, s^2), used as closed-form test oracles."""

from __future__ import annotations

import torch
from torch import Tensor


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
