"""The training stage: fit a DiffusionModule on prepared images and export its EMA model."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pydantic import Field
from pytorch_lightning.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from ddpm import data, io
from ddpm.config import Config, DDPMConfig, EMAConfig, OptimConfig
from ddpm.module import DiffusionModule
from ddpm.nets import UNet, UNetConfig


class TrainConfig(Config):
    """The ``train`` section: run length, optimizer, EMA and the Lightning Trainer settings."""

    seed: int = Field(0, ge=0, description="seed of weights, data order, timesteps and noise")
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
    accelerator: str = Field("auto", description="Lightning accelerator: cpu, gpu, auto, ...")
    devices: int | str | list[int] = Field(1, description="Lightning devices: 1, 2, 'auto', [0, 1]")
    strategy: str = Field("auto", description="Lightning strategy: auto, ddp, ...")
    num_nodes: int = Field(1, ge=1, description="machines for multi-node DDP")
    precision: str = Field("32-true", description="Lightning precision: 32-true, bf16-mixed, 16-mixed")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")

    def optim(self) -> OptimConfig:
        """The optimizer and lr_scheduler settings."""
        return OptimConfig(
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            lr_scheduler=self.lr_scheduler,
            min_lr_ratio=self.min_lr_ratio,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
        )

    def ema(self) -> EMAConfig:
        """The EMA settings."""
        return EMAConfig(decay=self.ema_decay, warmup=self.ema_warmup)


class CurveRecorder(pl.Callback):
    """Record (step, loss, lr) every ``every`` steps and the wall time of training."""

    def __init__(self, every: int) -> None:
        self.every, self.rows, self.started, self.seconds = every, [], 0.0, 0.0

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            m = trainer.callback_metrics  # one host sync every `every` steps
            self.rows.append([step, float(m["train/loss"]), float(m["train/lr"])])

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.started


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


def image_loader(images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool, seed: int, workers: int):
    """A DataLoader of (x in [-1, 1] [B, C, H, W], label) from uint8 [N, H, W, C]."""
    dataset = TensorDataset(data.to_tensor(images), torch.from_numpy(labels).long())
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, generator=g, num_workers=workers
    )


def build_module(images_shape: tuple[int, ...], model: dict, diffusion: dict, cfg: TrainConfig) -> DiffusionModule:
    """DiffusionModule for images [N, H, W, C] from the ``model`` and ``diffusion`` params sections."""
    _, h, w, c = images_shape
    if h != w:
        raise ValueError(f"images must be square, got {h}x{w}")
    net_cfg = UNetConfig.from_dict({**model, "in_channels": c, "image_size": h}, "model")
    ddpm_cfg = DDPMConfig.from_dict({**diffusion, "channels": c, "image_size": h}, "diffusion")
    return DiffusionModule(UNet(net_cfg), ddpm_cfg, cfg.optim(), cfg.ema())


def train(
    train_set: data.ImageSet,
    val_set: data.ImageSet,
    model: dict,
    diffusion: dict,
    cfg: TrainConfig,
    out_dir: str | Path,
    progress: bool = True,
    logger: Logger | None = None,
) -> dict[str, float]:
    """Fit on ``train_set`` (an ImageSet), validate on ``val_set``; write checkpoint, EMA model and curves.

    Writes ``out_dir/last.ckpt`` (resumable Lightning checkpoint), ``out_dir/model.pt`` (EMA sampling model)
    and ``out_dir/curves.csv``; returns the final metrics. ``logger`` (e.g. Lightning's ``MLFlowLogger``)
    receives Lightning's metrics: train loss and lr every ``log_every`` steps, val losses, and the
    throughput (``train/images_per_second``); Lightning calls loggers on rank 0 only.
    """
    out_dir = Path(out_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(train_set.images.shape, model, diffusion, cfg)
    recorder = CurveRecorder(cfg.log_every)
    trainer = pl.Trainer(
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        precision=cfg.precision,
        val_check_interval=min(cfg.val_every, cfg.max_steps),
        check_val_every_n_epoch=None,
        log_every_n_steps=cfg.log_every,
        callbacks=[recorder] + ([ThroughputLogger(cfg.log_every, cfg.batch_size)] if logger else []),
        logger=logger if logger is not None else False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        default_root_dir=str(out_dir),
    )
    loader = image_loader(train_set.images, train_set.labels, cfg.batch_size, True, cfg.seed, cfg.num_workers)
    val_loader = image_loader(val_set.images, val_set.labels, 256, False, cfg.seed, cfg.num_workers)
    trainer.fit(module, loader, val_loader)
    final = trainer.validate(module, val_loader, verbose=False)[0]

    # Lightning writes the checkpoint on rank 0 only (all ranks must call it); rename it into place there.
    tmp_ckpt = out_dir / ".last.ckpt.tmp"
    trainer.save_checkpoint(tmp_ckpt)
    if trainer.is_global_zero:
        os.replace(tmp_ckpt, out_dir / "last.ckpt")
        io.save_model(
            out_dir / "model.pt", module.net.config.to_dict(), module.config.to_dict(), module.ema.state_dict()
        )
        io.write_csv(out_dir / "curves.csv", ["step", "loss", "lr"], recorder.rows)
    images = trainer.global_step * cfg.batch_size * trainer.world_size
    return {
        "train_loss": recorder.rows[-1][1],
        "val_loss": final["val/loss"],
        "val_loss_ema": final["val/loss_ema"],
        "steps": trainer.global_step,
        "seconds": round(recorder.seconds, 2),
        "images_per_second": round(images / max(recorder.seconds, 1e-9), 2),
    }


def load_model(path: str | Path) -> DiffusionModule:
    """Load an exported EMA model (``model.pt``) as a DiffusionModule ready to sample."""
    payload = io.load_payload(path, "model", {"format", "net", "config", "state_dict"})
    if payload["format"] != io.MODEL_FORMAT:
        raise ValueError(f"{path}: unknown model format {payload['format']!r}; expected {io.MODEL_FORMAT!r}")
    net = UNet(UNetConfig.from_dict(payload["net"], f"{path}: net"))
    module = DiffusionModule(net, DDPMConfig.from_dict(payload["config"], f"{path}: config"))
    try:
        module.ema.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the network config: {str(e).splitlines()[0]}") from None
    module.net.load_state_dict(payload["state_dict"])
    return module.eval()
