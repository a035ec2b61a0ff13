"""Lightning callbacks that watch a training run: the loss curve, the throughput, the compile time, a progress
log and the EMA snapshots."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import pytorch_lightning as pl

from ddpm import ema, export


class CurveRecorder(pl.Callback):
    """Record (step, loss, lr) every ``every`` steps and the wall time of training (both carried by checkpoints)."""

    def __init__(self, every: int) -> None:
        self.every, self.rows, self.started, self.seconds, self.before = every, [], 0.0, 0.0, 0.0

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            m = trainer.callback_metrics  # one host sync every `every` steps
            self.rows.append([step, float(m["train/loss"]), float(m["train/lr"])])

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.seconds = self.before + time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [list(r) for r in self.rows], "seconds": self.before + time.perf_counter() - self.started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows, self.before = [list(r) for r in state["rows"]], float(state["seconds"])


class ThroughputLogger(pl.Callback):
    """Log ``train/images_per_second`` (all devices) over each window of ``every`` steps; no extra host sync."""

    def __init__(self, every: int, batch_size: int) -> None:
        self.every, self.batch_size, self.mark = every, batch_size, (0, 0.0)

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.mark = (trainer.global_step, time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        step, now = trainer.global_step, time.perf_counter()
        if step - self.mark[0] >= self.every and trainer.logger is not None:
            images = (step - self.mark[0]) * self.batch_size * trainer.world_size
            trainer.logger.log_metrics({"train/images_per_second": images / (now - self.mark[1])}, step=step)
            self.mark = (step, now)


class CompileTime(pl.Callback):
    """The seconds torch.compile added to a fit: the wall time of its first training step beyond the median of the
    next ``steady`` steps (the first step compiles the training graph, the later ones run it); the whole first step
    when the fit takes one. Logged once, as ``train/compile_seconds``, when measured.

    No host sync: on a GPU the host waits for the device only once its queue of kernels is full, so a step's
    time on the host is the device's, give or take a step.
    """

    def __init__(self, steady: int = 10) -> None:
        self.steady, self.times, self.started = steady, [], 0.0

    @property
    def seconds(self) -> float | None:
        """The first step's seconds beyond a steady step's (None before the first step ends)."""
        if not self.times:
            return None
        first, rest = self.times[0], self.times[1:]
        return max(first - (statistics.median(rest) if rest else 0.0), 0.0)

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if len(self.times) > self.steady:
            return
        self.times.append(time.perf_counter() - self.started)
        measured = len(self.times) == self.steady + 1 or trainer.global_step >= trainer.max_steps
        if measured and trainer.logger is not None:
            trainer.logger.log_metrics({"train/compile_seconds": self.seconds}, step=trainer.global_step)


def _clock(seconds: float) -> str:
    """``seconds`` as h:mm:ss, or m:ss under an hour."""
    minutes, s = divmod(round(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLog(pl.Callback):
    """A progress line every ``every_steps`` optimizer steps or ``every_seconds`` seconds, whichever comes first,
    and at the last step: steps done of ``max_steps``, the loss, images per second (all devices) since the last
    line, the time elapsed and the time left. Lightning's progress bar suits a terminal; this suits a log file.

    Rank 0 writes, to ``stream`` (default: standard output); one host sync per line (the loss).
    """

    def __init__(self, batch_size: int, every_steps: int, every_seconds: float = 30.0, stream: TextIO | None = None):
        self.batch_size, self.every_steps, self.every_seconds = batch_size, every_steps, every_seconds
        self.stream = stream
        self.start = self.mark = (0, 0.0)

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.start = self.mark = (trainer.global_step, time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        step, now = trainer.global_step, time.perf_counter()
        (last, then), (first, began) = self.mark, self.start
        total = trainer.max_steps
        due = step - last >= self.every_steps or now - then >= self.every_seconds or step == total
        if step == last or not due or not trainer.is_global_zero:
            return
        self.mark = (step, now)
        loss = trainer.callback_metrics.get("train/loss")
        images = (step - last) * self.batch_size * trainer.world_size
        parts = [
            f"step {step}/{total}" if total > 0 else f"step {step}",
            "loss n/a" if loss is None else f"loss {float(loss):.4f}",
            f"{images / max(now - then, 1e-9):.1f} img/s",
            f"elapsed {_clock(now - began)}",
        ]
        if total > 0:
            parts.append(f"ETA {_clock((now - began) / (step - first) * (total - step))}")
        print("train: " + ", ".join(parts), file=self.stream or sys.stdout, flush=True)


class EMASnapshots(pl.Callback):
    """Write the module's ``snapshot_emas`` (``train.ema_snapshot_stds``) to ``folder`` every ``every`` updates and
    at the last one, each as a model file with its profile (``ema``: std, gamma, step).

    Their averages live in the module, so the resume checkpoint carries them; files of an interrupted run up to
    its checkpoint are the ones the resumed run would write, and the later ones are written again.
    """

    def __init__(self, folder: str | Path, every: int) -> None:
        self.folder, self.every = Path(folder), every

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == 0 or not module.snapshot_emas or (step % self.every and step != trainer.max_steps):
            return
        module.check_finite()  # a nan/inf step stops here on every rank, before its averages are written
        if trainer.is_global_zero:
            stds = module.optim.ema_snapshot_stds
            for std, gamma, average in zip(stds, module.snapshot_gammas, module.snapshot_emas):
                profile = {"std": float(std), "gamma": float(gamma), "step": int(step)}
                export.save_model(ema.snapshot_path(self.folder, std, step), average, module.config, ema=profile)
