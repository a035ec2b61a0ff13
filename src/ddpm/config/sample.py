"""The ``sample`` and ``sweep`` sections: what to draw from the trained EMA model, and FID against NFE."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from ddpm.config.base import CompileSetting, Config


class SampleConfig(Config):
    """The ``sample`` section: what to draw from the trained EMA model."""

    n: int = Field(1000, ge=1, description="number of images")
    sampler: str | None = Field(None, description="sampler name; null = the diffusion section's default")
    steps: int | None = Field(None, ge=1, description="sampling steps; null = the diffusion section's default")
    eta: float | None = Field(None, ge=0, le=1, description="DDIM eta; null = the diffusion section's default")
    labels: str | list[int] | None = Field(
        None,
        description="classes to draw (class-conditional models): null = unconditional (the null class); a list "
        "of classes, image i drawing labels[i % len(labels)]; balanced = every class in turn",
    )
    guidance: float | None = Field(
        None,
        ge=0,
        description="classifier-free guidance scale w of uncond + w (cond - uncond): 1 = the conditional model, "
        "0 = the unconditional one, > 1 sharper classes; null = the diffusion section's default",
    )
    seed: int = Field(0, ge=0, lt=2**64, description="noise seed; image i depends only on (seed, i)")
    batch_size: int = Field(250, ge=1, description="images per chunk (bounds memory)")
    grid_size: int = Field(8, ge=1, description="the grid PNG shows grid_size x grid_size images")
    trajectory_samples: int = Field(6, ge=1, description="rows of the trajectory strip")
    trajectory_points: int = Field(8, ge=2, description="columns of the trajectory strip (noise -> image)")
    accelerator: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="where to draw: auto = a CUDA GPU where torch sees one, else the CPU; cpu; gpu"
    )
    precision: Literal["32-true", "bf16-mixed"] = Field(
        "32-true", description="32-true (fp32) or bf16-mixed (the network under bf16 autocast; the sampler in fp32)"
    )
    compile: CompileSetting = Field(
        False,
        description="torch.compile the sampling network: false, true (inductor), a backend name (eager, ...) or an "
        "inductor mode (reduce-overhead: CUDA graphs, for chunks of one shape)",
    )
    repaint_jumps: int = Field(
        1, ge=1, description="inpainting (make inpaint): RePaint's jump length, the noise levels walked between jumps"
    )
    resample: int = Field(
        1, ge=1, description="inpainting: RePaint's resampling, the passes over each jump (1 = no resampling)"
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, v: Any) -> Any:
        ok = v is None or v == "balanced"
        if isinstance(v, list):
            ok = bool(v) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in v)
        if not ok:
            raise ValueError("allowed: null, balanced, or a non-empty list of class indices >= 0")
        return v

    def label_array(self, n: int, num_classes: int | None) -> list[int] | None:
        """The label of each of ``n`` images (None: unconditional); checked against the model's ``num_classes``.

        Raises ValueError naming ``sample.labels`` when the model cannot draw them.
        """
        if self.labels is None:
            return None
        if num_classes is None:
            raise ValueError(
                f"sample.labels={self.labels!r}: the model is unconditional (model.num_classes: null); allowed: null"
            )
        classes = list(range(num_classes)) if self.labels == "balanced" else self.labels
        bad = [c for c in classes if c >= num_classes]
        if bad:
            raise ValueError(
                f"sample.labels={self.labels!r}: {bad} outside the model's classes; allowed: integers in "
                f"[0, {num_classes}), balanced or null"
            )
        return [classes[i % len(classes)] for i in range(n)]


def _check_run(run: str) -> None:
    """Raise ValueError unless ``run`` names a sampler and its steps, ``<sampler>-<steps>``."""
    sampler, _, steps = run.rpartition("-")
    if not sampler or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"run {run!r} must look like <sampler>-<steps>, e.g. ddim-50")


class SweepConfig(Config):
    """The ``sweep`` section: FID against network evaluations for several samplers of one model."""

    runs: list[str] = Field(
        ["ddim-10", "ddim-25", "dpmpp_2m-10", "heun-10"], min_length=1, description="sampler-steps pairs"
    )
    n: int = Field(500, ge=2, description="images per run")
    seed: int = Field(0, ge=0, lt=2**64, description="noise seed (the same noise for every run)")
    batch_size: int = Field(250, ge=1, description="images per chunk")
    guidance: list[float] = Field(
        [0.0, 1.0, 2.0, 4.0],
        min_length=1,
        description="classifier-free guidance scales of the guidance stage (FID and label accuracy against the "
        "scale; class-conditional models only)",
    )
    guidance_run: str | None = Field(
        None,
        description="sampler-steps of the guidance stage, e.g. dpmpp_2m-15; null = the model's default sampler, steps",
    )

    @field_validator("guidance_run")
    @classmethod
    def _guidance_run(cls, run: str | None) -> str | None:
        if run is not None:
            _check_run(run)
        return run

    @field_validator("guidance")
    @classmethod
    def _scales(cls, scales: list[float]) -> list[float]:
        if any(w < 0 for w in scales) or len(set(scales)) != len(scales):
            raise ValueError("allowed: distinct guidance scales >= 0")
        return scales

    @field_validator("runs")
    @classmethod
    def _sampler_steps(cls, runs: list[str]) -> list[str]:
        for run in runs:
            _check_run(run)
        if len(set(runs)) != len(runs):
            raise ValueError("runs must be distinct")
        return runs

    def parse(self, run: str) -> tuple[str, int]:
        """(sampler, steps) of a run name."""
        sampler, _, steps = run.rpartition("-")
        return sampler, int(steps)
