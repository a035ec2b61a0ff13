"""The resume checkpoint: what lets a preempted training run continue as if it had never stopped.

Every ``checkpoint_every`` steps, and at the step where a SIGTERM arrives, :class:`ResumeCheckpoint`
writes ``resume.ckpt`` atomically: Lightning's checkpoint (weights, EMA, optimizer, lr_scheduler,
step, epoch and the training loader's position) plus the RNG states of torch, numpy and python and a
record naming the run it belongs to (its fingerprint). :func:`read_resume` finds it again for the
same run only.
"""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from ddpm import io

RESUME = "resume.ckpt"
RESUME_FORMAT = "ddpm-resume/1"


def rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and python, as types ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(trainer: pl.Trainer, path: Path) -> None:
    """``trainer.save_checkpoint`` to ``path`` atomically (rank 0 writes); a failed write leaves the old file intact."""
    try:
        if trainer.is_global_zero:
            with io.atomic_path(path) as tmp:
                trainer.save_checkpoint(tmp, weights_only=False)
        else:
            trainer.save_checkpoint(path, weights_only=False)  # every rank takes part; only rank 0 writes
    except OSError as e:
        reason = e.strerror or str(e)
        message = f"cannot write checkpoint {path}: {reason}; the previous {path.name}, if any, is intact"
        raise OSError(e.errno, message) from None


class ResumeCheckpoint(pl.Callback):
    """Write the resume checkpoint every ``every`` steps and at the step a SIGTERM arrived; restore RNG states.

    Lightning's checkpoint carries the weights, EMA, optimizer, lr_scheduler, step, epoch and the
    loader's position; this callback adds the RNG states and a record of the run it belongs to.
    Only steps whose losses were all finite are checkpointed (``check_finite`` runs first).
    """

    def __init__(self, path: Path, every: int | None, fingerprint: str, saved_step: int | None = None) -> None:
        self.path, self.every, self.fingerprint, self.saved_step = path, every, fingerprint, saved_step
        self._rng: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng = state["rng"]

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self._rng is not None:  # after the sanity check, right before the first resumed step
            set_rng_state(self._rng)
            self._rng = None

    def on_save_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict) -> None:
        version = trainer.logger.version if trainer.logger is not None and trainer.is_global_zero else None
        checkpoint["ddpm_resume"] = {
            "format": RESUME_FORMAT,
            "fingerprint": self.fingerprint,
            "step": trainer.global_step,
            "logger_version": None if version is None else str(version),
        }

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        sigterm = trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False)
        due = sigterm or (self.every is not None and step % self.every == 0)
        if due and step < trainer.max_steps and step != self.saved_step:
            module.check_finite()
            save_checkpoint(trainer, self.path)
            self.saved_step = step


class Preempted(SystemExit):
    """Training stopped on SIGTERM after writing its resume checkpoint; the exit status is 128 + SIGTERM."""

    def __init__(self, message: str) -> None:
        super().__init__(128 + signal.SIGTERM)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Resume:
    """A resume checkpoint that belongs to the run about to start."""

    path: Path
    step: int  # optimizer steps done
    logger_version: str | None  # the Lightning logger's version (MLflow: the run id) of the interrupted run


def read_resume(path: str | Path, fingerprint: str) -> Resume | None:
    """The resume checkpoint at ``path`` if it exists and belongs to the run with ``fingerprint``, else None.

    An unreadable file (corrupt, or pickling code) raises one line naming it; it is never run.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        ckpt = io.load_weights_only(path, "resume checkpoint")
    except ValueError as e:
        raise type(e)(f"{e}; delete it to train from step 0") from None
    record = ckpt.get("ddpm_resume") if isinstance(ckpt, dict) else None
    if not isinstance(record, dict) or record.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path}: not a resume checkpoint ({RESUME_FORMAT!r} record missing); delete it to start over")
    if record.get("fingerprint") != fingerprint:
        return None
    return Resume(path, int(record["step"]), record.get("logger_version"))
