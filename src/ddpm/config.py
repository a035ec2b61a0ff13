"""Typed, validated configuration: ``DDPMConfig`` (schedule, loss, sampler), optimizer and EMA.

Every config is a frozen pydantic model that round-trips through a plain dict (a
``params.yaml`` section). An invalid field raises :class:`ConfigError`, one line naming
the field, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from ddpm import losses, predictions, samplers, schedules

# Name used in error messages while ``Config.from_dict`` validates a section (e.g. "train").
_ERROR_PREFIX: ContextVar[str | None] = ContextVar("config_error_prefix", default=None)


class ConfigError(ValueError):
    """An invalid configuration value; the message is one line."""


def _describe(error: Mapping[str, Any], model: type[BaseModel], prefix: str) -> str:
    """One clause for one pydantic error: 'prefix.field=value: what is allowed'."""
    loc = ".".join(str(p) for p in error["loc"])
    where = f"{prefix}.{loc}" if loc else prefix
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key; allowed keys: {', '.join(model.model_fields)}"
    msg = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}={error['input']!r}: {msg}" if loc else f"{where}: {msg}"


class Config(BaseModel):
    """Base of all configs: frozen, no unknown keys, one-line errors, dict round-trip."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise self.error(e, _ERROR_PREFIX.get() or type(self).__name__) from None

    @classmethod
    def error(cls, e: ValidationError, prefix: str) -> ConfigError:
        """Turn a pydantic ValidationError into a one-line ConfigError."""
        return ConfigError("; ".join(_describe(err, cls, prefix) for err in e.errors()))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, prefix: str | None = None):
        """Validate a plain mapping (a params.yaml section); ``prefix`` names it in errors."""
        prefix = prefix or cls.__name__
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{prefix}={data!r}: expected a mapping of keys to values")
        bad_keys = [k for k in data if not isinstance(k, str)]
        if bad_keys:
            raise ConfigError(f"{prefix}: keys must be names, got {bad_keys!r}")
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


class DDPMConfig(Config):
    """Noise schedule, prediction target, loss and default sampler of a discrete diffusion model."""

    image_size: int = Field(28, ge=1, description="image height and width in pixels")
    channels: int = Field(1, ge=1, description="image channels (1 grey, 3 RGB)")
    schedule: ScheduleName = Field("linear", description="noise schedule of alpha_bar")
    T: int = Field(1000, ge=2, description="number of training timesteps")
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

    @model_validator(mode="after")
    def _steps_within_T(self) -> DDPMConfig:
        if self.steps > self.T:
            raise ValueError(f"steps={self.steps} exceeds T={self.T}; allowed: 1 <= steps <= T")
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

    def alphas_cumprod(self) -> Tensor:
        """alpha_bar table [T] of this config's schedule (float64)."""
        return schedules.alphas_cumprod(self.schedule, self.T)

    def loss_fn(self) -> losses.DiffusionLoss:
        """The per-sample training loss of this config."""
        return losses.DiffusionLoss(self.loss, self.prediction, self.weighting, self.snr_gamma, self.huber_delta)

    def replace(self, **updates: Any) -> DDPMConfig:
        """A validated copy with ``updates`` applied; ``None`` values keep the current setting."""
        changed = {k: v for k, v in updates.items() if v is not None}
        return type(self).from_dict({**self.to_dict(), **changed}) if changed else self

    def sampler_fn(
        self, sampler: str | None = None, steps: int | None = None, eta: float | None = None
    ) -> Callable[..., Tensor]:
        """The named sampler (default: this config's) bound to this config's options.

        Returns ``f(model_fn, x_T, alphas_cumprod, *, generator=None, callback=None) -> x_0``.
        """
        cfg = self.replace(sampler=sampler, steps=steps, eta=eta)
        common = {"steps": cfg.steps, "prediction": cfg.prediction, "clip": cfg.clip}
        if cfg.sampler == "ddim":
            return partial(samplers.ddim, **common, eta=cfg.eta, spacing=cfg.spacing)
        if eta is not None:
            raise ConfigError(f"eta={eta!r} applies to the ddim sampler only, not {cfg.sampler!r}")
        return partial(samplers.ddpm, **common, variance=cfg.variance)


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

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={list(self.betas)}: each beta must lie in [0, 1)")
        return self


class EMAConfig(Config):
    """Exponential moving average of the weights used for sampling."""

    decay: float = Field(0.9999, ge=0, lt=1, description="EMA decay per optimizer step")
    warmup: bool = Field(True, description="use decay min(decay, (1 + n) / (10 + n)) at update n")
