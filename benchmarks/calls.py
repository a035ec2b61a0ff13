"""What is timed: a training step as DiffusionModule trains, a sampling chunk as the sample stage draws
(:func:`ddpm.generate.sample_batches`), and their FLOPs (``torch.utils.flop_counter``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.configs import diffusion_config
from benchmarks.peer import PeerNet
from ddpm import generate, kernels
from ddpm.config import DDPMConfig
from ddpm.module import DiffusionModule
from ddpm.nets import UNet, UNetConfig


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast for ``bf16-mixed`` (what Lightning's precision does), nothing for ``32-true``."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions and attention; SDPA counted through its math backend).

    The native kernels are off while counting: the counter knows PyTorch's attention, not ours, which does the
    same products (the FLOPs are the net's arithmetic, whichever kernel runs it).
    """
    saved = os.environ.get(kernels.ENV)
    os.environ[kernels.ENV] = "0"
    try:
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            fn()
    finally:
        if saved is None:
            del os.environ[kernels.ENV]
        else:
            os.environ[kernels.ENV] = saved
    return counter.get_total_flops()


def diffusion_module(cfg: UNetConfig, device: torch.device) -> DiffusionModule:
    """A DiffusionModule of our net at ``cfg`` with the params.yaml diffusion, on ``device``."""
    return DiffusionModule(UNet(cfg), diffusion_config(cfg)).to(device)


def compared_nets(cfg: UNetConfig, device: torch.device, peer: bool) -> dict[str, nn.Module]:
    """Our net at ``cfg`` (seed 0) and, with ``peer``, diffusers' net of the same architecture, on ``device``."""
    torch.manual_seed(0)
    nets: dict[str, nn.Module] = {"ours": UNet(cfg).to(device)}
    if peer:
        nets["peer"] = PeerNet(cfg).to(device)
    return nets


def training_batch(cfg: UNetConfig, n: int, device: torch.device) -> Tensor:
    """n random images in [-1, 1] of ``cfg``'s shape."""
    return torch.rand(n, cfg.in_channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1


class TrainStep:
    """One optimizer step as DiffusionModule trains: model_step, backward, gradient clipping, AdamW, EMA update.

    ``optimizer`` steps ``net``'s parameters; by default torch's AdamW with the module's settings, as a plain
    script makes it (DiffusionModule's own is :func:`ddpm.module.adamw`, fused on a CUDA GPU).
    """

    def __init__(
        self,
        module: DiffusionModule,
        net: nn.Module,
        batch: Tensor,
        precision: str,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.module, self.net, self.batch, self.precision = module, net, batch, precision
        self.params = list(net.parameters())
        self.ema = [p.detach().clone() for p in self.params]
        o = module.optim
        self.optimizer = optimizer or torch.optim.AdamW(
            self.params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
        )

    def loss(self) -> Tensor:
        with autocast(self.batch.device, self.precision):
            return self.module.model_step(self.batch, net=self.net).mean()

    def __call__(self) -> None:
        self.loss().backward()
        if self.module.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.module.optim.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        torch._foreach_lerp_(self.ema, self.params, 1.0 - self.module.optim.ema_decay)

    def flops_per_image(self) -> float:
        """Forward and backward FLOPs per image."""
        flops = count_flops(lambda: self.loss().backward())
        self.optimizer.zero_grad(set_to_none=True)
        return flops / len(self.batch)


def nfe(config: DDPMConfig, sampler: str, steps: int) -> int:
    """Network evaluations per image of ``sampler`` with ``steps`` steps."""
    return generate.plan(config, sampler, steps).nfe


def sample_call(
    net: nn.Module, config: DDPMConfig, n: int, sampler: str, steps: int, precision: str
) -> Callable[[], None]:
    """Draw n images with ``net`` in one chunk, as the sample stage does (:func:`ddpm.generate.sample_batches`)."""
    plan = generate.plan(config, sampler, steps)
    device = next(net.parameters()).device

    def draw() -> None:
        with autocast(device, precision):
            for _ in generate.sample_batches(net, plan, n, batch_size=n):
                pass

    return draw


def sample_step_flops(net: nn.Module, cfg: UNetConfig, device: torch.device) -> float:
    """FLOPs of one network evaluation per image (one sampling step)."""
    x = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.full((1,), 500, device=device)
    with torch.inference_mode():
        return float(count_flops(lambda: net(x, t)))


def with_settings(call: Callable[[], Any], changes: dict[str, Any]) -> Callable[[], None]:
    """``call`` run with the kernel settings ``changes`` (:func:`ddpm.kernels.using`), restored after each call."""

    def run() -> None:
        with kernels.using(**changes):
            call()

    return run
