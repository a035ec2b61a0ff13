"""Read and validate ``params.yaml`` as a whole, before any stage does work.

Every stage validates every section, so a bad value anywhere fails the first stage that
runs with one line naming the key, the value and what is allowed, and touches no output.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ddpm.config import (
    ConfigError,
    DataConfig,
    DDPMConfig,
    EmaConfig,
    EvaluateConfig,
    FeaturizerConfig,
    SampleConfig,
    SweepConfig,
    TrackingConfig,
    TrainConfig,
    UNetConfig,
    short_repr,
)
from ddpm.runtime import keep_freed_memory
from pipeline.schedule import ScheduleConfig

PARAMS = Path("params.yaml")
SECTIONS = (
    "data", "featurizer", "model", "diffusion", "train", "ema", "sample", "evaluate", "sweep", "tracking", "schedule",
)  # fmt: skip


@dataclass(frozen=True)
class Params:
    """The validated sections of params.yaml (``model``/``diffusion`` stay dicts: the data fixes their shapes)."""

    data: DataConfig
    featurizer: FeaturizerConfig
    model: dict[str, Any]
    diffusion: dict[str, Any]
    train: TrainConfig
    ema: EmaConfig
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
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """The mapping of section ``name`` (empty when absent or null); anything else is a ConfigError."""
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}={short_repr(value)}: expected a mapping of keys to values")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{name}: keys must be names, got {short_repr(bad)}")
    return value


AUTO = "auto"  # model.num_classes: the number of classes of the prepared data


def check_conditioning(
    sample: SampleConfig, ddpm_cfg: DDPMConfig, num_classes: int | None, conditional: bool, train: TrainConfig
) -> None:
    """The sample section's labels and guidance suit the model (``num_classes`` None: not known yet)."""
    guidance = ddpm_cfg.guidance if sample.guidance is None else sample.guidance
    key = "diffusion.guidance" if sample.guidance is None else "sample.guidance"
    if sample.labels is not None:
        if not conditional:
            raise ConfigError(
                f"sample.labels={short_repr(sample.labels)}: the model is unconditional (model.num_classes: null); "
                "allowed: null"
            )
        if num_classes is not None:
            try:
                sample.label_array(1, num_classes)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    elif guidance != 1:
        raise ConfigError(
            f"{key}={guidance}: guidance needs the classes to draw; allowed: 1 with sample.labels null, "
            "or set sample.labels"
        )
    if conditional and train.label_dropout == 0 and (sample.labels is None or guidance != 1):
        what = "sample.labels=null draws" if sample.labels is None else f"{key}={guidance} draws"
        raise ConfigError(
            f"{what} from the null class, which train.label_dropout=0 never trains; allowed: "
            "train.label_dropout > 0 (e.g. 0.1), or sample.labels with sample.guidance 1"
        )


def validate(raw: dict[str, Any], sample_overrides: dict[str, Any] | None = None) -> Params:
    """Validate every section; raise one-line ConfigError on the first problem found."""
    if not isinstance(raw, dict):
        raise ConfigError(f"params: expected a mapping of sections, got {type(raw).__name__}")
    unknown = sorted((repr(k) if not isinstance(k, str) else k for k in raw if k not in SECTIONS), key=str)
    if unknown:
        raise ConfigError(f"params: unknown section(s) {short_repr(unknown)}; allowed: {', '.join(SECTIONS)}")
    sections = {name: section(raw, name) for name in SECTIONS}
    data = DataConfig.from_dict(sections["data"], "data")
    size, channels = data.native_shape()
    model, diffusion = sections["model"], sections["diffusion"]
    for name, values in (("model", model), ("diffusion", diffusion)):
        shaped = {"in_channels", "image_size"} if name == "model" else {"channels", "image_size"}
        if shaped & values.keys():
            raise ConfigError(f"{name}: {sorted(shaped & values.keys())} come from the data; remove them")
    if "p_uncond" in diffusion:
        raise ConfigError(
            f"diffusion.p_uncond={short_repr(diffusion['p_uncond'])}: the share of dropped labels is "
            "train.label_dropout; remove diffusion.p_uncond"
        )
    num_classes = model.get("num_classes")
    net = UNetConfig.from_dict(
        {**model, "in_channels": channels, "image_size": size, **({"num_classes": 2} if num_classes == AUTO else {})},
        "model",
    )
    train = TrainConfig.from_dict(sections["train"], "train")
    conditional = net.num_classes is not None
    if train.label_dropout and not conditional:
        raise ConfigError(
            f"train.label_dropout={train.label_dropout}: the model is unconditional (model.num_classes: null); "
            "allowed: 0, or set model.num_classes (auto = the data's classes)"
        )
    ema = EmaConfig.from_dict(sections["ema"], "ema")
    if ema.std is not None and train.ema_snapshot_stds is None:
        raise ConfigError(
            f"ema.std={ema.std}: an EMA length chosen after training is rebuilt from train's snapshots, which "
            "train.ema_snapshot_stds=null does not keep; allowed: null, or set train.ema_snapshot_stds "
            "(e.g. [0.05, 0.1])"
        )
    if ema.step is not None and ema.std is None:
        raise ConfigError(f"ema.step={ema.step}: the run's own EMA (ema.std null) ends at the last step; allowed: null")
    if ema.step is not None and ema.step > train.max_steps:
        raise ConfigError(f"ema.step={ema.step}: allowed 1 <= step <= train.max_steps={train.max_steps}, or null")
    diffusion = {**diffusion, "p_uncond": train.label_dropout}  # DDPMConfig's name for it
    ddpm_cfg = DDPMConfig.from_dict({**diffusion, "channels": channels, "image_size": size}, "diffusion")
    sample = SampleConfig.from_dict({**sections["sample"], **(sample_overrides or {})}, "sample")
    try:  # the sampler suits the model
        ddpm_cfg.with_sampler(sample.sampler, sample.steps, sample.eta, sample.guidance)
    except ConfigError as e:
        raise ConfigError(f"sample: {e}") from None
    check_conditioning(sample, ddpm_cfg, None if num_classes == AUTO else net.num_classes, conditional, train)
    sweep = SweepConfig.from_dict(sections["sweep"], "sweep")
    named = [("sweep.runs", run) for run in sweep.runs]
    if sweep.guidance_run is not None:
        named.append(("sweep.guidance_run", sweep.guidance_run))
    for key, run in named:
        try:
            ddpm_cfg.with_sampler(*sweep.parse(run))
        except ConfigError as e:
            raise ConfigError(f"{key}: {run!r}: {e}") from None
    return Params(
        data=data,
        featurizer=FeaturizerConfig.from_dict(sections["featurizer"], "featurizer"),
        model=model,
        diffusion=diffusion,
        train=train,
        ema=ema,
        sample=sample,
        evaluate=EvaluateConfig.from_dict(sections["evaluate"], "evaluate"),
        sweep=sweep,
        tracking=TrackingConfig.from_dict(sections["tracking"], "tracking"),
        schedule=ScheduleConfig.from_dict(sections["schedule"], "schedule"),
    )


def resolved_model(model: dict[str, Any], classes: int) -> dict[str, Any]:
    """The ``model`` section with ``num_classes: auto`` replaced by the prepared data's number of classes."""
    return {**model, "num_classes": classes} if model.get("num_classes") == AUTO else model


def load(path: str | Path = PARAMS, sample_overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml."""
    return validate(read_yaml(path), sample_overrides)


def run_stage(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Run a stage CLI; expected failures print one line (set DDPM_DEBUG=1 for the traceback) and exit 2.

    The stage's process keeps freed memory for reuse (:func:`ddpm.runtime.keep_freed_memory`; a faster step
    on CPU for a resident set that stays at its peak); ``DDPM_KEEP_FREED_MEMORY=0`` leaves glibc's default.
    """
    args = parser.parse_args()
    if os.environ.get("DDPM_KEEP_FREED_MEMORY", "1") != "0":
        keep_freed_memory()
    try:
        main(args)
        # The outputs are written and closed. Spare the interpreter's final collection, which would walk every
        # object torch and Lightning created (about 1.5 s per stage process on 2 cores).
        gc.freeze()
    except (ConfigError, OSError, ValueError, FloatingPointError) as e:  # bad input, disk full, a nan/inf loss
        if os.environ.get("DDPM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
