"""Conditioning a sampler: classifier-free guidance, and inpainting with RePaint resampling.

Guidance: Ho & Salimans 2022, "Classifier-Free Diffusion Guidance": with scale w the model is
uncond + w (cond - uncond), so w = 1 is the conditional model and w = 0 the unconditional one.
The combination is affine in the network output, so it is the same on D(x; sigma), eps, x0 or v.

Inpainting: Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic Models".
The known pixels of the denoised estimate are replaced by the known image, so at every noise level the
known region of x is the known image plus noise of that level, and the output equals it there. RePaint
resampling walks the noise levels down, and every ``jump_length`` levels (counted from the clean end)
jumps back up ``jump_length`` levels by forward noising, ``resample - 1`` times, so that the generated
region harmonises with the known one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ddpm import predictions
from ddpm.noise import SampleNoise, randn_like

Fn = Callable[[Tensor, Tensor], Tensor]


def classifier_free(fn: Callable[..., Tensor], y: Tensor | None, guidance: float, null: int) -> Fn:
    """fn(x, s, y) guided with scale w: fn(x, s, null) + w (fn(x, s, y) - fn(x, s, null)), in one batched call."""
    if y is None:
        return lambda x, s: fn(x, s)
    if guidance == 1:
        return lambda x, s: fn(x, s, y)
    y_null = torch.full_like(y, null)
    if guidance == 0:
        return lambda x, s: fn(x, s, y_null)

    def guided(x: Tensor, s: Tensor) -> Tensor:
        uncond, cond = fn(torch.cat([x, x]), torch.cat([s, s]), torch.cat([y_null, y])).chunk(2)
        return uncond + guidance * (cond - uncond)

    return guided


def masked_denoiser(denoiser: Fn, known: Tensor, mask: Tensor) -> Fn:
    """D(x; sigma) with the known pixels (mask True) set to the known image."""
    return lambda x, sigma: torch.where(mask, known, denoiser(x, sigma))


def masked_model_fn(model_fn: Fn, known: Tensor, mask: Tensor, alphas_cumprod: Tensor, prediction: str) -> Fn:
    """A timestep model whose implied x0 has the known pixels (mask True) set to the known image."""
    predictions.check(prediction)

    def masked(x: Tensor, t: Tensor) -> Tensor:
        ab = alphas_cumprod[t].to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        x0, _ = predictions.to_x0_eps(prediction, model_fn(x, t), x, ab)
        x0 = torch.where(mask, known, x0)
        return predictions.target(prediction, x0, predictions.eps_from_x0(x0, x, ab), ab)

    return masked


def repaint_segments(n: int, jump_length: int = 1, resample: int = 1) -> list[tuple[int, int]]:
    """RePaint's path over the levels 0 (noisiest) .. n (clean), as the descending runs (a, b) between jumps."""
    for name, value in (("n", n), ("jump_length", jump_length), ("resample", resample)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= 1")
    jumps_left = {k: resample - 1 for k in range(n - 1, jump_length - 1, -jump_length)}
    segments, start, level = [], 0, 0
    while level < n:
        level += 1
        if jumps_left.get(level, 0) > 0:
            jumps_left[level] -= 1
            segments.append((start, level))
            start = level = level - jump_length
    segments.append((start, n))
    return segments


def renoise(
    x: Tensor, sigma: float, sigma_up: float, generator: torch.Generator | SampleNoise | None, vp: bool = False
) -> Tensor:
    """Forward noising from level sigma up to sigma_up; ``vp`` for states x = x_ve / sqrt(1 + sigma^2) (DDPM)."""
    scale, scale_up = (1 / math.sqrt(1 + sigma**2), 1 / math.sqrt(1 + sigma_up**2)) if vp else (1.0, 1.0)
    return scale_up / scale * x + scale_up * math.sqrt(sigma_up**2 - sigma**2) * randn_like(x, generator)


def repaint(
    run: Callable[[Tensor, int, int], Tensor],
    x: Tensor,
    sigmas: list[float],
    *,
    jump_length: int = 1,
    resample: int = 1,
    generator: torch.Generator | SampleNoise | None = None,
    vp: bool = False,
) -> Tensor:
    """RePaint resampling: ``run(x, a, b)`` samples levels a -> b of ``sigmas``; jumps back up in between."""
    end = None
    for a, b in repaint_segments(len(sigmas) - 1, jump_length, resample):
        if end is not None:
            x = renoise(x, sigmas[end], sigmas[a], generator, vp)
        x, end = run(x, a, b), b
    return x


def clipped(denoiser: Fn) -> Fn:
    """D(x; sigma) clipped to the data range [-1, 1]."""
    return lambda x, sigma: denoiser(x, sigma).clamp(-1, 1)
