"""Prediction targets of a diffusion network and the conversions between them.

With x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps, a network may predict
eps (Ho et al. 2020), x_0, or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0
(Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models").
``alpha_bar`` broadcasts against the images (shape [B, 1, 1, 1] or a scalar).
"""

from __future__ import annotations

from torch import Tensor

from ddpm.config.diffusion import PREDICTIONS


def check(prediction: str) -> str:
    """Return ``prediction`` if it is a known target, else raise ValueError listing them."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r} is unknown; allowed: {', '.join(PREDICTIONS)}")
    return prediction


def target(prediction: str, x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """The regression target for ``prediction`` given clean data x0 and noise eps."""
    check(prediction)
    if prediction == "epsilon":
        return eps
    if prediction == "x0":
        return x0
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0


def to_x0_eps(prediction: str, output: Tensor, x_t: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
    """Convert a network output into the pair (x0_hat, eps_hat) consistent with x_t."""
    check(prediction)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction == "epsilon":
        return (x_t - s * output) / a, output
    if prediction == "x0":
        return output, (x_t - a * output) / s
    return a * x_t - s * output, s * x_t + a * output


def eps_from_x0(x0: Tensor, x_t: Tensor, alpha_bar: Tensor) -> Tensor:
    """eps implied by x0 and x_t: (x_t - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar)."""
    return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def convert(output: Tensor, x_t: Tensor, alpha_bar: Tensor, src: str, dst: str) -> Tensor:
    """Re-express a ``src`` prediction as a ``dst`` prediction."""
    x0, eps = to_x0_eps(src, output, x_t, alpha_bar)
    return target(check(dst), x0, eps, alpha_bar)


def q_sample(x0: Tensor, t: Tensor, alphas_cumprod: Tensor, noise: Tensor) -> Tensor:
    """Forward noising x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (Ho et al. eq. 4)."""
    if t.shape != x0.shape[:1]:
        raise ValueError(f"t must have shape [B]={list(x0.shape[:1])}, got {list(t.shape)}")
    ab = alphas_cumprod.to(x0.device)[t].to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise
