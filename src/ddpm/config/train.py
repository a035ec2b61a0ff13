"""The ``train`` section: optimizer, lr_scheduler and EMA (``OptimConfig``), and the run (``TrainConfig``)."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ddpm.config.base import CompileSetting, Config

EMA_STD_MAX = math.sqrt(1 / 12)  # sigma_rel of the power-function EMA with gamma = 0 (ddpm.ema.STD_MAX)


class OptimConfig(Config):
    """AdamW with linear warmup, then cosine decay or a constant rate (the lr_scheduler), and the EMA of the weights."""

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
    ema_decay: float = Field(0.9999, ge=0, lt=1, description="decay per optimizer step of the EMA used for sampling")
    ema_warmup: bool = Field(True, description="EMA decay min(ema_decay, (1 + n) / (10 + n)) at update n")
    ema_std: float | None = Field(
        None,
        gt=0,
        lt=EMA_STD_MAX,
        description="sigma_rel of a power-function EMA (EDM2) instead of the exponential one, whose length grows "
        "with the run (0.09 is about the warmup's); null = the exponential EMA of ema_decay and ema_warmup",
    )
    ema_snapshot_stds: list[float] | None = Field(
        None,
        min_length=1,
        description="sigma_rel of power-function EMAs kept beside the sampling EMA, whose snapshots let the EMA's "
        "length be chosen after training (ddpm.ema.reconstruct; EDM2 keeps 0.05 and 0.10); null = none",
    )

    @field_validator("ema_snapshot_stds")
    @classmethod
    def _snapshot_stds(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            bad = [s for s in v if not 0 < s < EMA_STD_MAX]
            if bad:
                raise ValueError(f"{bad[0]} is not a profile's sigma_rel: allowed 0 < std < {EMA_STD_MAX:.4f}")
            if len(set(v)) != len(v):
                raise ValueError("each std may be listed once")
        return v

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={list(self.betas)}: each beta must lie in [0, 1)")
        # AdamW's first update is lr / (1 - beta1) per unit of normalised gradient: torch refuses a step size that
        # float32 cannot hold, in the middle of the run
        limit = FLOAT32_MAX * (1 - self.betas[0])
        if self.lr >= limit:
            raise ValueError(
                f"lr={self.lr:g}: AdamW's first step size lr / (1 - betas[0]) overflows float32; "
                f"allowed: lr < {limit:.3g} with betas[0]={self.betas[0]:g}"
            )
        return self


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


# Lightning's precision names (lightning_fabric.plugins.precision.precision), and auto (ddpm.fit.resolve_precision).
PrecisionName = Literal[
    "auto",
    "32-true",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "64-true",
    "transformer-engine",
    "transformer-engine-float16",
    "32",
    "16",
    "bf16",
    "64",
    32,
    16,
    64,
]


class TrainConfig(OptimConfig):
    """The ``train`` section: the optimizer and EMA (:class:`OptimConfig`), run length, checkpoints and the
    Lightning Trainer settings."""

    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of weights, data order, timesteps and noise")
    batch_size: int = Field(128, ge=1, description="images per optimizer step (per device)")
    max_steps: int = Field(1500, ge=1, description="optimizer steps")
    # the pipeline's own defaults of OptimConfig's fields (the rest keep OptimConfig's)
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(100, ge=0, description="linear lr warmup in optimizer steps")
    min_lr_ratio: float = Field(0.05, ge=0, le=1, description="final lr of the cosine decay, as a fraction of lr")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="decay per optimizer step of the EMA used for sampling")
    label_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of training labels replaced by the null class (class-conditional nets), so one model "
        "also draws unconditionally and classifier-free guidance works; 0.1 is usual",
    )
    val_every: int = Field(500, ge=1, description="validation loss every this many steps")
    log_every: int = Field(25, ge=1, description="record loss and lr every this many steps")
    ema_snapshot_every: int = Field(
        100, ge=1, description="write the ema_snapshot_stds EMAs every this many steps (and at the end) to ema/"
    )
    checkpoint_every: int | None = Field(
        500, ge=1, description="write the resume checkpoint every this many steps (and on SIGTERM); null = SIGTERM only"
    )
    accelerator: str = Field("auto", min_length=1, description="Lightning accelerator: cpu, gpu, auto, ...")
    devices: int | str | list[int] = Field(1, description="Lightning devices: 1, 2, -1 (all), 'auto', [0, 1]")
    strategy: str = Field("auto", min_length=1, description="Lightning strategy: auto, ddp, ...")
    num_nodes: int = Field(1, ge=1, description="machines for multi-node DDP (strategy ddp; one torchrun per node)")
    ddp_timeout: float = Field(
        300.0, gt=0, description="seconds a DDP collective waits for the other processes before the run fails"
    )
    precision: PrecisionName = Field(
        "32-true",
        description="Lightning precision: 32-true, bf16-mixed, 16-mixed, ...; auto = bf16-mixed where the hardware "
        "computes in bf16 (a GPU with bf16, a CPU with AVX512-BF16 or AMX), else 32-true",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    compile: CompileSetting = Field(
        False,
        description="torch.compile the trained net: false, true (inductor), a backend name (eager, ...) or an "
        "inductor mode (reduce-overhead: CUDA graphs, ...)",
    )

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, v: Any) -> Any:
        def index(d: Any) -> bool:
            return isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**16

        if index(v) and v > 0 or (isinstance(v, int) and not isinstance(v, bool) and v == -1):
            return v
        if isinstance(v, str) and re.fullmatch(r"auto|-1|\d{1,5}(,\d{1,5})*,?", v.replace(" ", "")):
            return v
        if isinstance(v, list) and v and all(index(d) for d in v) and len(set(v)) == len(v):
            return v
        raise ValueError("expected a count >= 1, -1 (all), 'auto', or distinct device indices such as [0, 1]")

    @model_validator(mode="after")
    def _multi_node(self) -> TrainConfig:
        if self.num_nodes > 1:
            if self.strategy not in ("ddp", "auto"):
                raise ValueError(f"num_nodes={self.num_nodes} needs strategy ddp (or auto), not {self.strategy!r}")
            if not isinstance(self.devices, int) or self.devices < 1:
                raise ValueError(
                    f"num_nodes={self.num_nodes} needs devices as a count of processes per node, not {self.devices!r}"
                )
        return self


class EmaConfig(Config):
    """The ``ema`` section: which EMA of the trained weights the later stages draw from."""

    std: float | None = Field(
        None,
        gt=0,
        lt=EMA_STD_MAX,
        description="sigma_rel of the EMA rebuilt from train's snapshots (train.ema_snapshot_stds) after training; "
        "null = the run's own EMA (train's model.pt)",
    )
    step: int | None = Field(None, ge=1, description="the update that EMA ends at; null = the last snapshot's")
