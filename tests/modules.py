"""Helpers shared by the tests of the Lightning module and of sampling from it: a tiny module, a trainer, a loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ddpm import generate
from ddpm.config import DDPMConfig, OptimConfig
from ddpm.module import DiffusionModule
from ddpm.nets import UNet

T = 100


def make_module(
    net_kwargs: dict,
    *,
    seed: int = 0,
    optim: OptimConfig | None = None,
    **config,
) -> DiffusionModule:
    """A DiffusionModule on the tiny net with T=100 and 10 default sampling steps."""
    torch.manual_seed(seed)
    config = {
        "image_size": net_kwargs["image_size"],
        "channels": net_kwargs["in_channels"],
        "T": T,
        "steps": 10,
        **config,
    }
    return DiffusionModule(UNet(**net_kwargs), DDPMConfig(**config), optim or OptimConfig(lr=2e-3))


def draw(module: DiffusionModule, n: int, *, sampler=None, steps=None, eta=None, use_ema=True, **kwargs):
    """``n`` images drawn by the module's EMA (or, ``use_ema=False``, its trained net) with ``ddpm.generate``."""
    plan = generate.plan(module.config, sampler, steps, eta)
    return generate.sample(module.ema if use_ema else module.net, plan, n, **kwargs)


def make_trainer(root: Path, max_steps: int, callbacks: list | None = None, **kwargs) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
        "callbacks": callbacks or [],
        **kwargs,
    }
    return pl.Trainer(**options)


def make_loader(*tensors: torch.Tensor, batch_size: int = 32, seed: int = 0) -> DataLoader:
    return DataLoader(
        TensorDataset(*tensors), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


def eval_loss(module: DiffusionModule, images: torch.Tensor, seed: int = 1234) -> float:
    """Mean ``model_step`` loss over ``images`` with fixed timesteps and noise, net in eval mode."""
    was_training = module.net.training
    module.net.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        losses = [module.model_step(images[i : i + 64], generator=generator) for i in range(0, len(images), 64)]
    module.net.train(was_training)
    return torch.cat(losses).mean().item()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run these tiny nets on one intra-op thread.

    The ops are far too small to gain from threads, and on a shared 2-vCPU machine OpenMP's
    spin-waiting made a 2-thread forward/backward up to ~35x slower, at random.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit_tiny(net_kwargs: dict, images: torch.Tensor, root: Path) -> tuple[DiffusionModule, pl.Trainer, float]:
    """The tiny module fitted for 150 steps on ``images``, its trainer and the loss before."""
    module = make_module(net_kwargs, seed=0, optim=OptimConfig(lr=2e-3, ema_decay=0.99))
    loss_before = eval_loss(module, images)
    trainer = make_trainer(root, max_steps=150)
    trainer.fit(module, make_loader(images, seed=0))
    return module, trainer, loss_before
