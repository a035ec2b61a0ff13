"""The training stage: fit a DiffusionModule on prepared images and export its EMA model.

Training survives preemption. Every ``checkpoint_every`` steps, and at the step where a SIGTERM
arrives, the run writes ``resume.ckpt`` atomically: weights, EMA, optimizer, lr_scheduler, step,
epoch, the data position (the loader below is a Lightning stateful loader whose order depends only
on the seed and the epoch) and the RNG states of torch, numpy and python. The next call with the
same settings and data (the same :func:`fingerprint`) resumes from it and ends with the weights an
uninterrupted run would have; a successful run removes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pydantic import Field, field_validator
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from ddpm import data, io
from ddpm.config import Config, ConfigError, DDPMConfig, EMAConfig, OptimConfig
from ddpm.module import DiffusionModule, NonFiniteLossError
from ddpm.nets import UNet, UNetConfig
from ddpm.runtime import CompileSetting, compile_in_place

log = logging.getLogger(__name__)

RESUME = "resume.ckpt"
RESUME_FORMAT = "ddpm-resume/1"
# Train settings that do not change the weights a run ends with: a checkpoint stays valid across them.
NOT_FINGERPRINTED = frozenset({"checkpoint_every", "nonfinite", "num_workers"})


# Lightning's precision names (lightning_fabric.plugins.precision.precision).
PrecisionName = Literal[
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


class TrainConfig(Config):
    """The ``train`` section: run length, optimizer, EMA, checkpoints and the Lightning Trainer settings."""

    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of weights, data order, timesteps and noise")
    batch_size: int = Field(128, ge=1, description="images per optimizer step (per device)")
    max_steps: int = Field(1500, ge=1, description="optimizer steps")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    warmup_steps: int = Field(100, ge=0, description="linear lr warmup")
    lr_scheduler: Literal["cosine", "constant"] = Field("cosine", description="lr decay after warmup")
    min_lr_ratio: float = Field(0.05, ge=0, le=1, description="final lr of the cosine decay / lr")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null = no clipping")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay per step")
    ema_warmup: bool = Field(True, description="EMA decay warmup min(decay, (1+n)/(10+n))")
    val_every: int = Field(500, ge=1, description="validation loss every this many steps")
    log_every: int = Field(25, ge=1, description="record loss and lr every this many steps")
    checkpoint_every: int | None = Field(
        500, ge=1, description="write the resume checkpoint every this many steps (and on SIGTERM); null = SIGTERM only"
    )
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a nan/inf loss stops training with an error naming the step, or its update is skipped"
    )
    accelerator: str = Field("auto", min_length=1, description="Lightning accelerator: cpu, gpu, auto, ...")
    devices: int | str | list[int] = Field(1, description="Lightning devices: 1, 2, -1 (all), 'auto', [0, 1]")
    strategy: str = Field("auto", min_length=1, description="Lightning strategy: auto, ddp, ...")
    num_nodes: int = Field(1, ge=1, description="machines for multi-node DDP")
    precision: PrecisionName = Field("32-true", description="Lightning precision: 32-true, bf16-mixed, 16-mixed, ...")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    compile: CompileSetting = Field(
        False, description="torch.compile the trained net: false, true (inductor), or a backend name (eager, ...)"
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

    def optim(self) -> OptimConfig:
        """The optimizer and lr_scheduler settings."""
        return OptimConfig(
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            lr_scheduler=self.lr_scheduler,
            min_lr_ratio=self.min_lr_ratio,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            nonfinite=self.nonfinite,
        )

    def ema(self) -> EMAConfig:
        """The EMA settings."""
        return EMAConfig(decay=self.ema_decay, warmup=self.ema_warmup)


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


def _world() -> tuple[int, int]:
    """(world size, rank) of the initialized process group, else (1, 0)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class EpochSampler(Sampler[int]):
    """Indices of a permutation that depends only on (seed, epoch), this rank's shard of it, from ``start`` once.

    Lightning calls ``set_epoch``; ``start`` (set when resuming) skips the first indices of the next pass.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // _world()[0]

    def __iter__(self) -> Iterator[int]:
        world, rank = _world()
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        start, self.start = self.start, 0
        return iter(order[: len(self) * world][rank::world][start:].tolist())


class ResumableLoader(DataLoader):
    """Shuffled full batches in an order fixed by (seed, epoch); Lightning saves and restores its position.

    ``state_dict`` (the epoch and the batches served in it) goes into Lightning's checkpoint, and
    ``load_state_dict`` makes the next pass start where the checkpointed run was, so a resumed run
    sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0) -> None:
        self.epoch_sampler = EpochSampler(len(dataset), seed)
        self.served = 0
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=self.epoch_sampler,
            drop_last=True,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed),  # worker seeds; keeps the global RNG untouched
        )

    def __iter__(self) -> Iterator[Any]:
        self.served = self.epoch_sampler.start // self.batch_size
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.epoch_sampler.seed, "epoch": self.epoch_sampler.epoch, "batches": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.epoch_sampler.seed:
            raise ValueError(f"the checkpoint's data order has seed {state['seed']}, not {self.epoch_sampler.seed}")
        epoch, batches = state["epoch"], state["batches"]
        if batches >= len(self):  # saved after the last batch of an epoch: the next one starts afresh
            epoch, batches = epoch + 1, 0
        self.epoch_sampler.epoch, self.epoch_sampler.start, self.served = epoch, batches * self.batch_size, batches


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


def dataset(images: data.ImageSet) -> TensorDataset:
    """(x in [-1, 1] [N, C, H, W], label) pairs of an ImageSet."""
    return TensorDataset(data.to_tensor(images.images), torch.from_numpy(images.labels).long())


def image_loader(images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool, seed: int, workers: int):
    """A DataLoader of (x in [-1, 1] [B, C, H, W], label) from uint8 [N, H, W, C]."""
    ds = TensorDataset(data.to_tensor(images), torch.from_numpy(labels).long())
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, generator=g, num_workers=workers)


def _configs(images_shape: tuple[int, ...], model: dict, diffusion: dict) -> tuple[UNetConfig, DDPMConfig]:
    _, h, w, c = images_shape
    if h != w:
        raise ValueError(f"images must be square, got {h}x{w}")
    net_cfg = UNetConfig.from_dict({**model, "in_channels": c, "image_size": h}, "model")
    return net_cfg, DDPMConfig.from_dict({**diffusion, "channels": c, "image_size": h}, "diffusion")


def build_module(images_shape: tuple[int, ...], model: dict, diffusion: dict, cfg: TrainConfig) -> DiffusionModule:
    """DiffusionModule for images [N, H, W, C] from the ``model`` and ``diffusion`` params sections."""
    net_cfg, ddpm_cfg = _configs(images_shape, model, diffusion)
    return DiffusionModule(UNet(net_cfg), ddpm_cfg, cfg.optim(), cfg.ema())


def fingerprint(
    train_set: data.ImageSet, val_set: data.ImageSet, model: dict, diffusion: dict, cfg: TrainConfig
) -> str:
    """SHA-256 of what a run's result depends on: resolved network, diffusion and train settings, and the data."""
    net_cfg, ddpm_cfg = _configs(train_set.images.shape, model, diffusion)
    record = {
        "model": net_cfg.to_dict(),
        "diffusion": ddpm_cfg.to_dict(),
        "train": {k: v for k, v in cfg.to_dict().items() if k not in NOT_FINGERPRINTED},
        "train_data": data.content_hash(train_set),
        "val_data": data.content_hash(val_set),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


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


def resume_checkpoint(
    out_dir: str | Path,
    train_set: data.ImageSet,
    val_set: data.ImageSet,
    model: dict,
    diffusion: dict,
    cfg: TrainConfig,
) -> Resume | None:
    """The checkpoint that :func:`train` with these arguments will resume from, or None if it starts at step 0."""
    return read_resume(Path(out_dir) / RESUME, fingerprint(train_set, val_set, model, diffusion, cfg))


def trainer_for(
    cfg: TrainConfig, callbacks: Sequence[pl.Callback], logger: Logger | None, progress: bool, out_dir: Path
) -> pl.Trainer:
    """The Lightning Trainer of a training run with ``cfg``'s run length, devices and precision."""
    return pl.Trainer(
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        precision=cfg.precision,
        val_check_interval=min(cfg.val_every, cfg.max_steps),
        check_val_every_n_epoch=None,
        log_every_n_steps=cfg.log_every,
        callbacks=list(callbacks),
        logger=logger if logger is not None else False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        default_root_dir=str(out_dir),
        use_distributed_sampler=False,  # EpochSampler shards the data itself
    )


def train(
    train_set: data.ImageSet,
    val_set: data.ImageSet,
    model: dict,
    diffusion: dict,
    cfg: TrainConfig,
    out_dir: str | Path,
    progress: bool = True,
    logger: Logger | None = None,
    *,
    resume: bool = True,
    callbacks: Sequence[pl.Callback] = (),
    keep_resume: bool = False,
) -> dict[str, float]:
    """Fit on ``train_set`` (an ImageSet), validate on ``val_set``; write checkpoint, EMA model and curves.

    Writes ``out_dir/last.ckpt`` (resumable Lightning checkpoint), ``out_dir/model.pt`` (EMA sampling model)
    and ``out_dir/curves.csv``; returns the final metrics. ``logger`` (e.g. Lightning's ``MLFlowLogger``)
    receives Lightning's metrics: train loss and lr every ``log_every`` steps, val losses, and the
    throughput (``train/images_per_second``); Lightning calls loggers on rank 0 only.

    With ``resume`` (default), ``out_dir/resume.ckpt`` of an interrupted run with the same fingerprint
    is continued (see :func:`resume_checkpoint`); one of another run is ignored and replaced. A SIGTERM
    writes it and raises :class:`Preempted` (exit status 143); a nan/inf loss raises NonFiniteLossError
    naming the step (``cfg.nonfinite='stop'``). ``callbacks`` are extra Lightning callbacks.
    ``keep_resume`` leaves the resume checkpoint for the caller to remove once it has written its own
    records (a stage killed between the two then resumes at the checkpoint instead of starting over).
    """
    out_dir = Path(out_dir)
    resume_path = out_dir / RESUME
    key = fingerprint(train_set, val_set, model, diffusion, cfg)
    start = read_resume(resume_path, key) if resume else None
    if start is not None:
        log.warning(f"train: resuming from {resume_path} at step {start.step}")
    elif resume and resume_path.is_file():
        log.warning(f"train: ignoring {resume_path}: another run's (other params or data); starting at step 0")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(train_set.images.shape, model, diffusion, cfg)
    compile_in_place(module.net, cfg.compile)
    recorder = CurveRecorder(cfg.log_every)
    checkpointer = ResumeCheckpoint(resume_path, cfg.checkpoint_every, key, start.step if start else None)
    throughput = [ThroughputLogger(cfg.log_every, cfg.batch_size)] if logger else []
    try:
        trainer = trainer_for(cfg, [recorder, *throughput, *callbacks, checkpointer], logger, progress, out_dir)
    except MisconfigurationException as e:  # e.g. accelerator: gpu on a machine without one
        raise ConfigError(f"train: {str(e).splitlines()[0]}") from None
    loader = ResumableLoader(dataset(train_set), cfg.batch_size, cfg.seed, cfg.num_workers)
    val_loader = image_loader(val_set.images, val_set.labels, 256, False, cfg.seed, cfg.num_workers)
    try:
        trainer.fit(module, loader, val_loader, ckpt_path=start.path if start else None, weights_only=True)
    except SIGTERMException:
        held = f"{resume_path} holds step {checkpointer.saved_step}" if checkpointer.saved_step else "no checkpoint"
        message = f"train: stopped by SIGTERM at step {trainer.global_step}; {held}; run again to resume"
        log.warning(message)
        raise Preempted(message) from None
    except NonFiniteLossError as e:
        kept = (
            f"; {resume_path} (step {checkpointer.saved_step}) is kept, the last checkpoint before it"
            if checkpointer.saved_step
            else "; no checkpoint was written before it"
        )
        hint = "; lower train.lr, or set train.nonfinite: skip to skip such steps, and run again"
        raise NonFiniteLossError(e.step, e.loss, kept + hint) from None
    final = trainer.validate(module, val_loader, verbose=False)[0]

    save_checkpoint(trainer, out_dir / "last.ckpt")
    if trainer.is_global_zero:
        io.save_model(
            out_dir / "model.pt", module.net.config.to_dict(), module.config.to_dict(), module.ema.state_dict()
        )
        io.write_csv(out_dir / "curves.csv", ["step", "loss", "lr"], recorder.rows)
        if not keep_resume:
            resume_path.unlink(missing_ok=True)
    images = trainer.global_step * cfg.batch_size * trainer.world_size
    return {
        "train_loss": recorder.rows[-1][1],
        "val_loss": final["val/loss"],
        "val_loss_ema": final["val/loss_ema"],
        "steps": trainer.global_step,
        "skipped_steps": module.skipped_steps,
        "seconds": round(recorder.seconds, 2),
        "images_per_second": round(images / max(recorder.seconds, 1e-9), 2),
    }


def load_model(path: str | Path) -> DiffusionModule:
    """Load an exported EMA model (``model.pt``) as a DiffusionModule ready to sample; errors name the file."""
    payload = io.load_payload(path, "model", {"format", "net", "config", "state_dict"})
    if payload["format"] != io.MODEL_FORMAT:
        raise ValueError(f"{path}: unknown model format {payload['format']!r}; expected {io.MODEL_FORMAT!r}")
    net_cfg = UNetConfig.from_dict(payload["net"], f"{path}: net")
    config = DDPMConfig.from_dict(payload["config"], f"{path}: config")
    try:
        module = DiffusionModule(UNet(net_cfg), config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    io.load_state(module.ema, payload["state_dict"], path, "model")
    module.net.load_state_dict(payload["state_dict"])
    return module.eval()
