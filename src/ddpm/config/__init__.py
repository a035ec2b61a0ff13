"""The params schemas: one frozen pydantic model per ``params.yaml`` section, importing no implementation.

Every stage validates the whole of ``params.yaml`` with these before it does any work, so they are light:
pydantic and the standard library only. What a config stands for (a loss, a sampler, a net) is built from
it by the module that implements it.
"""

from ddpm.config.base import COMPILE_BACKENDS, COMPILE_MODES, CompileSetting, Config, ConfigError, short_repr
from ddpm.config.data import DATASETS, DataConfig, DatasetSpec
from ddpm.config.diffusion import (
    CHURN_SAMPLERS,
    LOSSES,
    PRECONDITIONINGS,
    PREDICTIONS,
    SAMPLERS,
    SCHEDULES,
    SIGMA_SAMPLERS,
    SIGMA_SCHEDULES,
    SPACINGS,
    TIMESTEP_SAMPLERS,
    VARIANCES,
    WEIGHTINGS,
    DDPMConfig,
)
from ddpm.config.evaluate import FEATURES, INCEPTION_FILE, EvaluateConfig, FeaturizerConfig
from ddpm.config.model import UNetConfig
from ddpm.config.sample import SampleConfig, SweepConfig
from ddpm.config.tracking import TrackingConfig
from ddpm.config.train import EmaConfig, OptimConfig, TrainConfig

__all__ = [
    "CHURN_SAMPLERS",
    "COMPILE_BACKENDS",
    "COMPILE_MODES",
    "DATASETS",
    "FEATURES",
    "INCEPTION_FILE",
    "LOSSES",
    "PRECONDITIONINGS",
    "PREDICTIONS",
    "SAMPLERS",
    "SCHEDULES",
    "SIGMA_SAMPLERS",
    "SIGMA_SCHEDULES",
    "SPACINGS",
    "TIMESTEP_SAMPLERS",
    "VARIANCES",
    "WEIGHTINGS",
    "CompileSetting",
    "Config",
    "ConfigError",
    "DDPMConfig",
    "DataConfig",
    "DatasetSpec",
    "EmaConfig",
    "EvaluateConfig",
    "FeaturizerConfig",
    "OptimConfig",
    "SampleConfig",
    "SweepConfig",
    "TrackingConfig",
    "TrainConfig",
    "UNetConfig",
    "short_repr",
]
