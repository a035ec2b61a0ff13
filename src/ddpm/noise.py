"""Per-sample Gaussian noise that depends only on (seed, sample index, draw number).

A sampler draws noise once for x_T and once per stochastic step. Drawing it from one
shared ``torch.Generator`` ties every image to its position in the batch, so changing
the batch size changes the images. :class:`SampleNoise` instead hashes the counter
(seed, sample index, draw, element) through a 32-bit integer mixer (Wellons' lowbias32)
and maps pairs of uniforms to normals with the Box-Muller transform. It is vectorised
over the whole chunk: no Python loop over samples, no host-device synchronisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32 stored in int64, without int64 overflow."""
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (hi + (x & 0xFFFF) * c) & _MASK32


def mix32(x: Tensor) -> Tensor:
    """lowbias32 integer hash of uint32 values held in an int64 tensor."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix_int(v: int) -> int:
    """mix32 of one Python integer (taken mod 2^32)."""
    return int(mix32(torch.tensor(v & _MASK32, dtype=torch.int64)))


class SampleNoise:
    """Noise source whose draws for sample i are the same whatever batch sample i sits in.

    ``SampleNoise(seed, start)`` serves samples ``start, start + 1, ...`` of a run; each call
    to :meth:`randn_like` is the next draw for the rows of ``x``. Pass it as ``generator`` to
    any sampler in :mod:`ddpm.samplers`.
    """

    def __init__(self, seed: int, start: int = 0) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise ValueError(f"seed={seed!r} is invalid; allowed: an integer in [0, 2**64)")
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"start={start!r} is invalid; allowed: an integer >= 0")
        self.seed, self.start, self.draws = seed, start, 0

    def _key(self, n: int, device: torch.device) -> Tensor:
        """Per-sample uint32 keys for rows start .. start + n - 1 at the current draw."""
        lo, hi = self.seed & _MASK32, self.seed >> 32
        base = _mix_int(lo ^ _mix_int(hi ^ _GOLDEN))
        base = _mix_int(base + _GOLDEN * (self.draws + 1))
        rows = torch.arange(self.start, self.start + n, device=device, dtype=torch.int64)
        return mix32(mix32((rows & _MASK32) ^ base) ^ (rows >> 32))

    def randn_like(self, x: Tensor) -> Tensor:
        """Standard normal noise shaped like ``x``; rows are samples start .. start + len(x) - 1."""
        n, per = x.shape[0], math.prod(x.shape[1:])
        half = (per + 1) // 2
        key = self._key(n, x.device)[:, None]
        j = torch.arange(half, device=x.device, dtype=torch.int64)[None, :]
        a = mix32((key + mix32(2 * j)) & _MASK32)
        b = mix32((key ^ mix32(2 * j + 1)) & _MASK32)
        self.draws += 1
        scale = 1.0 / 2**32
        u1 = (a.double() + 1.0) * scale  # (0, 1]
        u2 = b.double() * scale  # [0, 1)
        r = torch.sqrt(-2.0 * torch.log(u1))
        theta = 2.0 * math.pi * u2
        z = torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=1)[:, :per]
        return z.reshape(x.shape).to(x.dtype)


def randn_like(x: Tensor, generator: torch.Generator | SampleNoise | None) -> Tensor:
    """Standard normal noise shaped like ``x`` from a torch generator or a SampleNoise."""
    if isinstance(generator, SampleNoise):
        return generator.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
