"""The power-function EMA of the weights (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2, Sec. 3.1).

After ``t`` updates it averages the weights of updates ``tau <= t`` with a density proportional to
``tau**gamma``, so its length grows with the run. ``sigma_rel``, the standard deviation of that density relative
to ``t``, names the profile whatever the run's length: with ``sigma_rel`` 0.1, a run of 600 or of 60,000 steps
averages weights spread over a tenth of the run, centred a ninth of it before the end. The exponential EMA's
``(1 + n) / (10 + n)`` warmup (decay ``1 - 9 / (10 + n)``) is close to ``gamma = 8``, ``sigma_rel`` 0.09, for as
long as the warmup is below ``ema_decay``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ddpm.config.train import EMA_STD_MAX as STD_MAX  # sigma_rel of gamma = 0, the flat average of the whole run


def gamma_from_std(std: float) -> float:
    """The exponent gamma whose profile has relative standard deviation ``std`` (EDM2, eq. 3).

    ``std**2 = (gamma + 1) / ((gamma + 2)**2 (gamma + 3))``: the largest real root of the cubic
    ``gamma**3 + 7 gamma**2 + (16 - std**-2) gamma + 12 - std**-2``.
    """
    if not 0 < std < STD_MAX:
        raise ValueError(f"ema std (sigma_rel)={std}: allowed 0 < std < {STD_MAX:.4f} (gamma > 0)")
    a = std**-2
    roots = np.roots([1.0, 7.0, 16.0 - a, 12.0 - a])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-6 * max(1.0, abs(r.real))))


def std_from_gamma(gamma: float) -> float:
    """The relative standard deviation of the profile ``tau**gamma`` (EDM2, eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_decay(t: int, gamma: float) -> float:
    """Decay of update ``t`` (1 for the first): ``(1 - 1/t)**(gamma + 1)``; the first update copies the weights."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


@torch.no_grad()
def update(average: nn.Module, net: nn.Module, decay: float) -> None:
    """``average <- decay * average + (1 - decay) * net`` for the parameters; buffers are copied from ``net``."""
    torch._foreach_lerp_(list(average.parameters()), list(net.parameters()), 1.0 - decay)
    for kept, buffer in zip(average.buffers(), net.buffers()):
        kept.copy_(buffer)
