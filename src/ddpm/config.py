"""Typed, validated configuration: ``DDPMConfig`` (family, schedule, loss, sampler), optimizer and EMA.

Every config is a frozen pydantic model that round-trips through a plain dict (a
``params.yaml`` section). An invalid field raises :class:`ConfigError`, one line naming
the field, the value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from functools import partial
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from ddpm import losses, preconditioning, predictions, samplers, schedules

# Name used in error messages while ``Config.from_dict`` validates a section (e.g. "train").
_ERROR_PREFIX: ContextVar[str | None] = ContextVar("config_error_prefix", default=None)


class ConfigError(ValueError):
    """An invalid configuration value; the message is one line."""


def _where(error: Mapping[str, Any], prefix: str) -> str:
    """The dotted name of the key a pydantic error is about ('prefix.field'), or ``prefix``."""
    loc = ".".join(str(p) if isinstance(p, int) or str(p).isidentifier() else short_repr(p) for p in error["loc"])
    return f"{prefix}.{loc}" if loc else prefix


def _describe(error: Mapping[str, Any], model: type[BaseModel], prefix: str) -> str:
    """One clause for one pydantic error: 'prefix.field=value: what is allowed'."""
    where = _where(error, prefix)
    loc = where != prefix
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key; allowed keys: {', '.join(model.model_fields)}"
    msg = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}={short_repr(error['input'])}: {msg}" if loc else f"{where}: {msg}"


def short_repr(value: Any, limit: int = 80) -> str:
    """repr of ``value``, cut to ``limit`` characters (error messages stay one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Config(BaseModel):
    """Base of all configs: frozen, no unknown keys, one-line errors, dict round-trip."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise self.error(e, _ERROR_PREFIX.get() or type(self).__name__) from None

    @classmethod
    def error(cls, e: ValidationError, prefix: str) -> ConfigError:
        """Turn a pydantic ValidationError into a one-line ConfigError (unknown keys in one clause)."""
        errors = e.errors()
        unknown = [err for err in errors if err["type"] == "extra_forbidden"]
        clauses = [_describe(err, cls, prefix) for err in errors if err["type"] != "extra_forbidden"]
        if len(unknown) == 1:
            clauses.append(_describe(unknown[0], cls, prefix))
        elif unknown:
            keys = ", ".join(_where(err, prefix) for err in unknown)
            clauses.append(f"{keys}: unknown keys; allowed keys: {', '.join(cls.model_fields)}")
        return ConfigError("; ".join(clauses))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, prefix: str | None = None):
        """Validate a plain mapping (a params.yaml section); ``prefix`` names it in errors."""
        prefix = prefix or cls.__name__
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{prefix}={short_repr(data)}: expected a mapping of keys to values")
        bad_keys = [k for k in data if not isinstance(k, str)]
        if bad_keys:
            raise ConfigError(f"{prefix}: keys must be names, got {short_repr(bad_keys)}")
        token = _ERROR_PREFIX.set(prefix)
        try:
            return cls(**data)
        finally:
            _ERROR_PREFIX.reset(token)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-compatible dict that ``from_dict`` accepts."""
        return self.model_dump(mode="json")


ScheduleName = Literal[tuple(schedules.SCHEDULES)]  # type: ignore[valid-type]
PredictionName = Literal[predictions.PREDICTIONS]  # type: ignore[valid-type]
LossName = Literal[tuple(losses.ELEMENTWISE)]  # type: ignore[valid-type]
WeightingName = Literal[losses.WEIGHTINGS]  # type: ignore[valid-type]
SamplerName = Literal[tuple(samplers.SAMPLERS)]  # type: ignore[valid-type]
SpacingName = Literal[samplers.SPACINGS]  # type: ignore[valid-type]
VarianceName = Literal[samplers.VARIANCES]  # type: ignore[valid-type]
PreconditioningName = Literal[("ddpm", *preconditioning.PRECONDITIONINGS)]  # type: ignore[valid-type]
SigmaScheduleName = Literal[tuple(samplers.SIGMA_SCHEDULES)]  # type: ignore[valid-type]


class DDPMConfig(Config):
    """Model family, noise schedule, training loss and default sampler of a diffusion model.

    ``preconditioning='ddpm'`` is a discrete-time model (``schedule``, ``T``, ``prediction``, ``weighting``);
    ``edm``, ``vp`` and ``ve`` are the continuous families of Karras et al. 2022, Table 1, each with its own
    training noise distribution and loss weighting. Every family samples with the sigma samplers (a ddpm
    model through sigma = sqrt((1 - alpha_bar) / alpha_bar), snapped to its timesteps); ddpm and ddim
    need a ddpm model.
    """

    image_size: int = Field(28, ge=1, description="image height and width in pixels")
    channels: int = Field(1, ge=1, description="image channels (1 grey, 3 RGB)")
    schedule: ScheduleName = Field("linear", description="noise schedule of alpha_bar")
    T: int = Field(1000, ge=2, le=1_000_000, description="number of training timesteps")
    prediction: PredictionName = Field("epsilon", description="what the network predicts")
    loss: LossName = Field("mse", description="elementwise loss")
    huber_delta: float = Field(1.0, gt=0, description="delta of the huber loss")
    weighting: WeightingName = Field("uniform", description="timestep weighting of the loss")
    snr_gamma: float = Field(5.0, gt=0, description="gamma of min-SNR-gamma weighting")
    sampler: SamplerName = Field("ddim", description="default sampler")
    steps: int = Field(50, ge=1, description="default number of sampling steps (<= T)")
    eta: float = Field(0.0, ge=0, le=1, description="DDIM stochasticity (0 deterministic, 1 DDPM-like)")
    spacing: SpacingName = Field("leading", description="DDIM timestep spacing")
    variance: VarianceName = Field("beta_tilde", description="DDPM reverse variance")
    clip: bool = Field(True, description="clip the predicted x0 to [-1, 1] while sampling")
    preconditioning: PreconditioningName = Field("ddpm", description="model family: ddpm, or EDM's edm, vp, ve")
    sigma_schedule: SigmaScheduleName = Field("karras", description="noise levels of the sigma samplers")
    sigma_min: float = Field(0.002, gt=0, description="lowest nonzero sampling sigma (ve: also in training)")
    sigma_max: float = Field(80.0, gt=0, description="highest sampling sigma (ve: also in training)")
    rho: float = Field(7.0, gt=0, description="exponent of the karras sigma schedule")
    sigma_data: float = Field(0.5, gt=0, description="edm: standard deviation of the data")
    P_mean: float = Field(-1.2, description="edm: mean of ln(sigma) in training")
    P_std: float = Field(1.2, gt=0, description="edm: standard deviation of ln(sigma) in training")
    beta_d: float = Field(19.9, gt=0, description="vp: beta_d of sigma(t) (also of the vp sigma schedule)")
    beta_min: float = Field(0.1, gt=0, description="vp: beta_min of sigma(t) (also of the vp sigma schedule)")
    epsilon_t: float = Field(1e-5, gt=0, lt=1, description="vp: lowest training t")
    S_churn: float = Field(0.0, ge=0, description="euler/heun: total churn of EDM Algorithm 2 (0 deterministic)")
    S_tmin: float = Field(0.0, ge=0, description="euler/heun: churn only where sigma >= S_tmin")
    S_tmax: float | None = Field(None, ge=0, description="euler/heun: churn only where sigma <= S_tmax; null = inf")
    S_noise: float = Field(1.0, gt=0, description="euler/heun: scale of the churn noise")
    p_uncond: float = Field(0.0, ge=0, le=1, description="probability of training on the null class label")
    guidance: float = Field(1.0, ge=0, description="classifier-free guidance w (1 conditional, 0 unconditional)")

    @model_validator(mode="after")
    def _consistent(self) -> DDPMConfig:
        family = self.preconditioning
        if family == "ddpm" and self.steps > self.T:
            raise ValueError(f"steps={self.steps} exceeds T={self.T}; allowed: 1 <= steps <= T")
        if self.sigma_min >= self.sigma_max:
            raise ValueError(
                f"sigma_min={self.sigma_min} >= sigma_max={self.sigma_max}; allowed: sigma_min < sigma_max"
            )
        if self.S_tmax is not None and self.S_tmin > self.S_tmax:
            raise ValueError(f"S_tmin={self.S_tmin} > S_tmax={self.S_tmax}; allowed: S_tmin <= S_tmax")
        if family != "ddpm" and self.sampler in samplers.TIMESTEP_SAMPLERS:
            allowed = ", ".join(n for n in samplers.SAMPLERS if n not in samplers.TIMESTEP_SAMPLERS)
            raise ValueError(f"sampler={self.sampler!r} needs preconditioning='ddpm'; {family!r} allows {allowed}")
        for name, default in (("prediction", "epsilon"), ("weighting", "uniform")):
            if family != "ddpm" and getattr(self, name) != default:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} applies to preconditioning='ddpm' only; "
                    f"preconditioning={family!r} fixes its own (EDM Table 1)"
                )
        return self

    @classmethod
    def from_classical_ddpm(cls, variance: str = "beta", schedule: str = "linear", **overrides: Any) -> DDPMConfig:
        """Ho et al. 2020: epsilon-prediction, MSE, ancestral sampling over all T steps."""
        T = overrides.pop("T", 1000)
        return cls(**{"schedule": schedule, "T": T, "sampler": "ddpm", "steps": T, "variance": variance, **overrides})

    @classmethod
    def from_ddpm(cls, schedule: str = "cosine", **overrides: Any) -> DDPMConfig:
        """Nichol & Dhariwal 2021: cosine schedule, ancestral sampling respaced to 250 steps."""
        return cls(**{"schedule": schedule, "sampler": "ddpm", "steps": 250, "variance": "beta_tilde", **overrides})

    @classmethod
    def from_ddim(cls, schedule: str = "linear", **overrides: Any) -> DDPMConfig:
        """Song et al. 2021: deterministic DDIM (eta = 0) with 50 leading-spaced steps."""
        return cls(**{"schedule": schedule, "sampler": "ddim", "steps": 50, "eta": 0.0, **overrides})

    @classmethod
    def from_edm(cls, **overrides: Any) -> DDPMConfig:
        """Karras et al. 2022 (EDM): EDM preconditioning and training, Heun (Algorithm 1) over 18 karras steps."""
        return cls(**{"preconditioning": "edm", **_SIGMA_SAMPLING, **overrides})

    @classmethod
    def from_vp(cls, **overrides: Any) -> DDPMConfig:
        """Song et al. 2021 VP-SDE as in EDM Table 1 (preconditioning, uniform-t training); EDM's Heun sampler."""
        return cls(**{"preconditioning": "vp", **_SIGMA_SAMPLING, **overrides})

    @classmethod
    def from_ve(cls, **overrides: Any) -> DDPMConfig:
        """Song et al. 2021 VE-SDE as in EDM Table 1 (sigma in [0.02, 100], log-uniform); EDM's Heun sampler."""
        return cls(**{"preconditioning": "ve", **_SIGMA_SAMPLING, "sigma_min": 0.02, "sigma_max": 100.0, **overrides})

    def alphas_cumprod(self) -> Tensor:
        """alpha_bar table [T] of this config's schedule (float64)."""
        return schedules.alphas_cumprod(self.schedule, self.T)

    def loss_fn(self) -> losses.DiffusionLoss | losses.DenoiserLoss:
        """The per-sample training loss of this config (a denoiser loss for edm, vp and ve)."""
        if self.preconditioning != "ddpm":
            return losses.DenoiserLoss(self.loss, self.huber_delta)
        return losses.DiffusionLoss(self.loss, self.prediction, self.weighting, self.snr_gamma, self.huber_delta)

    def preconditioner(
        self, alphas_cumprod: Tensor | None = None
    ) -> preconditioning.EDM | preconditioning.VP | preconditioning.VE | preconditioning.DDPM:
        """This family's preconditioning; for ddpm, the sigma view of ``alphas_cumprod`` (default: the config's)."""
        if self.preconditioning == "ddpm":
            table = self.alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
            return preconditioning.DDPM(table, self.prediction)
        if self.preconditioning == "edm":
            return preconditioning.EDM(self.sigma_data, self.P_mean, self.P_std)
        if self.preconditioning == "vp":
            return preconditioning.VP(self.beta_d, self.beta_min, self.epsilon_t)
        return preconditioning.VE(self.sigma_min, self.sigma_max)

    def sigmas(self, sampler: str | None = None, steps: int | None = None) -> Tensor:
        """Noise levels sigma_0 > ... > sigma_n = 0 the sampler visits (float64 [n + 1]).

        For ddpm and ddim, those of their timesteps; for a sigma sampler on a ddpm model, the sigma schedule
        within the trained range, snapped to trained timesteps (repeats merged, so possibly fewer steps).
        """
        cfg = self.replace(sampler=sampler, steps=steps)
        if cfg.sampler == "ddim":
            t = samplers.ddim_timesteps(cfg.T, cfg.steps, cfg.spacing)
        elif cfg.sampler == "ddpm":
            t = samplers.respaced_timesteps(cfg.T, cfg.steps)
        if cfg.sampler in samplers.TIMESTEP_SAMPLERS:
            return torch.cat([schedules.sigma(cfg.alphas_cumprod()[t]), torch.zeros(1, dtype=torch.float64)])
        options = {"karras": {"rho": cfg.rho}, "vp": {"beta_d": cfg.beta_d, "beta_min": cfg.beta_min}}
        make = partial(samplers.SIGMA_SCHEDULES[cfg.sigma_schedule], cfg.steps, **options.get(cfg.sigma_schedule, {}))
        if cfg.preconditioning != "ddpm":
            return make(cfg.sigma_min, cfg.sigma_max)
        trained = schedules.sigma(cfg.alphas_cumprod())
        sigma_min, sigma_max = max(cfg.sigma_min, trained[0].item()), min(cfg.sigma_max, trained[-1].item())
        if sigma_min >= sigma_max:
            raise ConfigError(
                f"sigma_min={cfg.sigma_min}, sigma_max={cfg.sigma_max} miss the trained range "
                f"[{trained[0].item():.4g}, {trained[-1].item():.4g}] of schedule={cfg.schedule!r}, T={cfg.T}"
            )
        return cfg.preconditioner().snap(make(sigma_min, sigma_max))

    def nfe(self, sampler: str | None = None, steps: int | None = None, guidance: float | None = None) -> int:
        """Network evaluations per image: one per step (Heun: 2n - 1), doubled by classifier-free guidance."""
        cfg = self.replace(sampler=sampler, steps=steps, guidance=guidance)
        n = len(cfg.sigmas()) - 1
        calls = 2 * n - 1 if cfg.sampler == "heun" else n
        return calls if cfg.guidance in (0.0, 1.0) else 2 * calls

    def replace(self, **updates: Any) -> DDPMConfig:
        """A validated copy with ``updates`` applied; ``None`` values keep the current setting."""
        changed = {k: v for k, v in updates.items() if v is not None}
        return type(self).from_dict({**self.to_dict(), **changed}) if changed else self

    def sampler_fn(
        self, sampler: str | None = None, steps: int | None = None, eta: float | None = None
    ) -> Callable[..., Tensor]:
        """The named sampler (default: this config's) bound to this config's options.

        ddpm and ddim: ``f(model_fn, x_T, alphas_cumprod, *, generator=None, callback=None) -> x_0``;
        the sigma samplers: ``f(denoiser, x, sigmas, *, generator=None, callback=None) -> x_0``, with
        ``sigmas`` from :meth:`sigmas`.
        """
        cfg = self.replace(sampler=sampler, steps=steps, eta=eta)
        common = {"steps": cfg.steps, "prediction": cfg.prediction, "clip": cfg.clip}
        if cfg.sampler == "ddim":
            return partial(samplers.ddim, **common, eta=cfg.eta, spacing=cfg.spacing)
        if eta is not None:
            raise ConfigError(f"eta={eta!r} applies to the ddim sampler only, not {cfg.sampler!r}")
        if cfg.sampler == "ddpm":
            return partial(samplers.ddpm, **common, variance=cfg.variance)
        if cfg.sampler not in samplers.CHURN_SAMPLERS:
            return partial(samplers.SAMPLERS[cfg.sampler])
        S_tmax = math.inf if cfg.S_tmax is None else cfg.S_tmax
        churn = {"S_churn": cfg.S_churn, "S_tmin": cfg.S_tmin, "S_tmax": S_tmax, "S_noise": cfg.S_noise}
        return partial(samplers.SAMPLERS[cfg.sampler], **churn)


_SIGMA_SAMPLING = {"sampler": "heun", "steps": 18, "sigma_schedule": "karras", "clip": False}


class OptimConfig(Config):
    """AdamW with linear warmup, then cosine decay or a constant rate (the lr_scheduler)."""

    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    lr_scheduler: Literal["cosine", "constant"] = Field("cosine", description="decay after warmup")
    warmup_steps: int = Field(0, ge=0, description="linear warmup length in optimizer steps")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr of the cosine decay, as a fraction of lr")
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; null disables clipping")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="on a nan/inf loss: stop with an error naming the step, or skip the update (one device)"
    )

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={list(self.betas)}: each beta must lie in [0, 1)")
        return self


class EMAConfig(Config):
    """Exponential moving average of the weights used for sampling."""

    decay: float = Field(0.9999, ge=0, lt=1, description="EMA decay per optimizer step")
    warmup: bool = Field(True, description="use decay min(decay, (1 + n) / (10 + n)) at update n")
