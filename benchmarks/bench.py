"""Throughput and memory of the U-Net, side by side with diffusers' UNet2DModel at the same FLOPs (``make bench``).

Every timed row is the median of ``--reps`` repetitions after warm-up calls. The rows of one group (our net,
the peer, and probes of the machine's matmul rate) take turns within every repetition, so their ratios hold
on a shared, noisy machine; the limit is the fastest timing of the best probe. FLOPs are counted with
``torch.utils.flop_counter`` (attention through the math SDPA backend, whose matmuls the counter sees).
Peak memory, and the allocator's effect, are measured in fresh processes (:mod:`benchmarks.job`).

    python -m benchmarks.bench            # the full run (8-12 min on 2 CPU cores) -> benchmarks/results.md
    python -m benchmarks.bench --quick    # a tiny configuration in ~30 s (the harness's own test)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ddpm import kernels
from ddpm.config import DDPMConfig
from ddpm.module import DiffusionModule
from ddpm.nets import Attention, Conv2d, GroupNorm, ResBlock, UNet, UNetConfig
from ddpm.runtime import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("32-true", "bf16-mixed")  # Lightning's names: fp32, and bf16 autocast with fp32 weights


# ---------------------------------------------------------------- configurations


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
class Settings:
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
    alloc_rounds: int = 3  # rounds in which a process of each PROCESS_SETTINGS entry runs, in turns


def settings(quick: bool, reps: int | None, compile: bool | None) -> Settings:
    """The full run (params.yaml sizes), or the quick one (a tiny net, small batches, no compilation)."""
    p = params()
    if quick:
        n = reps or 2
        return Settings(
            configs={"tiny": tiny_model()},
            reps={"tiny": n},
            warmup={"tiny": 1},
            train_batch=8,
            sample_batch=8,
            sample_steps=2,
            sampler=p["sample"]["sampler"] or p["diffusion"]["sampler"],
            memory_n=(16, 64),
            memory_chunk=16,
            memory_precisions=(p["train"]["precision"],),
            memory_kept=0,
            memory_repeats=1,
            eval_batch=16,
            inception_batch=2,
            compile=bool(compile),
            quick=True,
            alloc_rounds=1,
        )
    n = reps or 5
    return Settings(
        configs={"default": default_model(), "large": large_model()},
        reps={"default": n, "large": max(2, n - 2)},
        warmup={"default": 2, "large": 1},
        train_batch=p["train"]["batch_size"],
        sample_batch=256,
        sample_steps=2,
        sampler=p["sample"]["sampler"] or p["diffusion"]["sampler"],
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


# ---------------------------------------------------------------- the peer


def peer_version() -> str | None:
    """diffusers' version, or None if the ``bench`` extra is not installed."""
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers.__version__


def peer_kwargs(cfg: UNetConfig) -> dict[str, Any]:
    """UNet2DModel arguments of the same architecture as ``cfg``: widths, blocks, attention levels, groups, heads."""
    resolutions = [cfg.image_size // 2**i for i in range(len(cfg.channel_mult))]
    attention = [r in cfg.attn_resolutions for r in resolutions]
    return {
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "block_out_channels": tuple(cfg.channels * m for m in cfg.channel_mult),
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        "norm_num_groups": cfg.norm_groups,
        "attention_head_dim": cfg.channels * cfg.channel_mult[-1] // cfg.num_heads,
        "dropout": cfg.dropout,
    }


class PeerNet(nn.Module):
    """diffusers' UNet2DModel behind our net's signature ``net(x, t) -> output`` (unconditional)."""

    def __init__(self, cfg: UNetConfig) -> None:
        from diffusers import UNet2DModel

        super().__init__()
        self.unet = UNet2DModel(**peer_kwargs(cfg))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if y is not None:
            raise ValueError("the peer is unconditional")
        return self.unet(x, t).sample


# ---------------------------------------------------------------- what is timed


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


class TrainStep:
    """One optimizer step as DiffusionModule trains: model_step, backward, gradient clipping, AdamW, EMA update."""

    def __init__(self, module: DiffusionModule, net: nn.Module, batch: Tensor, precision: str) -> None:
        self.module, self.net, self.batch, self.precision = module, net, batch, precision
        self.params = list(net.parameters())
        self.ema = [p.detach().clone() for p in self.params]
        o = module.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)

    def loss(self) -> Tensor:
        with autocast(self.batch.device, self.precision):
            return self.module.model_step(self.batch, net=self.net).mean()

    def __call__(self) -> None:
        self.loss().backward()
        if self.module.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.module.optim.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        torch._foreach_lerp_(self.ema, self.params, 1.0 - self.module.ema_config.decay)

    def flops_per_image(self) -> float:
        """Forward and backward FLOPs per image."""
        flops = count_flops(lambda: self.loss().backward())
        self.optimizer.zero_grad(set_to_none=True)
        return flops / len(self.batch)


def sampler_module(cfg: UNetConfig, net: nn.Module, device: torch.device) -> DiffusionModule:
    """A DiffusionModule that samples with ``net``: sample_batches draws with its ``ema`` attribute."""
    module = DiffusionModule(UNet(cfg), diffusion_config(cfg)).to(device)
    module.ema = net.to(device)
    return module


def sample_call(module: DiffusionModule, n: int, sampler: str, steps: int, precision: str) -> Callable[[], None]:
    """Draw n images in one chunk with ``sample_batches`` (the sample stage's path)."""

    def draw() -> None:
        with autocast(module.device, precision):
            for _ in module.sample_batches(n, sampler=sampler, steps=steps, batch_size=n):
                pass

    return draw


def sample_step_flops(net: nn.Module, cfg: UNetConfig, device: torch.device) -> float:
    """FLOPs of one network evaluation per image (one sampling step)."""
    x = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.full((1,), 500, device=device)
    with torch.inference_mode():
        return float(count_flops(lambda: net(x, t)))


# ---------------------------------------------------------------- timing


class Probes:
    """The machine's matmul rate: fp32 through torch.mm (MKL on CPU) and oneDNN (a 1x1 convolution), and bf16.

    Each probe multiplies [m, k] by [k, n] twice in a row (so a cold cache after the other rows costs little).
    """

    def __init__(self, device: torch.device, m: int, k: int, n: int) -> None:
        self.flops = 2 * 2 * m * k * n
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(m, k, device=device, generator=g)
        b = torch.randn(k, n, device=device, generator=g)
        a16, b16 = a.bfloat16(), b.bfloat16()
        self.calls: dict[str, Callable[[], Any]] = {
            "fp32 torch.mm": lambda: (torch.mm(a, b), torch.mm(a, b)),
            "bf16 torch.mm": lambda: (torch.mm(a16, b16), torch.mm(a16, b16)),
        }
        if device.type == "cpu":  # torch.mm is MKL, which runs slower code on some CPUs than oneDNN's convolutions
            x = a.reshape(1, m, 1, k).permute(0, 3, 1, 2)  # channels_last [1, k, m, 1]: m positions of k channels
            w = b.t().reshape(n, k, 1, 1).contiguous()
            x16, w16 = x.bfloat16(), w.bfloat16()
            self.calls["fp32 oneDNN 1x1 conv"] = lambda: (F.conv2d(x, w), F.conv2d(x, w))
            self.calls["bf16 oneDNN 1x1 conv"] = lambda: (F.conv2d(x16, w16), F.conv2d(x16, w16))
        self.times: dict[str, list[float]] = {k: [] for k in self.calls}

    def rates(self, best: bool = True) -> dict[str, float]:
        """GFLOP/s of each probe over its fastest (or its median) timing so far."""
        pick = min if best else statistics.median
        return {k: self.flops / pick(v) / 1e9 for k, v in self.times.items() if v}

    def limit(self, dtype: str) -> float:
        """The machine's limit in GFLOP/s for ``dtype`` (fp32 or bf16): the fastest timing of its best probe.

        Sharing the machine only slows a probe down, so the fastest of its many timings is the closest to the limit.
        """
        return max(r for k, r in self.rates().items() if k.startswith(dtype))


def in_turns(
    calls: dict[str, Callable[[], Any]], reps: int, warmup: int, sync: Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """Seconds of each call of ``calls`` over ``reps`` rounds in which they take turns, after warm-up calls."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(reps):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


class Timer:
    """Median wall time of calls that take turns within each repetition, with the matmul probes among them."""

    def __init__(self, device: torch.device, probes: Probes) -> None:
        self.device, self.probes = device, probes

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def group(self, calls: dict[str, Callable[[], Any]], reps: int, warmup: int) -> dict[str, float]:
        """Median seconds per call of each of ``calls`` (warm-up calls first, then ``reps`` rounds in turn)."""
        everything = {**{f"probe: {k}": c for k, c in self.probes.calls.items()}, **calls}
        times = in_turns(everything, reps, warmup, self.sync)
        for k in self.probes.calls:
            self.probes.times[k] += times.pop(f"probe: {k}")
        return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------- the benchmark


@dataclass
class Row:
    """One timed row: ``items`` (images or image-steps) per call, FLOPs per item, median seconds per call."""

    config: str
    task: str
    precision: str
    net: str
    items: int
    flops_per_item: float
    seconds: float

    @property
    def rate(self) -> float:
        return self.items / self.seconds

    @property
    def gflops(self) -> float:
        return self.rate * self.flops_per_item / 1e9


def throughput(s: Settings, timer: Timer, device: torch.device, peer: bool) -> tuple[list[Row], dict[str, Any]]:
    """Training and sampling rows of every configuration for our net and, if installed, the peer."""
    rows: list[Row] = []
    info: dict[str, Any] = {}
    for name, cfg in s.configs.items():
        torch.manual_seed(0)
        nets = {"ours": UNet(cfg).to(device)}
        if peer:
            nets["peer"] = PeerNet(cfg).to(device)
        module = DiffusionModule(UNet(cfg), diffusion_config(cfg)).to(device)
        batch = torch.rand(s.train_batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
        steps = {(n, p): TrainStep(module, net, batch, p) for n, net in nets.items() for p in PRECISIONS}
        train_flops = {n: steps[n, PRECISIONS[0]].flops_per_image() for n in nets}
        seconds = timer.group({f"{n} {p}": step for (n, p), step in steps.items()}, s.reps[name], s.warmup[name])
        rows += [Row(name, "train", p, n, s.train_batch, train_flops[n], seconds[f"{n} {p}"]) for n, p in steps]
        del steps

        samplers = {n: sampler_module(cfg, net, device) for n, net in nets.items()}
        step_flops = {n: sample_step_flops(net, cfg, device) for n, net in nets.items()}
        nfe = module.config.nfe(s.sampler, s.sample_steps)
        calls = {
            f"{n} {p}": sample_call(m, s.sample_batch, s.sampler, s.sample_steps, p)
            for n, m in samplers.items()
            for p in PRECISIONS
        }
        seconds = timer.group(calls, s.reps[name], s.warmup[name])
        rows += [
            Row(name, "sample", p, n, s.sample_batch * nfe, step_flops[n], seconds[f"{n} {p}"])
            for n in samplers
            for p in PRECISIONS
        ]
        info[name] = {
            "ours": cfg.to_dict(),
            "params": {n: sum(p.numel() for p in net.parameters()) for n, net in nets.items()},
            "train_gflop": {n: v / 1e9 for n, v in train_flops.items()},
            "step_gflop": {n: v / 1e9 for n, v in step_flops.items()},
        }
        if peer:
            info[name]["peer"] = {k: list(v) if isinstance(v, tuple) else v for k, v in peer_kwargs(cfg).items()}
        if s.compile_peer and name == next(iter(s.configs)):
            rows += compiled_rows(s, timer, cfg, module, batch, train_flops, step_flops, peer, name)
        del nets, samplers, module
    return rows, info


def compiled_rows(
    s: Settings,
    timer: Timer,
    cfg: UNetConfig,
    module: DiffusionModule,
    batch: Tensor,
    train_flops: dict[str, float],
    step_flops: dict[str, float],
    peer: bool,
    name: str,
) -> list[Row]:
    """Both nets under torch.compile (inductor), trained and sampled in bf16-mixed, side by side.

    Each net's own ``forward`` is compiled: ``nn.Module.compile`` compiles ``Module._call_impl``, a code object
    that all modules share, and two modules compiled that way in one process slowed one of them down (on a
    GPU: ours compiled alone trained 1.5-1.7x faster than eagerly; compiled beside the peer, no faster).
    """
    device, precision = batch.device, "bf16-mixed"
    nets = {"ours": variant(cfg, device)}
    if peer:
        torch.manual_seed(0)
        nets["peer"] = PeerNet(cfg).to(device)
    for net in nets.values():
        net.forward = torch.compile(net.forward)
    steps = {n: TrainStep(module, net, batch, precision) for n, net in nets.items()}
    seconds = timer.group(steps, s.reps[name], s.warmup[name])
    rows = [Row(name, "train", precision, f"{n}, compiled", s.train_batch, train_flops[n], seconds[n]) for n in nets]
    nfe = module.config.nfe(s.sampler, s.sample_steps)
    calls = {
        n: sample_call(sampler_module(cfg, net, device), s.sample_batch, s.sampler, s.sample_steps, precision)
        for n, net in nets.items()
    }
    seconds = timer.group(calls, s.reps[name], s.warmup[name])
    return rows + [
        Row(name, "sample", precision, f"{n}, compiled", s.sample_batch * nfe, step_flops[n], seconds[n]) for n in nets
    ]


def variant(
    cfg: UNetConfig,
    device: torch.device,
    channels_last: bool = True,
    fp32_groupnorm: bool = True,
    fp32_attention: bool = True,
    compile: bool = False,
    native_kernel: bool = True,
    conv_layouts: bool = True,
    native_attention: bool = True,
    bias_grad_apart: bool = True,
    winograd: bool = True,
    winograd_tile: int = 4,
    skip_parts: bool = True,
    fused_additions: bool = True,
) -> UNet:
    """Our net with levers switched: NCHW activations, GroupNorm and attention in autocast's dtype, PyTorch's
    GroupNorm and SiLU instead of the native kernel, attention projections as matmuls and NCHW convolution
    weights (``conv_layouts=False``), PyTorch's SDPA instead of the native attention kernel, the bias gradients
    computed within oneDNN's weight gradients (``bias_grad_apart=False``), oneDNN's 3x3 convolutions instead of
    the Winograd kernel (``winograd=False``) or its other tile size, the decoder's concatenations made
    (``skip_parts=False``), the residuals added after oneDNN's bf16 convolutions and the time bias to the first
    convolution's output (``fused_additions=False``), compiled."""
    torch.manual_seed(0)
    net = UNet(cfg).to(device)
    net.skip_parts = skip_parts
    if not channels_last:
        net.memory_format = torch.contiguous_format
    if not channels_last or not conv_layouts:
        net.to(memory_format=torch.contiguous_format)
    for m in net.modules():
        if isinstance(m, GroupNorm):
            m.float32 = fp32_groupnorm  # False: torch's own, in the input's dtype (bf16 under autocast)
            m.native = native_kernel
        if isinstance(m, Attention):
            m.float32_on_cpu = fp32_attention
            m.conv_projections = conv_layouts
            m.native = native_attention
        if isinstance(m, Conv2d):
            m.separate_bias_grad = bias_grad_apart
            m.winograd, m.winograd_tile = winograd, winograd_tile
            m.fused_sum = fused_additions
        if isinstance(m, ResBlock):
            m.bias_in_norm = fused_additions
    if compile:
        net.compile()
    return net


# levers off in the rows before they were added
OLD = {
    "native_attention": False,
    "bias_grad_apart": False,
    "winograd": False,
    "skip_parts": False,
    "fused_additions": False,
}


def levers(s: Settings, timer: Timer, device: torch.device) -> list[tuple[str, str, float, float]]:
    """Our net at the first configuration with levers on and off: (group, variant, items/s, ratio to the first row).

    The first row of each group is the net as it was before this benchmark (NCHW activations, attention through
    the math SDPA kernel that its strided q/k/v layout fell back to, GroupNorm in bf16 under autocast, no_grad).
    """
    name, cfg = next(iter(s.configs.items()))
    reps, warmup = s.reps[name], s.warmup[name]
    x = torch.randn(s.sample_batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.full((s.sample_batch,), 500, device=device)

    def sampling(net: UNet, precision: str, grad_mode: Callable = torch.inference_mode, math: bool = False) -> Callable:
        net.eval()

        def call() -> None:
            with grad_mode(), autocast(device, precision), sdpa_kernel(SDPBackend.MATH) if math else nullcontext():
                net(x, t)

        return call

    before = {"channels_last": False, "fp32_groupnorm": False, "fp32_attention": False, **OLD}
    calls = {
        "fp32, as before (NCHW, math SDPA, no_grad)": sampling(
            variant(cfg, device, **before), "32-true", torch.no_grad, True
        ),
        "fp32, NCHW, fused SDPA, no_grad": sampling(variant(cfg, device, **before), "32-true", torch.no_grad),
        "fp32, NCHW, fused SDPA, inference_mode": sampling(variant(cfg, device, **before), "32-true"),
        "fp32, channels_last, fused SDPA, inference_mode, PyTorch's GroupNorm and SiLU": sampling(
            variant(cfg, device, native_kernel=False, **OLD), "32-true"
        ),
        "fp32, channels_last, fused SDPA, inference_mode, native GroupNorm+SiLU kernel": sampling(
            variant(cfg, device, native_attention=False, winograd=False, skip_parts=False, fused_additions=False),
            "32-true",
        ),
        "fp32, channels_last, inference_mode, native GroupNorm+SiLU and attention kernels": sampling(
            variant(cfg, device, winograd=False, skip_parts=False, fused_additions=False), "32-true"
        ),
        "fp32, channels_last, inference_mode, native GroupNorm+SiLU and attention kernels, Winograd F(2x2, 3x3)"
        " convolutions": sampling(
            variant(cfg, device, winograd_tile=2, skip_parts=False, fused_additions=False), "32-true"
        ),
        "fp32, channels_last, inference_mode, native GroupNorm+SiLU and attention kernels, Winograd F(4x4, 3x3)"
        " convolutions": sampling(variant(cfg, device, skip_parts=False, fused_additions=False), "32-true"),
        "fp32, channels_last, inference_mode, native GroupNorm+SiLU and attention kernels, Winograd F(4x4, 3x3)"
        " convolutions, decoder inputs as parts (the default)": sampling(variant(cfg, device), "32-true"),
        "bf16 autocast, as before (NCHW, GroupNorm and attention in bf16, math SDPA, no_grad)": sampling(
            variant(cfg, device, **before), "bf16-mixed", torch.no_grad, True
        ),
        "bf16 autocast, channels_last, GroupNorm in bf16": sampling(
            variant(cfg, device, fp32_groupnorm=False, **OLD), "bf16-mixed"
        ),
        "bf16 autocast, channels_last, GroupNorm in fp32, PyTorch's GroupNorm and SiLU": sampling(
            variant(cfg, device, native_kernel=False, **OLD), "bf16-mixed"
        ),
        "bf16 autocast, channels_last, GroupNorm in fp32, native GroupNorm+SiLU kernel": sampling(
            variant(cfg, device, native_attention=False, winograd=False, skip_parts=False, fused_additions=False),
            "bf16-mixed",
        ),
        "bf16 autocast, channels_last, GroupNorm in fp32, native GroupNorm+SiLU and attention kernels": sampling(
            variant(cfg, device, skip_parts=False, fused_additions=False), "bf16-mixed"
        ),
        "bf16 autocast, channels_last, GroupNorm in fp32, native GroupNorm+SiLU and attention kernels, decoder"
        " inputs as parts": sampling(variant(cfg, device, fused_additions=False), "bf16-mixed"),
        "bf16 autocast, channels_last, GroupNorm in fp32, native GroupNorm+SiLU and attention kernels, decoder"
        " inputs as parts, residuals added by oneDNN, time bias in the GroupNorm kernel (the default)": sampling(
            variant(cfg, device), "bf16-mixed"
        ),
    }
    if s.compile:
        compiled = variant(cfg, device, compile=True)
        calls["fp32, the default + torch.compile"] = sampling(compiled, "32-true")
        calls["bf16 autocast, the default + torch.compile"] = sampling(compiled, "bf16-mixed")
    seconds = timer.group(calls, reps, warmup)
    base = seconds[next(iter(calls))]
    out = [("sampling step (img/s)", k, s.sample_batch / v, base / v) for k, v in seconds.items()]

    module = DiffusionModule(UNet(cfg), diffusion_config(cfg)).to(device)
    batch = torch.rand(s.train_batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    before = {"channels_last": False, "fp32_groupnorm": False, "fp32_attention": False, **OLD}
    calls = {
        "32-true, as before (NCHW)": TrainStep(module, variant(cfg, device, **before), batch, "32-true"),
        "32-true, channels_last, PyTorch's GroupNorm and SiLU": TrainStep(
            module, variant(cfg, device, native_kernel=False, **OLD), batch, "32-true"
        ),
        "32-true, channels_last, native GroupNorm+SiLU kernel, attention projections as matmuls, NCHW weights": (
            TrainStep(module, variant(cfg, device, conv_layouts=False, **OLD), batch, "32-true")
        ),
        "32-true, channels_last, native GroupNorm+SiLU kernel": TrainStep(
            module, variant(cfg, device, **OLD), batch, "32-true"
        ),
        "32-true, channels_last, native GroupNorm+SiLU kernel, bias gradients apart": TrainStep(
            module,
            variant(cfg, device, native_attention=False, winograd=False, skip_parts=False, fused_additions=False),
            batch,
            "32-true",
        ),
        "32-true, channels_last, native GroupNorm+SiLU and attention kernels, bias gradients apart": TrainStep(
            module, variant(cfg, device, winograd=False, skip_parts=False, fused_additions=False), batch, "32-true"
        ),
        "32-true, channels_last, native GroupNorm+SiLU and attention kernels, bias gradients apart, Winograd"
        " F(2x2, 3x3) convolutions": TrainStep(
            module, variant(cfg, device, winograd_tile=2, skip_parts=False, fused_additions=False), batch, "32-true"
        ),
        "32-true, channels_last, native GroupNorm+SiLU and attention kernels, bias gradients apart, Winograd"
        " F(4x4, 3x3) convolutions": TrainStep(
            module, variant(cfg, device, skip_parts=False, fused_additions=False), batch, "32-true"
        ),
        "32-true, channels_last, native GroupNorm+SiLU and attention kernels, bias gradients apart, Winograd"
        " F(4x4, 3x3) convolutions, decoder inputs as parts (the default)": TrainStep(
            module, variant(cfg, device), batch, "32-true"
        ),
        "bf16-mixed, as before (NCHW, GroupNorm and attention in bf16)": TrainStep(
            module, variant(cfg, device, **before), batch, "bf16-mixed"
        ),
        "bf16-mixed, NCHW, attention in fp32": TrainStep(
            module, variant(cfg, device, channels_last=False, fp32_groupnorm=False, **OLD), batch, "bf16-mixed"
        ),
        "bf16-mixed, channels_last, attention in fp32": TrainStep(
            module, variant(cfg, device, fp32_groupnorm=False, **OLD), batch, "bf16-mixed"
        ),
        "bf16-mixed, channels_last, attention and GroupNorm in fp32, PyTorch's GroupNorm and SiLU": TrainStep(
            module, variant(cfg, device, native_kernel=False, **OLD), batch, "bf16-mixed"
        ),
        "bf16-mixed, channels_last, attention and GroupNorm in fp32, native GroupNorm+SiLU kernel, attention"
        " projections as matmuls, NCHW weights": TrainStep(
            module, variant(cfg, device, conv_layouts=False, **OLD), batch, "bf16-mixed"
        ),
        "bf16-mixed, channels_last, attention and GroupNorm in fp32, native GroupNorm+SiLU kernel": TrainStep(
            module,
            variant(cfg, device, native_attention=False, winograd=False, skip_parts=False, fused_additions=False),
            batch,
            "bf16-mixed",
        ),
        "bf16-mixed, channels_last, attention and GroupNorm in fp32, native GroupNorm+SiLU and attention"
        " kernels": TrainStep(
            module, variant(cfg, device, skip_parts=False, fused_additions=False), batch, "bf16-mixed"
        ),
        "bf16-mixed, channels_last, attention and GroupNorm in fp32, native GroupNorm+SiLU and attention kernels,"
        " decoder inputs as parts": TrainStep(module, variant(cfg, device, fused_additions=False), batch, "bf16-mixed"),
        "bf16-mixed, channels_last, attention and GroupNorm in fp32, native GroupNorm+SiLU and attention kernels,"
        " decoder inputs as parts, residuals added by oneDNN, time bias in the GroupNorm kernel (the default)": (
            TrainStep(module, variant(cfg, device), batch, "bf16-mixed")
        ),
    }
    if s.compile:
        calls["bf16-mixed, the default + torch.compile"] = TrainStep(
            module, variant(cfg, device, compile=True), batch, "bf16-mixed"
        )
    seconds = timer.group(calls, reps, warmup)
    base = seconds[next(iter(calls))]
    return out + [("training step (img/s)", k, s.train_batch / v, base / v) for k, v in seconds.items()]


class Jobs:
    """``python -m benchmarks.job JOB...`` in fresh processes, at most ``at_once`` of them running at a time.

    A job is its arguments, or (arguments, environment variables to set, names to unset); ``env`` is set in
    every job's environment. The jobs start from a thread, so this process goes on meanwhile.
    """

    def __init__(self, jobs: list[Any], at_once: int = 1, env: dict[str, str] | None = None) -> None:
        self.commands, self.outputs = [], []
        for job in jobs:
            args, env_set, env_unset = job if isinstance(job, tuple) else (job, {}, ())
            job_env = {k: v for k, v in os.environ.items() if k not in env_unset} | env_set | (env or {})
            self.commands.append(([sys.executable, "-m", "benchmarks.job", *args], job_env))
        self.pool = ThreadPoolExecutor(max_workers=at_once)
        self.outputs = [self.pool.submit(self._run, command, job_env) for command, job_env in self.commands]
        self.pool.shutdown(wait=False)

    @staticmethod
    def _run(command: list[str], env: dict[str, str]) -> dict[str, Any]:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def results(self) -> list[dict[str, Any]]:
        """Each job's JSON line, once it has finished (the first failure raises, naming its command)."""
        return [output.result() for output in self.outputs]


def memory_jobs(s: Settings) -> list[list[str]]:
    """Peak RSS of the sample stage drawing each of ``memory_n`` images (the most ``memory_repeats`` times), and
    of training steps (``job`` arguments)."""
    model = ["--model", json.dumps(next(iter(s.configs.values())).to_dict())]
    counts = list(s.memory_n) + [s.memory_n[-1]] * (s.memory_repeats - 1)
    sample = [["sample", "--n", str(n), "--batch-size", str(s.memory_chunk), "--sampler", s.sampler] for n in counts]
    kept = sample[: s.memory_kept] + sample[len(s.memory_n) :]
    jobs = [j + model for j in sample] + [j + model + ["--keep-freed-memory"] for j in kept]
    return jobs + [["train", "--batch-size", str(s.train_batch), "--precision", p, *model] for p in s.memory_precisions]


OMP_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# The per-process rows (benchmarks.job steps): key, target ratio over the peer, label
PROCESS_TASKS = (
    ("sample", 2.0, "sampling step, fp32"),
    ("train", 1.5, "training step, bf16-mixed"),
    ("train32", 1.5, "training step, 32-true"),
)
# The settings applied at process start that the per-process rows compare: (name, keep_freed_memory, OpenMP
# environment). The first is how a plain PyTorch script runs (glibc's malloc, libgomp's default of spinning
# ~3 ms before sleeping); the last is how this project's stages, `make` targets and the rows above run.
PROCESS_SETTINGS = (
    ("plain script", False, {}),
    ("kept, sleeping threads", True, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("kept, bounded spin", True, {"GOMP_SPINCOUNT": "30000"}),
)


def allocator_jobs(s: Settings) -> list[tuple[list[str], dict[str, str], tuple[str, ...]]]:
    """Sampling and training steps in fresh processes, one per :data:`PROCESS_SETTINGS` entry, in turns.

    The allocator and the OpenMP wait policy are set once per process, so the settings cannot take turns within
    one process; instead ``alloc_rounds`` rounds of processes run one after the other, and :func:`merge_rounds`
    takes the medians.
    """
    job = ["steps", "--batch-size", str(s.train_batch), "--sample-batch", str(s.sample_batch)]
    job += ["--reps", str(next(iter(s.reps.values()))), "--model", json.dumps(next(iter(s.configs.values())).to_dict())]
    one_round = [(job + (["--keep-freed-memory"] if kept else []), env, OMP_ENV) for _, kept, env in PROCESS_SETTINGS]
    return one_round * s.alloc_rounds


def merge_rounds(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results of each :data:`PROCESS_SETTINGS` entry (in the order :func:`allocator_jobs` runs them) over all
    rounds: the median of each timing over rounds, named after its setting."""
    merged, n = [], len(PROCESS_SETTINGS)
    for i, (name, _, _) in enumerate(PROCESS_SETTINGS):
        runs = results[i::n]
        merged.append(
            {
                **runs[0],
                "setting": name,
                "seconds": {k: statistics.median(r["seconds"][k] for r in runs) for k in runs[0]["seconds"]},
                "page_faults": int(statistics.median(r["page_faults"] for r in runs)),
                "rounds": len(runs),
            }
        )
    return merged


SHARES = ("convolutions", "matmuls", "attention", "GroupNorm", "SiLU", "casts and copies", "other")


def op_kind(name: str) -> str:
    """The kind of an aten operator, for the time shares (:data:`SHARES`)."""
    if "convolution" in name or "winograd" in name or name in ("_Conv3x3", "_Conv3x3Backward"):
        return "convolutions"  # oneDNN's, or the Winograd kernel (forward without autograd, forward, backward)
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        return "matmuls"
    if "scaled_dot_product" in name or name in ("ddpm::attention", "_Attention", "_AttentionBackward"):
        return "attention"  # PyTorch's SDPA, or the native kernel (forward without autograd, forward, backward)
    if "group_norm" in name or "GroupNormSiLU" in name:  # the native kernel's autograd nodes: GroupNorm and SiLU
        return "GroupNorm"
    if "silu" in name:
        return "SiLU"
    if name in ("aten::copy_", "aten::_to_copy", "aten::clone"):
        return "casts and copies"
    return "other"


def time_shares(s: Settings, device: torch.device, peer: bool, calls: int = 2) -> list[dict[str, Any]]:
    """Where the time of a training step and of a sampling chunk goes, by operator kind (first configuration).

    The torch profiler's self CPU time of every operator over ``calls`` calls after one warm-up call, summed by
    :func:`op_kind`. The convolutions are oneDNN's for both nets, so ``peer total / our convolutions`` bounds
    the ratio ours/peer that any change outside our convolutions could reach. CPU only (on a GPU the host's
    time is not the kernels').
    """
    if device.type != "cpu":
        return []
    from torch.profiler import ProfilerActivity, profile

    cfg = next(iter(s.configs.values()))
    torch.manual_seed(0)
    nets = {"ours": variant(cfg, device)} | ({"peer": PeerNet(cfg).to(device)} if peer else {})
    module = DiffusionModule(UNet(cfg), diffusion_config(cfg)).to(device)
    batch = torch.rand(s.train_batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    out = []
    for task in ("train", "sample"):
        for precision in PRECISIONS:
            for net_name, net in nets.items():
                if task == "train":
                    call = TrainStep(module, net.train(), batch, precision)
                else:
                    call = sample_call(
                        sampler_module(cfg, net, device), s.sample_batch, s.sampler, s.sample_steps, precision
                    )
                call()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(calls):
                        call()
                ms = dict.fromkeys(SHARES, 0.0)
                for event in prof.key_averages():
                    ms[op_kind(event.key)] += event.self_cpu_time_total / 1e3 / calls
                out.append({"task": task, "precision": precision, "net": net_name, "ms": ms})
    return out


def share_bounds(shares: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """(task, precision) -> the peer's total time over our convolutions' time: the most ours/peer can be."""
    by = {(r["task"], r["precision"], r["net"]): r["ms"] for r in shares}
    return {
        (task, precision): sum(by[task, precision, "peer"].values()) / by[task, precision, "ours"]["convolutions"]
        for task, precision, net in by
        if net == "ours" and (task, precision, "peer") in by and by[task, precision, "ours"]["convolutions"] > 0
    }


CONV_PHASES = ("forward", "input gradient", "weight gradient")


def conv_phases(s: Settings, timer: Timer, device: torch.device) -> list[dict[str, Any]]:
    """Our net's convolutions in one fp32 training step, timed by phase: forward, input and weight gradient.

    The convolutions of the first configuration are collected with forward hooks during a training forward at
    the training batch; each distinct one runs alone, as the net runs it, its phases taking turns with all the
    others': the Winograd kernel's forward, input gradient and weight gradient (each with its filter transform)
    for the 3x3 convolutions that take it, oneDNN's through ``aten::convolution_backward`` with one output at a
    time for the others. Every phase does the forward's FLOPs (counted as a direct convolution's). A convolution
    whose input needs no gradient (the first, on the data) has no input-gradient phase, as in training.
    Returns one dict per phase: convolutions, of which Winograd, ms and GFLOP per step.
    """
    cfg = next(iter(s.configs.values()))
    torch.manual_seed(0)
    net = variant(cfg, device).train()
    found: dict[tuple, int] = {}

    def hook(conv: nn.Conv2d, args: tuple[Tensor, ...], kwargs: dict[str, Any], out: Tensor) -> None:
        x = args[0]
        upsample = bool(kwargs.get("upsample"))  # the net's Upsample: x upsampled x2 first (within the kernel)
        # A decoder block's 1x1 skip convolution gets (input, skip connection): one convolution per part, with
        # its slice of the weight (the bias with the first)
        parts = (x,) if isinstance(x, Tensor) else tuple(x)
        for k, part in enumerate(parts):
            w_shape = (conv.weight.shape[0], part.shape[1], *conv.weight.shape[2:])
            key = (tuple(part.shape), w_shape, conv.stride, conv.padding, conv.dilation, conv.groups)
            tile = conv.winograd_tile if isinstance(conv, Conv2d) and conv.uses_winograd(part) else 0
            key += (conv.bias is not None and k == 0, part.requires_grad, tuple(out.shape), tile, upsample)
            found[key] = found.get(key, 0) + 1

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in net.modules() if isinstance(m, nn.Conv2d)]
    module = DiffusionModule(UNet(cfg), diffusion_config(cfg)).to(device)
    batch = torch.rand(s.train_batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    module.model_step(batch, net=net)
    for h in handles:
        h.remove()
    cl = torch.channels_last
    calls: dict[str, Callable[[], Any]] = {}
    work: dict[str, tuple[str, int, float, bool]] = {}  # call -> (phase, count, FLOPs, Winograd)
    for i, (key, count) in enumerate(found.items()):
        x_shape, w_shape, stride, padding, dilation, groups, bias, input_grad, y_shape, tile, upsample = key
        x = torch.randn(x_shape, device=device).contiguous(memory_format=cl)
        if upsample and not tile:  # oneDNN convolves the upsampled tensor
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        w = torch.randn(w_shape, device=device).contiguous(memory_format=cl)
        b = torch.randn(w_shape[0], device=device) if bias else None
        dy = torch.randn(y_shape, device=device).contiguous(memory_format=cl)
        flops = 2.0 * math.prod(y_shape) * math.prod(w_shape[1:])

        def backward(mask: list[bool], x=x, w=w, dy=dy, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=bias) -> Callable[[], Any]:  # fmt: skip
            sizes = [w.shape[0]] if bias else None
            args = (dy, x, w, sizes, stride, padding, dilation, False, [0, 0], groups, mask)
            return lambda: torch.ops.aten.convolution_backward(*args)

        if tile:

            def winograd(x: Tensor, w: Tensor, b: Tensor | None, up: bool, m: int = tile) -> Callable[[], Any]:
                ext, cout = kernels.extension(), w.shape[0]  # the filter transform is timed: training redoes it
                return lambda: ext.winograd_conv3x3(x, kernels.winograd_weights(w, m), b, None, up, cout)

            flipped = w.flip(2, 3).transpose(0, 1)  # the input gradient's filters
            phases = {
                "forward": winograd(x, w, b, upsample),
                "input gradient": winograd(dy, flipped, None, False) if input_grad else None,
                "weight gradient": lambda x=x, w=w, dy=dy, m=tile, up=upsample: kernels.conv3x3_weight_grad(
                    x, dy, w, m, up
                ),
            }
        else:
            phases = {
                "forward": lambda x=x, w=w, b=b, k=(stride, padding, dilation, groups): F.conv2d(x, w, b, *k),
                "input gradient": backward([True, False, False]) if input_grad else None,
                "weight gradient": backward([False, True, bias]),
            }
        for phase, call in phases.items():
            if call is not None:
                calls[f"{i} {phase}"] = call
                work[f"{i} {phase}"] = (phase, count, flops, bool(tile))
    with torch.no_grad():
        seconds = timer.group(calls, max(3, next(iter(s.reps.values()))), 1)
    out = []
    for phase in CONV_PHASES:
        mine = [(count, flops, seconds[k], wino) for k, (p, count, flops, wino) in work.items() if p == phase]
        out.append(
            {
                "phase": phase,
                "convolutions": sum(c for c, _, _, _ in mine),
                "winograd": sum(c for c, _, _, wino in mine if wino),
                "ms": sum(c * t for c, _, t, _ in mine) * 1e3,
                "gflop": sum(c * f for c, f, _, _ in mine) / 1e9,
            }
        )
    return out


def synchronisations(s: Settings, device: torch.device, steps: int = 10) -> dict[str, int]:
    """Host-device synchronisations (CUDA's sync debug mode) in a training step and in a sampling chunk.

    The training step is TrainStep (model_step, backward, clipping, AdamW, EMA) in bf16-mixed; the chunk is
    ``sample_batches`` with ``steps`` steps, whose one expected synchronisation is the copy of the images to
    the host at its end. Empty on CPU.
    """
    if device.type != "cuda":
        return {}
    cfg = next(iter(s.configs.values()))
    torch.manual_seed(0)
    module = DiffusionModule(UNet(cfg), diffusion_config(cfg)).to(device)
    batch = torch.rand(s.train_batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    calls = {
        "training step, bf16-mixed": TrainStep(module, module.net, batch, "bf16-mixed"),
        f"sampling chunk of {s.sample_batch} images, {s.sampler}, {steps} steps": sample_call(
            module, s.sample_batch, s.sampler, steps, "bf16-mixed"
        ),
    }
    counts = {}
    for name, call in calls.items():
        call()  # warm-up: lazy initialisation may synchronise once
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                call()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[name] = sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)
    return counts


def evaluation(s: Settings, timer: Timer, device: torch.device) -> dict[str, float]:
    """FID feature-extraction images/s: the classifier FeatureNet and Inception-v3 (random weights), uint8 input."""
    from ddpm import metrics
    from ddpm.featurizer import FeatureNet, to_nchw

    cfg = next(iter(s.configs.values()))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (s.eval_batch, cfg.image_size, cfg.image_size, cfg.in_channels), dtype=np.uint8)
    torch.manual_seed(0)
    extractors = {"classifier (FeatureNet)": (metrics.UInt8Features(FeatureNet(cfg.in_channels, 10)), s.eval_batch)}
    with suppress(ImportError):  # the inception extra is not installed
        extractors["Inception-v3 pool3 (random weights)"] = (random_inception(), s.inception_batch)

    def call(extractor: nn.Module, n: int) -> Callable[[], None]:
        x = to_nchw(images[:n]).contiguous().to(device)

        def run() -> None:
            with torch.inference_mode():
                extractor(x)

        return run

    extractors = {k: (e.to(device).eval(), n) for k, (e, n) in extractors.items()}
    seconds = timer.group({k: call(e, n) for k, (e, n) in extractors.items()}, max(2, next(iter(s.reps.values()))), 1)
    return {k: extractors[k][1] / v for k, v in seconds.items()}


def random_inception() -> nn.Module:
    """ddpm.metrics' Inception-v3 feature network loaded from a randomly initialised weights file (for timing)."""
    from ddpm import metrics

    metrics._require_inception_extra()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInit(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
            """Keep the random initialisation (the constructor insists on loading weights)."""

    with tempfile.TemporaryDirectory() as tmp:
        empty, weights = Path(tmp, "empty.pt"), Path(tmp, "inception.pt")
        torch.save({}, empty)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = RandomInit("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
        torch.save(net.state_dict(), weights)
        return metrics.load_inception(weights)


# ---------------------------------------------------------------- the report


def machine(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, torch version, threads (and the GPU, if one is used)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "(unset)"),
        "python": platform.python_version(),
        "diffusers": peer_version() or "not installed",
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def summary(
    s: Settings,
    probes: Probes,
    rows: list[Row],
    mem: list[dict[str, Any]],
    alloc: list[dict[str, Any]],
    syncs: dict[str, int] | None = None,
    bounds: dict[tuple[str, str], float] | None = None,
) -> list[str]:
    """The issue's targets, checked against this run's numbers (first configuration)."""
    fp32 = probes.limit("fp32")
    name = next(iter(s.configs))
    by_key = {(r.task, r.precision, r.net): r for r in rows if r.config == name}
    lines = []

    def check(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    for task, ratio_target, label in (("train", 1.5, "Training"), ("sample", 2.0, "Sampling")):
        for precision in PRECISIONS:
            ours, peer = by_key[task, precision, "ours"], by_key.get((task, precision, "peer"))
            share = ours.gflops / fp32
            text = f"- {label}, {precision}: {100 * share:.0f}% of the fp32 limit (target 60%: {check(share >= 0.6)})"
            if peer is not None:
                ratio = ours.rate / peer.rate
                met = check(ratio >= ratio_target)
                text += f"; {ratio:.2f}x the peer in the same process (target {ratio_target}x: {met})"
                if bounds and (task, precision) in bounds:
                    text += (
                        f"; {bounds[task, precision]:.2f}x at most if our net spent no time outside its"
                        " convolutions (see Where the time goes)"
                    )
            lines.append(text + ".")
    for task, ratio_target, label in (("train", 1.5, "Training"), ("sample", 2.0, "Sampling")):
        ours, peer = by_key.get((task, "bf16-mixed", "ours, compiled")), by_key.get((task, "bf16-mixed", "peer"))
        if ours is None or peer is None:
            continue
        both = by_key.get((task, "bf16-mixed", "peer, compiled"))
        text = (
            f"- {label}, bf16-mixed, ours compiled (`compile: true`): {ours.rate / peer.rate:.2f}x the peer as"
            f" diffusers runs it (eager; target {ratio_target}x: {check(ours.rate / peer.rate >= ratio_target)})"
        )
        if both is not None:
            text += f"; {ours.rate / both.rate:.2f}x the peer compiled too"
        lines.append(text + ".")
    if alloc and "peer sample" in alloc[0]["seconds"]:
        plain, ours = alloc[0], alloc[-1]
        for task, ratio_target, label in PROCESS_TASKS:
            ratio = plain["seconds"][f"peer {task}"] / ours["seconds"][f"ours {task}"]
            lines.append(
                f"- Ours as the stages run ({ours['setting']}) over the peer as a plain script runs, {label}:"
                f" {ratio:.2f}x (fresh processes in turns, medians of {plain['rounds']} round(s);"
                f" target {ratio_target}x: {check(ratio >= ratio_target)})."
            )
    for kept in (False, True):
        samples = [m for m in mem if m["job"] == "sample" and m["keep_freed_memory"] == kept]
        counts = sorted({m["n"] for m in samples})
        if len(counts) < 2:
            continue
        peak = {n: statistics.median(m["peak_mb"] for m in samples if m["n"] == n) for n in counts}
        peaks = ", ".join(f"{peak[n]:,.0f} MB ({n:,} images)" for n in counts)
        largest = [m for m in samples if m["n"] == counts[-1]]
        last = largest[0]
        grow = peak[counts[-1]] - peak[counts[-2]]
        array = last["output_mb"] * (1 - counts[-2] / counts[-1])
        withins = [m["peak_mb"] - m["early_peak_mb"] for m in largest]
        within = statistics.median(withins)
        array_within = last["output_mb"] * (1 - last["early_n"] / last["n"])
        each = f" (median of {len(withins)} processes: {', '.join(f'{w:+.0f}' for w in withins)} MB)"
        judged = (
            f" Within a {last['n']:,}-image process, the peak moves {within:+.0f} MB from its first"
            f" {last['early_n']:,} images to its end{each if len(withins) > 1 else ''}, while the output grows by"
            f" {array_within:.1f} MB (target: at most that: {check(within <= array_within)})."
            if last["early_n"] < last["n"]
            else f" (Not judged: the largest job has no chunks after its first {last['early_n']:,} images.)"
        )
        lines.append(
            f"- Sampling memory ({'keep_freed_memory' if kept else 'default malloc'}), chunks of"
            f" {last['batch_size']}: peak RSS {peaks}.{judged} Across processes, from {counts[-2]:,} to"
            f" {counts[-1]:,} images the peak moves {grow:+.0f} MB against {array:.1f} MB more output (processes of"
            " the same job differ by up to about 100 MB, see Memory)."
        )
    if syncs:
        counted = "; ".join(f"{k}: {v}" for k, v in syncs.items())
        lines.append(
            f"- Host-device synchronisations counted by CUDA's sync debug mode: {counted} (a chunk's one expected"
            " synchronisation is the copy of its images to the host). No Python loop over the batch in sampling or"
            " in `model_step`: noise is drawn for the whole chunk at once."
        )
    else:
        lines.append(
            "- No host-device synchronisation per step and no Python loop over the batch in sampling or in"
            " `model_step`: by construction (a sampler's noise levels and timesteps are Python numbers computed"
            " before its loop, and noise is drawn for the whole chunk at once); counted on a GPU only."
        )
    return lines


def report(
    s: Settings,
    command: str,
    mach: dict[str, Any],
    probes: Probes,
    rows: list[Row],
    info: dict[str, Any],
    lever_rows: list[tuple[str, str, float, float]],
    mem: list[dict[str, Any]],
    alloc: list[dict[str, Any]],
    evals: dict[str, float],
    peer: bool,
    seconds: float,
    syncs: dict[str, int] | None = None,
    shares: list[dict[str, Any]] | None = None,
    phases: list[dict[str, Any]] | None = None,
) -> str:
    """The results as markdown: machine, limit, throughput, levers, memory and evaluation tables."""
    fp32, bf16 = probes.limit("fp32"), probes.limit("bf16")
    bounds = share_bounds(shares or [])
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min). Machine: " + ", ".join(f"{k} {v}" for k, v in mach.items()),
        "",
        "Every row is the median of several timed repetitions after warm-up; the rows of a group took turns within",
        "each repetition (side by side, in the same run), so ratios hold even on a shared, noisy machine. The",
        "machine is shared with other work, whose load slows every row: compare rows within this file, not with",
        "another run.",
        "",
        "## Targets",
        "",
        *summary(s, probes, rows, mem, alloc, syncs, bounds),
        "",
        "## The machine's limit (matmul GFLOP/s of the probes timed between all the rows)",
        "",
    ]
    medians = probes.rates(best=False)
    lines += _table(
        ["probe", "best GFLOP/s", "median GFLOP/s"], [[k, _num(v), _num(medians[k])] for k, v in probes.rates().items()]
    )
    lines += [
        "",
        f"Limit: fp32 **{_num(fp32)}** GFLOP/s, bf16 **{_num(bf16)}** GFLOP/s (the fastest timing of the best probe"
        f" of each, {sum(len(v) for v in probes.times.values()) // len(probes.times)} timings per probe).",
        "",
    ]

    lines += [
        "## Throughput: our U-Net and the peer (diffusers UNet2DModel) at the same FLOPs",
        "",
        f"Training: the full step at batch {s.train_batch} (DiffusionModule.model_step, backward, gradient clipping,"
        " AdamW, EMA update); GFLOP/img is forward + backward. Sampling: `sample_batches` drawing one chunk of"
        f" {s.sample_batch} images with {s.sampler} ({s.sample_steps} steps), in img-steps/s (network evaluations"
        " per second); GFLOP/img is one network evaluation. `bf16-mixed` is bf16 autocast with fp32 weights"
        " (Lightning's precision of that name; the params.yaml default for training); `32-true` is fp32.",
        "",
    ]
    table = []
    by_key = {(r.config, r.task, r.precision, r.net): r for r in rows}
    for r in rows:
        other = by_key.get((r.config, r.task, r.precision, "peer" + r.net[4:]))
        ratio = f"**{r.rate / other.rate:.2f}x**" if r.net.startswith("ours") and other else ""
        table.append(
            [
                r.config,
                r.task + (" (img/s)" if r.task == "train" else " (img-steps/s)"),
                r.precision,
                r.net,
                f"{r.flops_per_item / 1e9:.3f}",
                _num(r.rate),
                _num(r.gflops),
                f"{100 * r.gflops / fp32:.0f}%",
                f"{100 * r.gflops / bf16:.0f}%",
                ratio,
            ]
        )
        if r.net == "ours" and not peer:
            table.append([r.config, table[-1][1], r.precision, "peer", "not installed", "", "", "", "", ""])
    header = ["config", "task", "precision", "net", "GFLOP/img", "rate", "GFLOP/s", "% fp32 limit"]
    lines += _table([*header, "% bf16 limit", "ours/peer"], table)
    lines += ["", "Configurations (the peer has the same blocks, widths, attention levels and parameter count):", ""]
    for name, i in info.items():
        lines.append(f"- **{name}**: ours `UNetConfig({', '.join(f'{k}={v}' for k, v in i['ours'].items())})`")
        if "peer" in i:
            lines.append(f"  peer `UNet2DModel({', '.join(f'{k}={v}' for k, v in i['peer'].items())})`")
        gflop = ", ".join(f"{n} {v:.3f}" for n, v in i["train_gflop"].items())
        lines.append(f"  parameters {i['params']}; GFLOP per training image: {gflop}")

    if shares:
        lines += [
            "",
            f"## Where the time goes ({next(iter(s.configs))} configuration, torch profiler)",
            "",
            "Self CPU time of every operator, summed by kind, per training step (batch"
            f" {s.train_batch}) and per sampling chunk ({s.sample_batch} images, {s.sample_steps} steps), after one"
            " warm-up call; the profiler adds a little time to every operator. The peer's total over our"
            " convolutions' time bounds what ours/peer could become with everything else free. Our convolutions"
            " are the Winograd kernel's (fp32 3x3, stride 1) and oneDNN's (the rest, and all of them under bf16"
            " autocast, where they add the residuals too); the peer's are oneDNN's. Our GroupNorm column is the"
            " native kernel, which includes the SiLU after the norm (and, under bf16 autocast, the casts around"
            " it); our attention column is the native attention kernel.",
            "",
        ]
        table = []
        for r in shares:
            total = sum(r["ms"].values())
            cells = [f"{100 * r['ms'][k] / total:.0f}%" for k in SHARES]
            table.append([r["task"], r["precision"], r["net"], f"{total:,.0f}", *cells])
        lines += _table(["task", "precision", "net", "ms per call", *SHARES], table)
        if bounds:
            lines += [
                "",
                "Bound on ours/peer (peer total / our convolutions): "
                + ", ".join(f"{task} {precision} {b:.2f}x" for (task, precision), b in bounds.items())
                + ".",
            ]

    if phases:
        first = next(iter(s.configs))
        lines += [
            "",
            f"## Convolution phases (our net, {first} configuration, one fp32 training step at batch {s.train_batch})",
            "",
            "Each of the step's convolutions runs alone, as the net runs it, its forward, input gradient and weight"
            " gradient taking turns with all the others': the Winograd kernel (with its filter transforms) for the"
            " 3x3 convolutions that take it (column Winograd), oneDNN's otherwise (`aten::convolution_backward` with"
            " one output at a time). Every phase does the forward's FLOPs, counted as a direct convolution's, so the"
            " Winograd kernel's rate can pass the limit. The first convolution's input is data: it has no input"
            " gradient.",
            "",
        ]
        keys = ("convolutions", "winograd", "ms", "gflop")
        total = {"phase": "all", **{k: sum(p[k] for p in phases) for k in keys}}

        def rate(p: dict[str, Any]) -> float:
            return p["gflop"] / p["ms"] * 1e3

        lines += _table(
            ["phase", "convolutions", "Winograd", "ms per step", "GFLOP per step", "GFLOP/s", "% fp32 limit"],
            [
                [p["phase"], p["convolutions"], p["winograd"], f"{p['ms']:,.1f}", f"{p['gflop']:.1f}",
                 _num(rate(p)), f"{100 * rate(p) / fp32:.0f}%"]
                for p in [*phases, total]
            ],
        )  # fmt: skip
        by_phase = {p["phase"]: p for p in phases}
        fwd, wgrad = by_phase["forward"], by_phase["weight gradient"]
        at_forward_rate = total["ms"] - wgrad["ms"] + wgrad["gflop"] / fwd["gflop"] * fwd["ms"]
        step = next(
            (r for r in rows if (r.config, r.task, r.precision, r.net) == (first, "train", "32-true", "ours")), None
        )
        text = (
            f"With no time outside these convolutions, the fp32 training step would run at"
            f" {100 * rate(total) / fp32:.0f}% of the fp32 limit"
        )
        if step is not None:
            text += f" (the whole step, measured above: {100 * step.gflops / fp32:.0f}%)"
        text += (
            f"; with the weight gradients at the forward's rate, at"
            f" {100 * total['gflop'] / at_forward_rate * 1e3 / fp32:.0f}%."
        )
        lines += ["", text]

    lines += ["", f"## Levers (our net, {next(iter(s.configs))} configuration, side by side)", ""]
    lines += _table(
        ["measured", "variant", "img/s", "vs first row"], [[g, v, _num(r), f"{x:.2f}x"] for g, v, r, x in lever_rows]
    )
    if alloc:
        lines += [
            "",
            f"Settings applied at process start, in fresh processes taking turns over {alloc[0]['rounds']} round(s)"
            " (each process interleaves its rows; the figures are medians over the rounds): *plain script* is"
            " glibc's default malloc and libgomp's default OpenMP wait (idle threads spin ~3 ms, then sleep);"
            " *kept* is `ddpm.runtime.keep_freed_memory()` (all the rows above run with it unless"
            " --no-keep-freed-memory); *sleeping threads* is `OMP_WAIT_POLICY=PASSIVE` (idle threads sleep at"
            " once, so every operator wakes them); *bounded spin* is `GOMP_SPINCOUNT=30000` (~0.3 ms of spinning"
            " bridges the gaps between one step's operators; what the Makefile, the stages and the rows above"
            " use). These settings cannot change within a process, so the rows alternate by process, not within"
            " one: load from other work during one process still skews a round, bf16 training most.",
            "",
        ]
        names = [a["setting"] for a in alloc]
        table = []
        for key in alloc[0]["seconds"]:
            net, task = key.split()
            n = s.sample_batch if task == "sample" else s.train_batch
            rates = [n / a["seconds"][key] for a in alloc]
            what = next(label for t, _, label in PROCESS_TASKS if t == task)
            table.append([net, what, *map(_num, rates), *(f"{r / rates[0]:.2f}x" for r in rates[1:])])
        lines += _table(["net", "img/s", *names, *(f"{name} / {names[0]}" for name in names[1:])], table)
        faults = ", ".join(f"{a['page_faults']:,} ({a['setting']})" for a in alloc)
        lines += ["", f"Page faults per process: {faults}."]
        if "peer sample" in alloc[0]["seconds"]:
            cross = [
                f"{label} {alloc[0]['seconds'][f'peer {task}'] / alloc[-1]['seconds'][f'ours {task}']:.2f}x"
                for task, _, label in PROCESS_TASKS
            ]
            lines.append(f"Ours ({names[-1]}) over the peer as a plain script runs it: " + ", ".join(cross) + ".")

    lines += [
        "",
        "What the levers do: *fused SDPA*: q, k and v have unit stride along the head dimension, so SDPA runs its"
        " flash kernel instead of the math fallback; *channels_last*: NHWC activations, which oneDNN convolves"
        " without reordering each input; *GroupNorm in fp32*: torch's CPU GroupNorm in bf16 on channels_last input"
        " is several times slower than in fp32 (and fp32 is what CUDA autocast does); *native GroupNorm+SiLU"
        " kernel* (`ddpm.kernels`, CPU, channels_last): one pass over each image for the statistics and one"
        " to write SiLU(norm(x)) while the image is still in cache, float32 arithmetic on bf16 or fp32"
        " activations, backward likewise, instead of PyTorch's GroupNorm, SiLU and autocast's casts around"
        " them, each a pass of its own; *attention projections as 1x1 convolutions* on channels_last"
        " activations (oneDNN's, about twice as fast as the same matmul here) and *convolution weights in"
        " channels_last* (no reordered copy of each weight at every call); *attention in fp32* (CPU"
        " only): the CPU's bf16 flash-attention backward is ~8x slower than the fp32 one, for few FLOPs;"
        " *native attention kernel* (`ddpm.kernels.attention`, CPU, up to 196 tokens): one (image, head) at a"
        " time in cache, q, k and v read where the projection leaves them, each query's softmax down a column of"
        " transposed scores (16 queries per vector), instead of SDPA's flash kernel, which is mostly overhead"
        " at 49 tokens of 16 channels; *bias gradients apart* (fp32 training on the CPU): each convolution's bias"
        " gradient as a sum of its output gradient, not within oneDNN's weight gradient, which takes longer with"
        " it; *Winograd* (`ddpm.kernels.conv3x3`, fp32 on the CPU, 3x3 convolutions with stride 1 and a multiple"
        " of 16 input channels): Winograd's minimal filtering, each tile of 2x2 (F(2x2, 3x3)) or 4x4 outputs"
        " (F(4x4, 3x3), the default) from the elementwise products of transformed input patches and filters, 16"
        " or 36 small matrix products over the channels, 2.25x or 4x fewer multiplications than oneDNN's direct"
        " convolution, forward, input gradient (the flipped filters) and weight gradient alike; F(4x4, 3x3)"
        " rounds up to ~22x more than PyTorch (within 6e-6 of the largest value in the tests); *decoder inputs"
        " as parts*: a decoder block's input and skip connection are not concatenated (a copy of both, written"
        " and read again); the GroupNorm kernel reads each part where it is, and the 1x1 skip convolution sums"
        " one convolution per part with its slice of the weight; *residuals added by oneDNN* (bf16 autocast on the"
        " CPU): a residual block's skip connection, the attention's input and a 1x1 convolution's second part are"
        " added by oneDNN's binary post-op as the convolution writes its output, instead of PyTorch's bf16"
        " addition after it (which took longer than the convolution itself on a CPU with AMX); *time bias in the"
        " GroupNorm kernel*: where the block's first convolution is oneDNN's, the time embedding's bias per image"
        " and channel is folded into the second GroupNorm's per-channel constants instead of being added to the"
        " convolution's output;"
        " *inference_mode*: no autograd bookkeeping while sampling; *keep_freed_memory*: glibc hands every large"
        " activation back to the kernel when it is freed and page-faults it in again at the next step;"
        " *torch.compile*: fuses GroupNorm, SiLU and the casts (compiling takes 20-80 s on a 2-core CPU), so it is"
        " the params switch `train.compile` / `sample.compile`, off by default. bf16 autocast is the params.yaml"
        " training precision; the sample stage runs in `sample.precision` (default fp32).",
    ]
    lines += ["", "## Memory (peak RSS, each in a fresh process)", ""]
    if not mem:
        lines += ["Not measured in this run: the memory rows are host RSS of CPU processes (run without a GPU)."]
    mem_rows = []
    for m in mem:
        what = (
            f"sample stage, {m['n']:,} images in chunks of {m['batch_size']}"
            if m["job"] == "sample"
            else f"training step, batch {m['batch_size']}, {m['precision']}"
        )
        malloc = "keep_freed_memory" if m["keep_freed_memory"] else "default"
        grow = m["peak_mb"] - m["before_mb"]
        early = f"{m['early_peak_mb']:.0f} ({m['early_n']:,} images)" if "early_peak_mb" in m else ""
        row = [what, malloc, f"{m['before_mb']:.0f}", early, f"{m['peak_mb']:.0f}", f"{grow:+.0f}"]
        mem_rows.append(row + [m.get("output_mb", "")])
    header = ["job", "malloc", "RSS before (MB)", "peak RSS after the first chunks (MB)", "peak RSS (MB)"]
    header += ["peak - before (MB)", "output array (MB)"]
    lines += _table(header, mem_rows)
    lines += [
        "",
        "The sample stage (`ddpm.sampling.draw`, one step per image here: a chunk's memory does not depend on the"
        " step count) streams each chunk into the `.npz`, so its peak is one chunk's forward pass, whatever the"
        " number of images (see Targets). The peak is the kernel's high-water mark of the resident set, reset"
        " just before the job, and read again after the job's first chunks: what the later chunks add is"
        " measured within one process. The jobs run one after the other. Between processes of the same job the"
        " peak moved by up to about 100 MB over runs of this benchmark (allocator and thread timing), more than"
        " the 10,000-image output array, so the target is judged within the largest job, which runs"
        f" {s.memory_repeats} time(s) with each allocator: now and then the peak of one process still jumps late"
        " by tens of MB, so the median counts.",
    ]

    lines += ["", "## Evaluation (FID feature extraction, uint8 images in, inference_mode)", ""]
    lines += _table(["features", "img/s"], [[k, _num(v)] for k, v in evals.items()])
    if "gpu" not in mach:
        lines += ["", "## GPU figures", "", *earlier_gpu_figures()]
    else:
        lines[0] = f"# Benchmark results: GPU ({mach['gpu']})"
    return "\n".join(lines) + "\n"


def earlier_gpu_figures(folder: Path = ROOT / "benchmarks" / "gpu") -> list[str]:
    """The targets and tables of the GPU reports kept in ``folder`` (a CPU run cannot measure them)."""
    files = sorted(f for f in folder.glob("*.md") if f.name != "README.md")
    if not files:
        return ["Not measured: this run had no GPU (the harness uses one when torch sees it)."]
    out = [
        "This run had no GPU. These figures were measured on a GPU by earlier runs of the harness; their reports"
        f" are in `benchmarks/gpu/` ({', '.join(f.name for f in files)}; its README.md sums them up).",
    ]
    for f in files:
        text = f.read_text().splitlines()
        out += ["", f"### `{f.name}`: {text[0].lstrip('# ')}", ""]
        out += [line for line in text if line.startswith(("Command:", "`python -m"))][:1]
        if "## Targets" in text:
            start = text.index("## Targets") + 1
            end = next((i for i in range(start, len(text)) if text[i].startswith("## ")), len(text))
            out += text[start:end]
        else:
            for line in text:
                if line.startswith("Sampling:"):
                    out += ["", line, ""]
                elif line.startswith("|"):
                    out.append(line)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny configuration in seconds (tests the harness)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per row (default 5; quick 2)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile rows")
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time with ddpm.runtime.keep_freed_memory() applied (default: yes)",
    )
    parser.add_argument(
        "--compile-peer", action="store_true", help="both nets compiled, bf16-mixed (first configuration)"
    )
    parser.add_argument("--train-batch", type=int, default=None, help="training batch (default: params.yaml's)")
    parser.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default 256)")
    parser.add_argument(
        "--out", type=Path, default=None, help="markdown output (default: benchmarks/results.md; none for --quick)"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    kept = keep_freed_memory() if args.keep_freed_memory else False
    s = settings(args.quick, args.reps, args.compile)
    s = replace(
        s,
        train_batch=args.train_batch or s.train_batch,
        sample_batch=args.sample_batch or s.sample_batch,
        compile_peer=args.compile_peer,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peer = peer_version() is not None
    sizes = (256, 256, 256) if s.quick else (4096, 1024, 1024) if device.type == "cpu" else (8192, 8192, 8192)
    probes = Probes(device, *sizes)
    timer = Timer(device, probes)

    phase = time.perf_counter()

    def done(what: str) -> None:
        nonlocal phase
        print(f"{what}: {time.perf_counter() - phase:.0f} s", file=sys.stderr, flush=True)
        phase = time.perf_counter()

    # Host memory and glibc's allocator are CPU matters: a GPU run leaves them out.
    memory, alloc = (memory_jobs(s), allocator_jobs(s)) if device.type == "cpu" else ([], [])
    rows, info = throughput(s, timer, device, peer)
    done("throughput")
    lever_rows = levers(s, timer, device)
    done("levers")
    evals = evaluation(s, timer, device)
    done("evaluation")
    syncs = synchronisations(s, device)
    shares = time_shares(s, device, peer)
    done("time shares")
    phases = conv_phases(s, timer, device)
    done("convolution phases")
    # The memory jobs and the allocator pair run one after the other, after the timings of this process: run
    # at once, the memory jobs' peaks moved by tens of MB with the thread timing of their neighbours. The quick
    # run measures nothing precisely: there two single-threaded jobs run at a time (started beside this
    # process's rows, or with more threads each, they oversubscribed the two cores and took longer).
    if s.quick:
        results = Jobs(memory + alloc, at_once=2, env={"OMP_NUM_THREADS": "1"}).results()
        mem, alloc = results[: len(memory)], merge_rounds(results[len(memory) :]) if alloc else []
    else:
        mem = Jobs(memory).results() if memory else []
        alloc = merge_rounds(Jobs(alloc).results()) if alloc else []
    done("memory and allocator")
    command = "python -m benchmarks.bench" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = report(
        s,
        command,
        {**machine(device), "keep_freed_memory": kept},
        probes,
        rows,
        info,
        lever_rows,
        mem,
        alloc,
        evals,
        peer,
        time.perf_counter() - started,
        syncs,
        shares,
        phases,
    )
    out = args.out or (None if s.quick else ROOT / "benchmarks" / "results.md")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
