"""What a benchmark run measures: the nets' configurations and the sizes of the run (:class:`Plan`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ddpm.config import DDPMConfig, TrainConfig
from ddpm.nets import UNetConfig


def train_precision(p: dict[str, Any]) -> str:
    """params.yaml's training precision as this machine runs it (``auto`` resolved by ``ddpm.fit``)."""
    from ddpm.fit import resolve_precision

    return resolve_precision(TrainConfig.from_dict(p.get("train") or {})).precision


ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("32-true", "bf16-mixed")  # Lightning's names: fp32, and bf16 autocast with fp32 weights


def params() -> dict[str, Any]:
    """The repository's params.yaml."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def default_model() -> UNetConfig:
    """The params.yaml ``model`` section on the default data (MNIST: 28x28, one channel)."""
    return UNetConfig.from_dict({**params()["model"], "in_channels": 1, "image_size": 28}, "model")


def large_model() -> UNetConfig:
    """A larger U-Net on the same data: UNetConfig's own defaults (width 64, two blocks per level, attention at 14)."""
    return UNetConfig(in_channels=1, image_size=28, dropout=0.0)


def tiny_model() -> UNetConfig:
    """A tiny U-Net on 16x16 images (the quick run)."""
    return UNetConfig(
        in_channels=1,
        image_size=16,
        channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        num_heads=2,
        norm_groups=8,
        dropout=0.0,
    )


def diffusion_config(net: UNetConfig) -> DDPMConfig:
    """The params.yaml ``diffusion`` section for images of ``net``'s shape."""
    section = {**params()["diffusion"], "channels": net.in_channels, "image_size": net.image_size}
    return DDPMConfig.from_dict(section, "diffusion")


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run."""

    configs: dict[str, UNetConfig]
    reps: dict[str, int]  # timed repetitions per configuration
    warmup: dict[str, int]  # warm-up calls per configuration
    train_batch: int
    sample_batch: int
    sample_steps: int
    sampler: str
    memory_n: tuple[int, ...]  # images drawn by the sample-stage memory rows (the first: one chunk)
    memory_chunk: int
    memory_precisions: tuple[str, ...]  # training-step memory rows
    memory_kept: int  # how many of memory_n also run with keep_freed_memory
    memory_repeats: int  # processes that draw the largest of memory_n, with each allocator
    eval_batch: int
    inception_batch: int
    compile: bool
    quick: bool
    compile_peer: bool = False  # compiled rows of both nets (bf16-mixed, first configuration)
    alloc_rounds: int = 3  # rounds in which a process of each process setting runs, in turns

    @property
    def first(self) -> tuple[str, UNetConfig]:
        """The first configuration's name and config (the one most sections measure)."""
        return next(iter(self.configs.items()))


def plan(quick: bool, reps: int | None, compile: bool | None) -> Plan:
    """The full run (params.yaml sizes), or the quick one (a tiny net, small batches, no compilation)."""
    p = params()
    sampler = p["sample"]["sampler"] or p["diffusion"]["sampler"]
    if quick:
        n = reps or 2
        return Plan(
            configs={"tiny": tiny_model()},
            reps={"tiny": n},
            warmup={"tiny": 1},
            train_batch=8,
            sample_batch=8,
            sample_steps=2,
            sampler=sampler,
            memory_n=(16, 64),
            memory_chunk=16,
            memory_precisions=(train_precision(p),),
            memory_kept=0,
            memory_repeats=1,
            eval_batch=16,
            inception_batch=2,
            compile=bool(compile),
            quick=True,
            alloc_rounds=1,
        )
    n = reps or 5
    return Plan(
        configs={"default": default_model(), "large": large_model()},
        reps={"default": n, "large": max(2, n - 2)},
        warmup={"default": 2, "large": 1},
        train_batch=p["train"]["batch_size"],
        sample_batch=256,
        sample_steps=2,
        sampler=sampler,
        memory_n=(p["sample"]["batch_size"], 10_000, 50_000),
        memory_chunk=p["sample"]["batch_size"],
        memory_precisions=PRECISIONS,
        memory_kept=3,
        memory_repeats=3,
        eval_batch=p["evaluate"]["batch_size"],
        inception_batch=32,
        compile=True if compile is None else compile,
        quick=False,
    )
