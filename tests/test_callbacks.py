"""The callbacks that watch a training run (ddpm.callbacks)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import torch

from ddpm import callbacks


def run_progress_log(monkeypatch, seconds_per_step: dict[int, float], rank_zero: bool = True) -> list[str]:
    """The lines a ProgressLog (every 5 steps or 30 s) writes over 12 steps of 4 images on 2 devices."""
    clock = [100.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    out = io.StringIO()
    log = callbacks.ProgressLog(batch_size=4, every_steps=5, every_seconds=30.0, stream=out)
    trainer = SimpleNamespace(
        global_step=0,
        max_steps=12,
        world_size=2,
        is_global_zero=rank_zero,
        callback_metrics={"train/loss": torch.tensor(0.5)},
    )
    log.on_train_start(trainer, None)
    for step in range(1, 13):
        clock[0] += seconds_per_step.get(step, 1.0)
        trainer.global_step = step
        log.on_train_batch_end(trainer, None)
    return out.getvalue().splitlines()


def test_progress_log_writes_every_n_steps_or_seconds_and_at_the_last_step(monkeypatch):
    lines = run_progress_log(monkeypatch, {7: 40.0})  # step 7 takes 40 s: a line by time
    assert [line.split(",")[0] for line in lines] == ["train: step 5/12", "train: step 7/12", "train: step 12/12"]
    # 5 steps x 4 images x 2 devices in 5 s; 7 steps to go at 1 s each
    assert lines[0] == "train: step 5/12, loss 0.5000, 8.0 img/s, elapsed 0:05, ETA 0:07"
    assert lines[-1].endswith("elapsed 0:51, ETA 0:00")


def test_progress_log_is_written_by_rank_zero_only(monkeypatch):
    assert run_progress_log(monkeypatch, {}, rank_zero=False) == []
