"""The ``sample`` and ``sweep`` sections: what to draw from the trained EMA model, and FID against NFE."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ddpm.config.base import CompileSetting, Config


class SampleConfig(Config):
    """The ``sample`` section: what to draw from the trained EMA model."""

    n: int = Field(1000, ge=1, description="number of images")
    sampler: str | None = Field(None, description="sampler name; null = the diffusion section's default")
    steps: int | None = Field(None, ge=1, description="sampling steps; null = the diffusion section's default")
    eta: float | None = Field(None, ge=0, le=1, description="DDIM eta; null = the diffusion section's default")
    seed: int = Field(0, ge=0, lt=2**64, description="noise seed; image i depends only on (seed, i)")
    batch_size: int = Field(250, ge=1, description="images per chunk (bounds memory)")
    grid_size: int = Field(8, ge=1, description="the grid PNG shows grid_size x grid_size images")
    trajectory_samples: int = Field(6, ge=1, description="rows of the trajectory strip")
    trajectory_points: int = Field(8, ge=2, description="columns of the trajectory strip (noise -> image)")
    precision: Literal["32-true", "bf16-mixed"] = Field(
        "32-true", description="32-true (fp32) or bf16-mixed (the network under bf16 autocast; the sampler in fp32)"
    )
    compile: CompileSetting = Field(
        False, description="torch.compile the sampling network: false, true (inductor), or a backend name (eager, ...)"
    )


class SweepConfig(Config):
    """The ``sweep`` section: FID against network evaluations for several samplers of one model."""

    runs: list[str] = Field(
        ["ddim-10", "ddim-25", "dpmpp_2m-10", "heun-10"], min_length=1, description="sampler-steps pairs"
    )
    n: int = Field(500, ge=2, description="images per run")
    seed: int = Field(0, ge=0, lt=2**64, description="noise seed (the same noise for every run)")
    batch_size: int = Field(250, ge=1, description="images per chunk")

    @field_validator("runs")
    @classmethod
    def _sampler_steps(cls, runs: list[str]) -> list[str]:
        for run in runs:
            sampler, _, steps = run.rpartition("-")
            if not sampler or not steps.isdigit() or int(steps) < 1:
                raise ValueError(f"run {run!r} must look like <sampler>-<steps>, e.g. ddim-50")
        if len(set(runs)) != len(runs):
            raise ValueError("runs must be distinct")
        return runs

    def parse(self, run: str) -> tuple[str, int]:
        """(sampler, steps) of a run name."""
        sampler, _, steps = run.rpartition("-")
        return sampler, int(steps)
