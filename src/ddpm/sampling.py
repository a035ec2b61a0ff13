"""The sampling stage: draw images from an exported model into a streamed ``.npz``, a grid and a trajectory."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from ddpm import data, io
from ddpm.config import Config
from ddpm.module import DiffusionModule
from ddpm.runtime import CompileSetting, compile_in_place


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

    def autocast(self, device: torch.device) -> Any:
        """The precision's autocast context on ``device`` (none for 32-true)."""
        if self.precision == "bf16-mixed":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()


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


def draw(module: DiffusionModule, cfg: SampleConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Write ``samples.npz`` (uint8 arr_0 [N, H, W, C]), ``grid.png`` and ``trajectory.png``; return the metadata."""
    out_dir = Path(out_dir)
    run_cfg = module.config.replace(sampler=cfg.sampler, steps=cfg.steps, eta=cfg.eta)
    steps = len(run_cfg.sigmas()) - 1  # sigma samplers on a ddpm model may merge snapped steps
    c, size = module.config.channels, module.config.image_size
    keep = min(cfg.trajectory_samples, cfg.n)
    marks = set(np.linspace(0, steps - 1, cfg.trajectory_points).round().astype(int).tolist())
    trajectory: list[np.ndarray] = []

    def record(info: dict[str, Any]) -> None:
        bar.update(info["x"].shape[0])
        if info["start"] == 0 and info["i"] in marks:
            trajectory.append(data.from_tensor(info["x"][:keep].float().cpu()))

    first: list[np.ndarray] = []
    compile_in_place(module.ema, cfg.compile)  # compiled at the first chunk
    started = time.perf_counter()
    with (
        cfg.autocast(module.device),
        tqdm(total=cfg.n * steps, unit="img-step", disable=not progress, desc="sample") as bar,
        io.NpzWriter(out_dir / "samples.npz", (cfg.n, size, size, c)) as writer,
    ):
        batches = module.sample_batches(
            cfg.n,
            sampler=run_cfg.sampler,
            steps=run_cfg.steps,
            eta=cfg.eta,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            callback=record,
        )
        for chunk in batches:
            images = data.from_tensor(chunk.float())
            writer.write(images)
            if sum(len(f) for f in first) < cfg.grid_size**2:
                first.append(images)
    seconds = time.perf_counter() - started

    shown = np.concatenate(first)[: cfg.grid_size**2]
    scale = max(1, 256 // (cfg.grid_size * size))
    io.save_png(out_dir / "grid.png", io.grid(shown, cfg.grid_size), scale=scale)
    strip = np.stack(trajectory, axis=1).reshape(-1, size, size, c)  # rows = samples, columns = time
    io.save_png(out_dir / "trajectory.png", io.grid(strip, len(trajectory)), scale=max(1, 64 // size))
    return {
        "n": cfg.n,
        "sampler": run_cfg.sampler,
        "steps": run_cfg.steps,
        "eta": run_cfg.eta if run_cfg.sampler == "ddim" else None,
        "nfe": run_cfg.nfe(),
        "seed": cfg.seed,
        "precision": cfg.precision,
        "seconds": round(seconds, 2),
        "images_per_second": round(cfg.n / seconds, 2),
    }
