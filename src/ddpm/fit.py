"""The training stage: fit a DiffusionModule on prepared images and export its EMA model.

Training survives preemption (:mod:`ddpm.checkpoints`): a run with the same settings and data (the
same :func:`fingerprint`) as an interrupted one resumes from its checkpoint and ends with the weights an
uninterrupted run would have; a successful run removes the checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_module

from ddpm import data, ema, export, io, loaders
from ddpm.callbacks import CompileTime, CurveRecorder, EMASnapshots, ProgressLog, ThroughputLogger
from ddpm.checkpoints import RESUME, Preempted, Resume, ResumeCheckpoint, read_resume, save_checkpoint
from ddpm.config import ConfigError, DDPMConfig, TrainConfig, UNetConfig
from ddpm.module import DiffusionModule, NonFiniteLossError
from ddpm.nets import UNet
from ddpm.runtime import compile_in_place

log = logging.getLogger(__name__)

# Train settings that do not change the weights a run ends with: a checkpoint stays valid across them.
NOT_FINGERPRINTED = frozenset({"checkpoint_every", "nonfinite", "num_workers", "ddp_timeout", "ema_snapshot_every"})
SNAPSHOTS = "ema"  # out_dir's folder of the EMA snapshots (train.ema_snapshot_stds) of the last finished run
SNAPSHOTS_PARTIAL = "ema.partial"  # those of the run in progress, moved to SNAPSHOTS when it finishes
# A run without a terminal logs a progress line at every tenth of its steps, or this often if sooner.
PROGRESS_SECONDS = 30.0


def _configs(images_shape: tuple[int, ...], model: dict, diffusion: dict) -> tuple[UNetConfig, DDPMConfig]:
    _, h, w, c = images_shape
    if h != w:
        raise ValueError(f"images must be square, got {h}x{w}")
    net_cfg = UNetConfig.from_dict({**model, "in_channels": c, "image_size": h}, "model")
    return net_cfg, DDPMConfig.from_dict({**diffusion, "channels": c, "image_size": h}, "diffusion")


def build_module(images_shape: tuple[int, ...], model: dict, diffusion: dict, cfg: TrainConfig) -> DiffusionModule:
    """DiffusionModule for images [N, H, W, C] from the ``model`` and ``diffusion`` params sections."""
    net_cfg, ddpm_cfg = _configs(images_shape, model, diffusion)
    return DiffusionModule(UNet(net_cfg), ddpm_cfg, cfg)


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


class _NoTips(logging.Filter):
    """Drop Lightning's advertising tips ("💡 Tip: ... try installing ..."), which it logs for every Trainer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


@contextlib.contextmanager
def _lightning_quiet() -> Iterator[None]:
    """Lightning without the two notices it gives every run that are not about the run: its advertising tips,
    and the FutureWarning of torch's deprecated ``LeafSpec()``, which its loader wrapper calls for each loader."""
    tips, logger = _NoTips(), rank_zero_module.log  # the logger of Lightning's rank_zero_info
    logger.addFilter(tips)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                category=FutureWarning,
                module=r"pytorch_lightning\.utilities\._pytree",
            )
            yield
    finally:
        logger.removeFilter(tips)


class PeerLostError(ConnectionError):
    """A DDP collective failed: another process of the run (on this node or another) died or stopped answering."""


def _peer_failure(error: BaseException, world_size: int) -> bool:
    """Whether ``error`` is a collective that failed because a peer is gone (a dead or hung node)."""
    if world_size < 2:
        return False
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        sign in text for sign in ("gloo", "Gloo", "NCCL", "Connection reset", "Connection closed", "Timed out")
    )


def bf16_hardware(accelerator: str) -> bool:
    """Whether the run's device computes in bf16 natively: a CUDA GPU with bf16, or a CPU with bf16 dot products
    (AVX512-BF16 or AMX). Elsewhere bf16 autocast emulates it: a default training step took 15 s against fp32's
    1.4 s on an AVX2 CPU."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = next(
            (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), ""
        ).split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``precision: auto`` made bf16-mixed where the hardware computes in bf16, else 32-true."""
    if cfg.precision != "auto":
        return cfg
    return cfg.replace(precision="bf16-mixed" if bf16_hardware(cfg.accelerator) else "32-true")


def strategy_for(cfg: TrainConfig) -> str | DDPStrategy:
    """Lightning's strategy: DDP with ``cfg.ddp_timeout`` for ``ddp`` and for several nodes, else the name.

    The timeout bounds every collective, so a node that dies ends the others with an error within it instead
    of torch's default 30 minutes of waiting.
    """
    if cfg.strategy == "ddp" or (cfg.strategy == "auto" and cfg.num_nodes > 1):
        return DDPStrategy(timeout=timedelta(seconds=cfg.ddp_timeout))
    return cfg.strategy


def trainer_for(
    cfg: TrainConfig, callbacks: Sequence[pl.Callback], logger: Logger | None, progress_bar: bool, out_dir: Path
) -> pl.Trainer:
    """The Lightning Trainer of a training run with ``cfg``'s run length, devices and precision."""
    with _lightning_quiet():
        return pl.Trainer(
            max_steps=cfg.max_steps,
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            strategy=strategy_for(cfg),
            num_nodes=cfg.num_nodes,
            precision=cfg.precision,
            val_check_interval=min(cfg.val_every, cfg.max_steps),
            check_val_every_n_epoch=None,
            log_every_n_steps=cfg.log_every,
            callbacks=list(callbacks),
            logger=logger if logger is not None else False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress_bar,
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
    and ``out_dir/curves.csv``, and with ``cfg.ema_snapshot_stds`` the EMA snapshots in ``out_dir/ema/``
    (:class:`~ddpm.callbacks.EMASnapshots`; a run that does not resume first removes an earlier run's); returns
    the final metrics. ``logger`` (e.g. Lightning's ``MLFlowLogger``)
    receives Lightning's metrics: train loss and lr every ``log_every`` steps, val losses, and the
    throughput (``train/images_per_second``); Lightning calls loggers on rank 0 only. ``progress`` shows
    Lightning's progress bar when standard output is a terminal, else a :class:`~ddpm.callbacks.ProgressLog`.

    With ``resume`` (default), ``out_dir/resume.ckpt`` of an interrupted run with the same fingerprint
    is continued (see :func:`resume_checkpoint`); one of another run is ignored and replaced. A SIGTERM
    writes it and raises :class:`~ddpm.checkpoints.Preempted` (exit status 143); a nan/inf loss raises
    NonFiniteLossError naming the step (``cfg.nonfinite='stop'``). ``callbacks`` are extra Lightning callbacks.
    ``keep_resume`` leaves the resume checkpoint for the caller to remove once it has written its own
    records (a stage killed between the two then resumes at the checkpoint instead of starting over).
    With ``cfg.compile`` on, the metrics include ``compile_seconds`` (:class:`~ddpm.callbacks.CompileTime`).
    """
    out_dir = Path(out_dir)
    cfg = resolve_precision(cfg)
    resume_path = out_dir / RESUME
    key = fingerprint(train_set, val_set, model, diffusion, cfg)
    start = read_resume(resume_path, key) if resume else None
    if start is not None:
        log.warning(f"train: resuming from {resume_path} at step {start.step}")
    elif resume and resume_path.is_file():
        log.warning(f"train: ignoring {resume_path}: another run's (other params or data); starting at step 0")
    if start is None:
        ema.clear_snapshots(out_dir / SNAPSHOTS_PARTIAL)  # an unfinished earlier run's never mix with this run's
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(train_set.images.shape, model, diffusion, cfg)
    compile_in_place(module.net, cfg.compile)
    recorder = CurveRecorder(cfg.log_every)
    checkpointer = ResumeCheckpoint(resume_path, cfg.checkpoint_every, key, start.step if start else None)
    watchers: list[pl.Callback] = [ThroughputLogger(cfg.log_every, cfg.batch_size)] if logger else []
    compile_time = CompileTime() if cfg.compile is not False else None
    watchers += [compile_time] if compile_time else []
    watchers += [EMASnapshots(out_dir / SNAPSHOTS_PARTIAL, cfg.ema_snapshot_every)] if cfg.ema_snapshot_stds else []
    bar = progress and sys.stdout.isatty()
    if progress and not bar:
        watchers.append(ProgressLog(cfg.batch_size, max(cfg.max_steps // 10, 1), PROGRESS_SECONDS))
    try:
        trainer = trainer_for(cfg, [recorder, *watchers, *callbacks, checkpointer], logger, bar, out_dir)
    except MisconfigurationException as e:  # e.g. accelerator: gpu on a machine without one
        raise ConfigError(f"train: {str(e).splitlines()[0]}") from None
    loader = loaders.ResumableLoader(loaders.dataset(train_set), cfg.batch_size, cfg.seed, cfg.num_workers)
    val_loader = loaders.val_loader(val_set, cfg.seed, cfg.num_workers)
    try:
        with _lightning_quiet():
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
    except (RuntimeError, torch.distributed.DistError) as e:
        if not _peer_failure(e, trainer.world_size):
            raise
        held = f"{resume_path} holds step {checkpointer.saved_step}" if checkpointer.saved_step else "no checkpoint"
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        reason = re.sub(r"^\[[^\]]*\]\s*", "", reason).split(". ")[0]  # gloo's "[file.cc:123] Read error ..."
        raise PeerLostError(
            f"train: rank {trainer.global_rank} lost a DDP peer at step {trainer.global_step}: another process or node "
            f"died, or did not answer within train.ddp_timeout={cfg.ddp_timeout:g} s ({reason[:300]}); {held}; start "
            "every node again to resume"
        ) from None
    with _lightning_quiet():
        final = trainer.validate(module, val_loader, verbose=False)[0]

    save_checkpoint(trainer, out_dir / "last.ckpt")
    if trainer.is_global_zero:
        export.save_model(out_dir / "model.pt", module.ema, module.config)
        io.write_csv(out_dir / "curves.csv", ["step", "loss", "lr"], recorder.rows)
        ema.publish_snapshots(out_dir / SNAPSHOTS_PARTIAL, out_dir / SNAPSHOTS)
        if not keep_resume:
            resume_path.unlink(missing_ok=True)
    images = trainer.global_step * cfg.batch_size * trainer.world_size
    metrics = {
        "train_loss": recorder.rows[-1][1],
        "val_loss": final["val/loss"],
        "val_loss_ema": final["val/loss_ema"],
        "steps": trainer.global_step,
        "skipped_steps": module.skipped_steps,
        "seconds": round(recorder.seconds, 2),
        "images_per_second": round(images / max(recorder.seconds, 1e-9), 2),
    }
    if compile_time is not None and compile_time.seconds is not None:
        metrics["compile_seconds"] = round(compile_time.seconds, 2)
    return metrics
