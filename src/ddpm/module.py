"""Lightning module that trains a diffusion network and keeps the EMA of its weights for sampling.

Training of a ddpm model follows Ho et al. 2020 (Algorithm 1): uniform timesteps, forward
noising ``q_sample`` and a weighted per-sample loss on the configured prediction target.
The edm, vp and ve families follow Karras et al. 2022 (EDM) eq. 2: sigma from the family's
training distribution and the preconditioned denoiser's loss weighted by lambda(sigma).
Class labels are dropped to the null class with probability ``p_uncond`` (Ho & Salimans 2022).
Sampling lives in :mod:`ddpm.generate`; this module trains.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ddpm import ema, io, losses, preconditioning, predictions, schedules
from ddpm.config import ConfigError, DDPMConfig, OptimConfig, UNetConfig
from ddpm.nets import UNet
from ddpm.preconditioning import Denoiser


@dataclass
class WarmupCosine:
    """lr multiplier: linear warmup to 1, then cosine decay to min_ratio (or constant)."""

    warmup_steps: int
    total_steps: int | None
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps is None:
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(params: list[torch.nn.Parameter], o: OptimConfig) -> torch.optim.AdamW:
    """AdamW with ``o``'s settings: torch's fused implementation (the whole update in one pass over the parameters)
    where every parameter is on a CUDA device, its default elsewhere. The state dict has the same entries either
    way and its param groups carry the flag: a checkpoint loads into either and goes on as it was written."""
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(
        params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=True if fused else None
    )


class NonFiniteLossError(FloatingPointError):
    """Training met a nan or inf loss at optimizer step ``step`` (1-based, as the rows of curves.csv)."""

    def __init__(self, step: int, loss: float | None, detail: str = "") -> None:
        self.step, self.loss = step, loss
        value = "nan or inf" if loss is None else str(loss)
        super().__init__(f"loss is {value} at optimizer step {step}; training stopped{detail}")


class DiffusionModule(pl.LightningModule):
    """Trains ``net`` on the diffusion family given by ``config`` and keeps ``ema``, the EMA of its weights."""

    def __init__(
        self,
        net: UNet,
        config: DDPMConfig | None = None,
        optim: OptimConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or DDPMConfig()
        # a TrainConfig is an OptimConfig: keep the optimizer's fields only
        self.optim = OptimConfig.from_dict((optim or OptimConfig()).model_dump(include=set(OptimConfig.model_fields)))
        net_shape = (net.config.in_channels, net.config.image_size)
        if net_shape != (self.config.channels, self.config.image_size):
            raise ValueError(
                f"net (in_channels, image_size)={net_shape} does not match the config's "
                f"(channels, image_size)={(self.config.channels, self.config.image_size)}"
            )
        if net.config.num_classes is None and (self.config.p_uncond > 0 or self.config.guidance != 1):
            raise ValueError(
                f"config p_uncond={self.config.p_uncond}, guidance={self.config.guidance} need a class-conditional "
                "net (num_classes); allowed for this net: p_uncond=0, guidance=1"
            )
        self.net = net
        self.ema = copy.deepcopy(net).requires_grad_(False)
        self._ema_gamma = None if self.optim.ema_std is None else ema.gamma_from_std(self.optim.ema_std)
        # power-function EMAs whose snapshots (ddpm.callbacks.EMASnapshots) let the EMA length be chosen after training
        stds = self.optim.ema_snapshot_stds or []
        self.snapshot_gammas = [ema.gamma_from_std(std) for std in stds]
        self.snapshot_emas = nn.ModuleList(copy.deepcopy(self.ema) for _ in stds)
        self.loss_fn = losses.for_config(self.config)
        self._alphas_cumprod = schedules.alphas_cumprod(self.config.schedule, self.config.T)
        self.skipped_steps = 0  # optimizer steps skipped for a nan/inf loss (optim.nonfinite='skip')
        self._skipped = False
        self._bad_step: Tensor | None = None  # first step with a nan/inf loss, kept on the device
        self._bad_loss: Tensor | None = None
        self.save_hyperparameters(
            {
                "net": net.config.to_dict(),
                "config": self.config.to_dict(),
                "optim": self.optim.to_dict(),
            }
        )

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any], prefix: str = "") -> DiffusionModule:
        """Rebuild an untrained module from the hyperparameters stored in a checkpoint (``prefix`` starts errors)."""
        missing = {"net", "config", "optim"} - (hparams.keys() if isinstance(hparams, dict) else set())
        if missing:
            raise ValueError(f"{prefix}hyper_parameters lack {sorted(missing)}: not a DiffusionModule's")
        try:
            return cls(
                UNet(UNetConfig.from_dict(hparams["net"], f"{prefix}net")),
                DDPMConfig.from_dict(hparams["config"], f"{prefix}config"),
                OptimConfig.from_dict(hparams["optim"], f"{prefix}optim"),
            )
        except ConfigError:
            raise
        except ValueError as e:
            raise ValueError(f"{prefix}{e}") from None

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionModule:
        """Load a Lightning checkpoint without executing pickled code (``weights_only=True``); errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        ckpt = io.load_weights_only(path, "checkpoint", map_location)
        if not isinstance(ckpt, dict) or not {"state_dict", "hyper_parameters"} <= ckpt.keys():
            raise ValueError(f"{path} is not a DiffusionModule checkpoint (needs state_dict and hyper_parameters)")
        module = cls.from_hparams(ckpt["hyper_parameters"], prefix=f"{path}: ")
        io.load_state(module, ckpt["state_dict"], path, "checkpoint")
        return module

    def alphas_cumprod(self, device: torch.device) -> Tensor:
        """The float64 alpha_bar table on ``device`` (kept out of the state dict and of dtype casts)."""
        if self._alphas_cumprod.device != device:
            self._alphas_cumprod = self._alphas_cumprod.to(device)
        return self._alphas_cumprod

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Network output for noisy images x at timesteps t (labels y if class-conditional)."""
        return self.net(x, t, y)

    def _split_batch(self, batch: Tensor | tuple | list) -> tuple[Tensor, Tensor | None]:
        """Images and, for a class-conditional net, labels of a batch ``x`` or ``(x, y)``."""
        x, y = batch, None
        if isinstance(batch, (tuple, list)):
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        if self.net.config.num_classes is None:
            return x, None
        if y is None:
            raise ValueError("a class-conditional net needs batches of (images, labels)")
        return x, y

    def _drop_labels(self, y: Tensor | None, generator: torch.Generator | None) -> Tensor | None:
        """Labels with each replaced by the null class (index num_classes) with probability p_uncond."""
        if y is None or self.config.p_uncond == 0:
            return y
        drop = torch.rand(y.shape, device=y.device, generator=generator) < self.config.p_uncond
        return torch.where(drop, self.net.config.num_classes, y)

    def model_step(self, batch: Any, generator: torch.Generator | None = None, net: UNet | None = None) -> Tensor:
        """Per-sample loss [B] of ``net`` (default: the trained net): Ho et al. Algorithm 1, or EDM eq. 2."""
        x0, y = self._split_batch(batch)
        net = self.net if net is None else net
        if self.config.preconditioning == "ddpm":
            ab_table = self.alphas_cumprod(x0.device)
            t = torch.randint(0, self.config.T, (x0.shape[0],), device=x0.device, generator=generator)
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
            ab = ab_table[t].to(x0.dtype)
            x_t = predictions.q_sample(x0, t, ab_table, noise)
            target = predictions.target(self.config.prediction, x0, noise, ab.view(-1, *[1] * (x0.ndim - 1)))
            return self.loss_fn(net(x_t, t, self._drop_labels(y, generator)), target, ab)
        precond = preconditioning.for_config(self.config)
        sigma = precond.sample_sigma(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x = x0 + sigma.view(-1, *[1] * (x0.ndim - 1)) * noise
        denoised = Denoiser(net, precond)(x, sigma, self._drop_labels(y, generator))
        return self.loss_fn(denoised, x0, precond.weight(sigma))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        """Mean loss of the batch; a nan/inf loss is skipped (None: no update) or noted for ``check_finite``."""
        loss = self.model_step(batch).mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        finite = torch.isfinite(loss.detach())
        if self.optim.nonfinite == "skip":
            self._skipped = not bool(finite)  # one host sync per step: the update is skipped now or never
            self.skipped_steps += self._skipped
            return None if self._skipped else loss
        self._note_nonfinite(finite, loss.detach())
        return loss

    def _note_nonfinite(self, finite: Tensor, loss: Tensor) -> None:
        """Remember on the device, without a host sync, the first optimizer step whose loss was nan or inf."""
        if self._bad_step is None or self._bad_step.device != loss.device:
            self._bad_step = torch.zeros((), dtype=torch.int64, device=loss.device)
            self._bad_loss = torch.zeros((), dtype=torch.float32, device=loss.device)
        first = ~finite & (self._bad_step == 0)
        self._bad_step = torch.where(first, self.global_step + 1, self._bad_step)
        self._bad_loss = torch.where(first, loss.float(), self._bad_loss)

    def check_finite(self) -> None:
        """Raise NonFiniteLossError naming the first optimizer step whose loss was nan or inf (one host sync)."""
        if self._bad_step is None:
            return
        steps = self.all_gather(self._bad_step).flatten()  # all ranks reach the same decision
        bad = steps[steps > 0]
        if len(bad):
            step = int(bad.min())
            raise NonFiniteLossError(step, float(self._bad_loss) if int(self._bad_step) == step else None)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Stop on a nan/inf loss: checked every ``log_every_n_steps`` steps and at the last step."""
        if self.global_step % max(self.trainer.log_every_n_steps, 1) == 0 or self.global_step == self.trainer.max_steps:
            self.check_finite()

    def on_train_end(self) -> None:
        self.check_finite()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Loss of the trained and the EMA weights at timesteps and noise fixed per batch index."""
        losses = {}
        for name, net in (("val/loss", self.net), ("val/loss_ema", self.ema)):
            generator = torch.Generator(device=self.device).manual_seed(batch_idx)
            losses[name] = self.model_step(batch, generator=generator, net=net).mean()
        self.log_dict(losses, prog_bar=True, sync_dist=True)
        return losses["val/loss"]

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        optimizer = adamw(list(self.net.parameters()), o)  # Lightning has moved the net to its device
        total = None
        if o.lr_scheduler == "cosine":
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total) or total < 1:
                raise ValueError(
                    f"optim.lr_scheduler='cosine' needs a known run length, got {total} steps: "
                    "set max_steps or max_epochs (with a sized dataloader)"
                )
        schedule = WarmupCosine(o.warmup_steps, None if total is None else int(total), o.min_lr_ratio)
        # A plain function is not stored in the lr_scheduler state, so a resumed run with a new
        # length follows its own horizon instead of the checkpoint's.
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """Set each lr from the current schedule (a resumed optimizer carries the checkpoint's lr)."""
        if self.optim.nonfinite == "skip" and self.trainer.world_size > 1:
            raise ValueError(
                "nonfinite='skip' needs a single device (a step skipped on one rank would stall the others); "
                "use nonfinite='stop'"
            )
        self._bad_step = self._bad_loss = None
        for config in self.trainer.lr_scheduler_configs:
            s = config.scheduler
            for group, base, fn in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas):
                group["lr"] = base * fn(s.last_epoch)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.optim.grad_clip
        if clip:
            self.clip_gradients(
                optimizer, gradient_clip_val=clip, gradient_clip_algorithm=gradient_clip_algorithm or "norm"
            )

    def ema_decay(self, step: int) -> float:
        """EMA decay at optimizer step ``step`` (0-based): the power-function EMA's if ``optim.ema_std`` is set, else
        ``ema_decay``, with the (1 + n) / (10 + n) warmup if enabled."""
        if self._ema_gamma is not None:
            return ema.power_decay(step + 1, self._ema_gamma)
        decay = self.optim.ema_decay
        return min(decay, (1 + step) / (10 + step)) if self.optim.ema_warmup else decay

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Take the optimizer step, then update the EMA weights (neither for a skipped nan/inf step)."""
        updates_so_far = self.global_step
        super().optimizer_step(*args, **kwargs)
        if self._skipped:
            return
        ema.update(self.ema, self.net, self.ema_decay(updates_so_far))
        for average, gamma in zip(self.snapshot_emas, self.snapshot_gammas):
            ema.update(average, self.net, ema.power_decay(updates_so_far + 1, gamma))

    def train(self, mode: bool = True) -> DiffusionModule:
        """Set train/eval mode; the EMA copy is only ever evaluated, so it stays in eval mode."""
        super().train(mode)
        self.ema.eval()
        self.snapshot_emas.eval()
        return self
