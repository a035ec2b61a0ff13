"""Drawing images from a trained network: a sampling plan built once, then drawn in seeded chunks.

:func:`plan` turns a :class:`~ddpm.config.DDPMConfig` and a run's sampler settings into a :class:`Plan`:
the sampler function bound to its options (:mod:`ddpm.samplers`), the noise levels it visits and its
network evaluations per image (NFE). :func:`sample_batches` draws ``n`` images with it, chunk by chunk;
image i depends only on (seed, i) (:class:`~ddpm.noise.SampleNoise`), whatever the chunk size.
Classifier-free guidance and inpainting with RePaint resampling (:mod:`ddpm.conditioning`) wrap the
network only when labels or a mask are given. The sample stage, the sweep, ``make sample`` and the
Python API all draw through here::

    model = export.load_model("outputs/model/model.pt")
    images = generate.sample(model.net, generate.plan(model.config, "heun", 18), 16, seed=0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ddpm import conditioning, preconditioning, samplers, schedules
from ddpm.config import CHURN_SAMPLERS, TIMESTEP_SAMPLERS, ConfigError, DDPMConfig
from ddpm.noise import SampleNoise
from ddpm.preconditioning import Denoiser

Callback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Plan:
    """A sampler bound to its options, the noise levels sigma_0 > ... > sigma_n = 0 it visits, and its NFE.

    ``config`` is the model's config with the run's sampler settings; ``run`` is
    ``f(model_fn, x_T, alphas_cumprod, ...)`` for ddpm and ddim, ``f(denoiser, x, sigmas, ...)`` otherwise.
    """

    config: DDPMConfig
    run: Callable[..., Tensor]
    sigmas: tuple[float, ...]
    nfe: int

    @property
    def steps(self) -> int:
        """Steps the sampler takes (a sigma sampler on a ddpm model may merge snapped steps)."""
        return len(self.sigmas) - 1


def plan(
    config: DDPMConfig,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    guidance: float | None = None,
) -> Plan:
    """The sampling plan of ``config`` with a run's settings (None keeps the config's defaults)."""
    cfg = config.with_sampler(sampler, steps, eta, guidance)
    sigmas = _sigmas(cfg)
    n = len(sigmas) - 1
    calls = 2 * n - 1 if cfg.sampler == "heun" else n  # Heun's last step, to sigma = 0, is an Euler step
    nfe = calls if cfg.guidance in (0.0, 1.0) else 2 * calls  # guidance evaluates with and without the label
    return Plan(cfg, _bind(cfg), tuple(sigmas.tolist()), nfe)


def _sigmas(cfg: DDPMConfig) -> Tensor:
    """The noise levels of cfg's sampler: its timesteps' for ddpm and ddim; for a sigma sampler on a ddpm model,
    the sigma schedule within the trained range, snapped to trained timesteps (repeats merged)."""
    if cfg.sampler in TIMESTEP_SAMPLERS:
        if cfg.sampler == "ddim":
            t = samplers.ddim_timesteps(cfg.T, cfg.steps, cfg.spacing)
        else:
            t = samplers.respaced_timesteps(cfg.T, cfg.steps)
        ab = schedules.alphas_cumprod(cfg.schedule, cfg.T)
        return torch.cat([schedules.sigma(ab[t]), torch.zeros(1, dtype=torch.float64)])
    options = {"karras": {"rho": cfg.rho}, "vp": {"beta_d": cfg.beta_d, "beta_min": cfg.beta_min}}
    make = partial(schedules.SIGMA_SCHEDULES[cfg.sigma_schedule], cfg.steps, **options.get(cfg.sigma_schedule, {}))
    if cfg.preconditioning != "ddpm":
        return make(cfg.sigma_min, cfg.sigma_max)
    precond = preconditioning.for_config(cfg)
    trained = schedules.sigma(precond.alpha_bar)
    sigma_min, sigma_max = max(cfg.sigma_min, trained[0].item()), min(cfg.sigma_max, trained[-1].item())
    if sigma_min >= sigma_max:
        raise ConfigError(
            f"sigma_min={cfg.sigma_min}, sigma_max={cfg.sigma_max} miss the trained range "
            f"[{trained[0].item():.4g}, {trained[-1].item():.4g}] of schedule={cfg.schedule!r}, T={cfg.T}"
        )
    return precond.snap(make(sigma_min, sigma_max))


def _bind(cfg: DDPMConfig) -> Callable[..., Tensor]:
    """cfg's sampler with cfg's options bound."""
    common = {"steps": cfg.steps, "prediction": cfg.prediction, "clip": cfg.clip}
    if cfg.sampler == "ddim":
        return partial(samplers.ddim, **common, eta=cfg.eta, spacing=cfg.spacing)
    if cfg.sampler == "ddpm":
        return partial(samplers.ddpm, **common, variance=cfg.variance)
    if cfg.sampler not in CHURN_SAMPLERS:
        return samplers.SAMPLERS[cfg.sampler]
    S_tmax = math.inf if cfg.S_tmax is None else cfg.S_tmax
    churn = {"S_churn": cfg.S_churn, "S_tmin": cfg.S_tmin, "S_tmax": S_tmax, "S_noise": cfg.S_noise}
    return partial(samplers.SAMPLERS[cfg.sampler], **churn)


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The autocast context of a sampling ``precision`` on ``device``: the network under bf16 for bf16-mixed."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@dataclass(frozen=True)
class _Conditions:
    """What a draw is conditioned on, checked before the first chunk: labels [n], known images and their mask."""

    labels: Tensor | None = None
    known: Tensor | None = None
    mask: Tensor | None = None
    jump_length: int = 1
    resample: int = 1


def sample_batches(
    net: nn.Module,
    plan: Plan,
    n: int,
    *,
    seed: int = 0,
    batch_size: int | None = None,
    labels: int | Tensor | None = None,
    known: Tensor | None = None,
    mask: Tensor | None = None,
    jump_length: int = 1,
    resample: int = 1,
    callback: Callback | None = None,
) -> Iterator[Tensor]:
    """Iterate over ``n`` images [chunk, C, H, W] (about [-1, 1]) drawn by ``net`` in CPU chunks of ``batch_size``.

    Arguments are checked at the call. ``labels`` (one class, or one per image) draws those classes from a
    class-conditional net with the plan's classifier-free guidance (1: the conditional model); without labels
    a conditional net draws from its null class. ``known`` [n or 1, C, H, W] and ``mask`` (True or 1 where
    known, broadcastable the same way) inpaint: the output equals ``known`` there. ``jump_length`` and
    ``resample`` add RePaint resampling. ``callback`` gets the sampler's per-step dict plus ``start``, the
    chunk's first image index. The net runs in eval and inference mode while the iteration runs.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} is invalid; allowed: an integer >= 1")
    batch_size = n if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid; allowed: an integer >= 1")
    conditioning.repaint_segments(plan.steps, jump_length, resample)  # checks both now
    cond = _Conditions(
        _check_labels(net, plan, labels, n), *_check_inpainting(plan.config, known, mask, n), jump_length, resample
    )
    SampleNoise(seed)  # validates the seed now rather than at the first chunk
    return _chunks(net, plan, cond, n, seed, batch_size, callback)


def sample(net: nn.Module, plan: Plan, n: int, **kwargs: Any) -> Tensor:
    """``n`` images [n, C, H, W] (about [-1, 1]) drawn by ``net``; the arguments of :func:`sample_batches`."""
    return torch.cat(list(sample_batches(net, plan, n, **kwargs)))


def _num_classes(net: nn.Module) -> int | None:
    return getattr(getattr(net, "config", None), "num_classes", None)


def _check_labels(net: nn.Module, plan: Plan, labels: int | Tensor | None, n: int) -> Tensor | None:
    """Labels [n] (LongTensor) of the images to draw, or None for the null class."""
    num_classes = _num_classes(net)
    if labels is None:
        if plan.config.guidance != 1:
            raise ValueError(f"guidance={plan.config.guidance!r} needs labels (the classes to draw)")
        return None
    if num_classes is None:
        raise ValueError("labels need a class-conditional net (num_classes)")
    y = torch.as_tensor(labels)
    y = y.expand(n) if y.ndim == 0 else y
    if (
        y.dtype.is_floating_point
        or y.dtype == torch.bool
        or y.shape != (n,)
        or not bool(((y >= 0) & (y < num_classes)).all())
    ):
        raise ValueError(f"labels={labels!r} are invalid; allowed: one or {n} integers in [0, {num_classes})")
    return y.long()


def _check_inpainting(config: DDPMConfig, known: Tensor | None, mask: Tensor | None, n: int) -> tuple[Tensor, ...]:
    """The known images and the boolean mask of known pixels (True = known), or (None, None)."""
    if known is None and mask is None:
        return None, None
    shape = (config.channels, config.image_size, config.image_size)
    for name, x, full in (("known", known, shape), ("mask", mask, (1, *shape[1:]))):
        if (
            not isinstance(x, Tensor)
            or x.ndim != 4
            or x.shape[0] not in (1, n)
            or any(d not in (f, g) for d, f, g in zip(x.shape[1:], full, shape))
        ):
            got = list(x.shape) if isinstance(x, Tensor) else x
            raise ValueError(
                f"{name}={got!r} is invalid; allowed: a tensor [{n} or 1, {full[0]}, {shape[1]}, {shape[2]}]"
            )
    return known.float(), mask != 0


def _rows(x: Tensor, rows: slice) -> Tensor:
    """The rows of a per-image tensor [n, ...], or the tensor itself if it has one row shared by all."""
    return x if len(x) == 1 else x[rows]


def _chunks(
    net: nn.Module, plan: Plan, cond: _Conditions, n: int, seed: int, batch_size: int, callback: Callback | None
) -> Iterator[Tensor]:
    """The chunks of :func:`sample_batches`, drawn with ``net`` in eval and inference mode."""
    cfg = plan.config
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            noise = SampleNoise(seed, start)
            z = noise.randn_like(torch.empty(rows.stop - start, *shape, device=device))
            at = None if callback is None else (lambda info, s=start: callback({**info, "start": s}))
            with torch.inference_mode():
                x_0 = _draw(net, plan, cond, z, rows, noise, at)
            yield x_0.to("cpu", copy=True)  # a normal tensor (the callers may modify it), not an inference one
    finally:
        net.train(was_training)


def _draw(
    net: nn.Module, plan: Plan, cond: _Conditions, z: Tensor, rows: slice, noise: SampleNoise, callback: Callback | None
) -> Tensor:
    """One chunk from noise z: the planned sampler on ``net``, guided and inpainted only where asked."""
    cfg, sigmas = plan.config, plan.sigmas
    y = None if cond.labels is None else _rows(cond.labels, rows).to(z.device)
    known = mask = None
    if cond.known is not None:
        known, mask = _rows(cond.known, rows).to(z), _rows(cond.mask, rows).to(z.device)
    ab = schedules.alphas_cumprod(cfg.schedule, cfg.T).to(z.device)
    if cfg.sampler in TIMESTEP_SAMPLERS:
        model_fn = net if y is None else conditioning.classifier_free(net, y, cfg.guidance, _num_classes(net))
        if known is not None:
            model_fn = conditioning.masked_model_fn(model_fn, known, mask, ab, cfg.prediction)

        def segment(x: Tensor, a: int, b: int) -> Tensor:
            return plan.run(model_fn, x, ab, generator=noise, callback=callback, start=a, stop=b)

        x, vp = z, True
    else:
        denoiser = Denoiser(net, preconditioning.for_config(cfg, ab))
        if y is not None:
            denoiser = conditioning.classifier_free(denoiser, y, cfg.guidance, _num_classes(net))
        if cfg.clip:
            denoiser = conditioning.clipped(denoiser)
        if known is not None:
            denoiser = conditioning.masked_denoiser(denoiser, known, mask)
        levels = torch.tensor(sigmas, dtype=torch.float64)
        churn = cfg.sampler in CHURN_SAMPLERS

        def segment(x: Tensor, a: int, b: int) -> Tensor:
            # a segment's S_churn keeps gamma_i = S_churn / n of the whole n-step schedule
            options = {"S_churn": cfg.S_churn * (b - a) / plan.steps} if churn else {}
            at = None if callback is None else (lambda info: callback({**info, "i": info["i"] + a}))
            return plan.run(denoiser, x, levels[a : b + 1], generator=noise, callback=at, **options)

        x, vp = sigmas[0] * z, False
    if cond.resample == 1:
        x = segment(x, 0, plan.steps)
    else:
        x = conditioning.repaint(
            segment, x, list(sigmas), jump_length=cond.jump_length, resample=cond.resample, generator=noise, vp=vp
        )
    return x if known is None else torch.where(mask, known, x)
