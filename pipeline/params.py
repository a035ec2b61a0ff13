"""Read and validate ``params.yaml`` as a whole, before any stage does work.

Every stage validates every section, so a bad value anywhere fails the first stage that
runs with one line naming the key, the value and what is allowed, and touches no output.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ddpm.config import ConfigError, DDPMConfig
from ddpm.data import DataConfig, native_shape
from ddpm.featurizer import FeaturizerConfig
from ddpm.metrics import EvaluateConfig
from ddpm.nets import UNet, UNetConfig
from ddpm.sampling import SampleConfig, SweepConfig
from ddpm.tracking import TrackingConfig
from ddpm.training import TrainConfig
from pipeline.schedule import ScheduleConfig

PARAMS = Path("params.yaml")
OUT = Path("outputs")
SECTIONS = ("data", "featurizer", "model", "diffusion", "train", "sample", "evaluate", "sweep", "tracking", "schedule")


@dataclass(frozen=True)
class Params:
    """The validated sections of params.yaml (``model``/``diffusion`` stay dicts: the data fixes their shapes)."""

    data: DataConfig
    featurizer: FeaturizerConfig
    model: dict[str, Any]
    diffusion: dict[str, Any]
    train: TrainConfig
    sample: SampleConfig
    evaluate: EvaluateConfig
    sweep: SweepConfig
    tracking: TrackingConfig
    schedule: ScheduleConfig


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping; name the file on a missing file or a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def validate(raw: dict[str, Any], sample_overrides: dict[str, Any] | None = None) -> Params:
    """Validate every section; raise one-line ConfigError on the first problem found."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"params: unknown section(s) {unknown}; allowed: {', '.join(SECTIONS)}")
    data = DataConfig.from_dict(raw.get("data"), "data")
    size, channels = native_shape(data)
    model = raw.get("model") or {}
    diffusion = raw.get("diffusion") or {}
    for name, section in (("model", model), ("diffusion", diffusion)):
        if not isinstance(section, dict):
            raise ConfigError(f"{name}={section!r}: expected a mapping of keys to values")
        shaped = {"in_channels", "image_size"} if name == "model" else {"channels", "image_size"}
        if shaped & section.keys():
            raise ConfigError(f"{name}: {sorted(shaped & section.keys())} come from the data; remove them")
    net_cfg = UNetConfig.from_dict({**model, "in_channels": channels, "image_size": size}, "model")
    try:
        UNet(net_cfg)  # structural checks: sizes per level, attention resolutions, groups, heads
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    ddpm_cfg = DDPMConfig.from_dict({**diffusion, "channels": channels, "image_size": size}, "diffusion")
    sample = SampleConfig.from_dict({**(raw.get("sample") or {}), **(sample_overrides or {})}, "sample")
    ddpm_cfg.sampler_fn(sample.sampler, sample.steps, sample.eta)  # the sampler settings are compatible
    sweep = SweepConfig.from_dict(raw.get("sweep"), "sweep")
    for run in sweep.runs:
        try:
            ddpm_cfg.sampler_fn(*sweep.parse(run))
        except ConfigError as e:
            raise ConfigError(f"sweep.runs: {run!r}: {e}") from None
    return Params(
        data=data,
        featurizer=FeaturizerConfig.from_dict(raw.get("featurizer"), "featurizer"),
        model=model,
        diffusion=diffusion,
        train=TrainConfig.from_dict(raw.get("train"), "train"),
        sample=sample,
        evaluate=EvaluateConfig.from_dict(raw.get("evaluate"), "evaluate"),
        sweep=sweep,
        tracking=TrackingConfig.from_dict(raw.get("tracking"), "tracking"),
        schedule=ScheduleConfig.from_dict(raw.get("schedule"), "schedule"),
    )


def load(path: str | Path = PARAMS, sample_overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml."""
    return validate(read_yaml(path), sample_overrides)


def run_stage(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Run a stage CLI; expected failures print one line (set DDPM_DEBUG=1 for the traceback) and exit 2."""
    args = parser.parse_args()
    try:
        main(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if os.environ.get("DDPM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
