"""``DDPMConfig``: the model family, noise schedule, training loss and default sampler of a diffusion model.

The names each field allows are listed here, beside the schema; the implementations register the same
names (``ddpm.schedules.SCHEDULES``, ``ddpm.samplers.SAMPLERS``, ...), which a test keeps equal. The
objects a config stands for are built from it where they are used: the loss and preconditioning by
:mod:`ddpm.diffusion`, the sampling plan (sampler, noise levels, NFE) by :mod:`ddpm.generate`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ddpm.config.base import Config, ConfigError

SCHEDULES = ("linear", "cosine", "exp", "sigmoid")
PREDICTIONS = ("epsilon", "x0", "v")
LOSSES = ("mse", "l1", "huber")
WEIGHTINGS = ("uniform", "min_snr")
TIMESTEP_SAMPLERS = ("ddim", "ddpm")  # model_fn(x, t) over alphas_cumprod; the others take denoiser(x, sigma)
SIGMA_SAMPLERS = ("euler", "heun", "euler_maruyama", "dpmpp_2m")
SAMPLERS = TIMESTEP_SAMPLERS + SIGMA_SAMPLERS
CHURN_SAMPLERS = ("euler", "heun")  # accept S_churn, S_tmin, S_tmax, S_noise
SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("beta", "beta_tilde")
PRECONDITIONINGS = ("edm", "vp", "ve")  # the continuous families of Karras et al. 2022, Table 1
SIGMA_SCHEDULES = ("karras", "exponential", "vp", "ve")

ScheduleName = Literal[SCHEDULES]  # type: ignore[valid-type]
PredictionName = Literal[PREDICTIONS]  # type: ignore[valid-type]
LossName = Literal[LOSSES]  # type: ignore[valid-type]
WeightingName = Literal[WEIGHTINGS]  # type: ignore[valid-type]
SamplerName = Literal[SAMPLERS]  # type: ignore[valid-type]
SpacingName = Literal[SPACINGS]  # type: ignore[valid-type]
VarianceName = Literal[VARIANCES]  # type: ignore[valid-type]
PreconditioningName = Literal[("ddpm", *PRECONDITIONINGS)]  # type: ignore[valid-type]
SigmaScheduleName = Literal[SIGMA_SCHEDULES]  # type: ignore[valid-type]


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
        if family != "ddpm" and self.sampler in TIMESTEP_SAMPLERS:
            allowed = ", ".join(n for n in SAMPLERS if n not in TIMESTEP_SAMPLERS)
            raise ValueError(f"sampler={self.sampler!r} needs preconditioning='ddpm'; {family!r} allows {allowed}")
        for name, default in (("prediction", "epsilon"), ("weighting", "uniform")):
            if family != "ddpm" and getattr(self, name) != default:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} applies to preconditioning='ddpm' only; "
                    f"preconditioning={family!r} fixes its own (EDM Table 1)"
                )
        return self

    def with_sampler(
        self,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        guidance: float | None = None,
    ) -> DDPMConfig:
        """This config with a run's sampler settings (None keeps this config's), checked together: the sampler
        suits the family, steps fit T, and eta is given for ddim only."""
        if eta is not None and (sampler or self.sampler) != "ddim":
            raise ConfigError(f"eta={eta!r} applies to the ddim sampler only, not {sampler or self.sampler!r}")
        return self.replace(sampler=sampler, steps=steps, eta=eta, guidance=guidance)

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


_SIGMA_SAMPLING = {"sampler": "heun", "steps": 18, "sigma_schedule": "karras", "clip": False}
