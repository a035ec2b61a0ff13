"""Levers: what each fast path of our net gains, measured with it and without it side by side in the same run.

A lever is taken away by a change of the kernel settings (:data:`ddpm.kernels.settings`, applied around each call
with :func:`ddpm.kernels.using`), by convolution weights left in NCHW, by another grad mode, or by compiling. Every
row's two calls take turns with all the others of its group (one group per task and precision), so each ratio holds
on a shared machine; a lever is measured only where its path can run (its tasks, precisions and device).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.calls import TrainStep, autocast, diffusion_module, training_batch, with_settings
from benchmarks.configs import PRECISIONS, Plan
from benchmarks.report import num, table
from benchmarks.timing import Timer
from ddpm.nets import UNet, UNetConfig

SAMPLE, TRAIN = "sampling step", "training step"
ANY = (SAMPLE, TRAIN)


@dataclass(frozen=True)
class Lever:
    """A fast path: its name, what it does, and how the run takes it away."""

    name: str
    does: str
    without: dict[str, Any] = field(default_factory=dict)  # kernel settings that take the lever away
    tasks: tuple[str, ...] = ANY
    precisions: tuple[str, ...] = PRECISIONS
    device: str | None = None  # the device type where its path runs (None: every device)
    nchw_weights: bool = False  # without it, the convolution weights are NCHW too
    no_grad: bool = False  # without it, sampling runs under no_grad instead of inference_mode
    math_sdpa: bool = False  # without it, PyTorch's attention runs its math backend
    compiled: bool = False  # with it, the net is compiled (off by default: without it is the default)

    def applies(self, task: str, precision: str, device: torch.device) -> bool:
        return task in self.tasks and precision in self.precisions and self.device in (None, device.type)


COMPILE = (
    "fuses GroupNorm, SiLU and the casts (compiling takes 20-80 s on a 2-core CPU), so it is the params switch"
    " `train.compile` / `sample.compile`, off by default"
)
LEVERS = (
    Lever(
        "channels_last",
        "NHWC activations and convolution weights, which oneDNN convolves without reordering each input",
        {"memory_format": torch.contiguous_format},
        nchw_weights=True,
    ),
    Lever(
        "attention projections as 1x1 convolutions",
        "the attention's q/k/v and output projections as oneDNN's 1x1 convolutions on channels_last activations"
        " (about twice as fast as the same matmul here), with channels_last weights (no reordered copy of each"
        " weight at every call)",
        {"conv_projections": False},
        nchw_weights=True,
    ),
    Lever(
        "native GroupNorm+SiLU kernel",
        "(`ddpm.kernels.group_norm`, CPU, channels_last) one pass over each image for the statistics and one to"
        " write SiLU(norm(x)) while the image is still in cache, float32 arithmetic on bf16 or fp32 activations,"
        " backward likewise, instead of PyTorch's GroupNorm, SiLU and autocast's casts around them, each a pass of"
        " its own",
        {"native_group_norm": False},
        device="cpu",
    ),
    Lever(
        "GroupNorm in fp32",
        "torch's CPU GroupNorm in bf16 on channels_last input is several times slower than in fp32 (and fp32 is what"
        " CUDA autocast does)",
        {"group_norm_float32": False},
        precisions=("bf16-mixed",),
    ),
    Lever(
        "attention in fp32",
        "(CPU) the CPU's bf16 flash-attention backward is ~8x slower than the fp32 one, for few FLOPs",
        {"attention_float32_on_cpu": False},
        precisions=("bf16-mixed",),
        device="cpu",
    ),
    Lever(
        "native attention kernel",
        "(`ddpm.kernels.attention`, CPU, up to 196 tokens) one (image, head) at a time in cache, q, k and v read"
        " where the projection leaves them, each query's softmax down a column of transposed scores (16 queries"
        " per vector), instead of SDPA's flash kernel, which is mostly overhead at 49 tokens of 16 channels",
        {"native_attention": False},
        device="cpu",
    ),
    Lever(
        "bias gradients apart",
        "(fp32 training, CPU) each convolution's bias gradient as a sum of its output gradient, not within oneDNN's"
        " weight gradient, which takes longer with it",
        {"separate_bias_grad": False},
        tasks=(TRAIN,),
        precisions=("32-true",),
        device="cpu",
    ),
    Lever(
        "Winograd convolutions",
        "(`ddpm.kernels.conv3x3`, fp32, CPU, 3x3 convolutions with stride 1 and a multiple of 16 input channels)"
        " Winograd's minimal filtering, each tile of 4x4 outputs (F(4x4, 3x3)) from the elementwise products of"
        " transformed input patches and filters, 36 small matrix products over the channels, 4x fewer"
        " multiplications than oneDNN's direct convolution, forward, input gradient (the flipped filters) and weight"
        " gradient alike; it rounds up to ~22x more than PyTorch (within 6e-6 of the largest value in the tests)",
        {"winograd": False},
        precisions=("32-true",),
        device="cpu",
    ),
    Lever(
        "Winograd tiles of 4x4 outputs",
        "F(4x4, 3x3) instead of F(2x2, 3x3): 36 products per 16 outputs instead of 16 per 4 (2.25x fewer"
        " multiplications than the direct convolution, rounding errors about PyTorch's)",
        {"winograd_tile": 2},
        precisions=("32-true",),
        device="cpu",
    ),
    Lever(
        "decoder inputs as parts",
        "a decoder block's input and skip connection are not concatenated (a copy of both, written and read"
        " again); the GroupNorm kernel reads each part where it is, and the 1x1 skip convolution sums one"
        " convolution per part with its slice of the weight",
        {"skip_parts": False},
    ),
    Lever(
        "residuals added by oneDNN",
        "(bf16 autocast, CPU) a residual block's skip connection, the attention's input and a 1x1 convolution's"
        " second part are added by oneDNN's binary post-op as the convolution writes its output, instead of"
        " PyTorch's bf16 addition after it (which took longer than the convolution itself on a CPU with AMX)",
        {"fused_sum": False},
        precisions=("bf16-mixed",),
        device="cpu",
    ),
    Lever(
        "time bias in the GroupNorm kernel",
        "where a block's first convolution is oneDNN's, the time embedding's bias per image and channel is folded"
        " into the second GroupNorm's per-channel constants instead of being added to the convolution's output",
        {"bias_in_norm": False},
        device="cpu",
    ),
    Lever(
        "inference_mode",
        "no autograd bookkeeping while sampling (without it: no_grad)",
        tasks=(SAMPLE,),
        no_grad=True,
    ),
    Lever(
        "fused SDPA",
        "(where PyTorch's attention runs) q, k and v have unit stride along the head dimension, so SDPA runs its"
        " flash kernel instead of the math fallback",
        device="cuda",
        math_sdpa=True,
    ),
    Lever("torch.compile", COMPILE, tasks=(SAMPLE,), compiled=True),
    Lever("torch.compile", COMPILE, tasks=(TRAIN,), precisions=("bf16-mixed",), compiled=True),
)


def net(cfg: UNetConfig, device: torch.device, nchw_weights: bool = False, compiled: bool = False) -> UNet:
    """Our net at ``cfg`` (seed 0), its convolution weights in NCHW if ``nchw_weights``, compiled if ``compiled``."""
    torch.manual_seed(0)
    model = UNet(cfg).to(device)
    if nchw_weights:
        model.to(memory_format=torch.contiguous_format)
    if compiled:
        model.compile()
    return model


def levers(plan: Plan, timer: Timer, device: torch.device) -> list[dict[str, Any]]:
    """Each lever with and without it, per task and precision (first configuration): one dict per row, with the
    items/s of both calls."""
    _, cfg = plan.first
    reps, warmup = plan.reps[plan.first[0]], plan.warmup[plan.first[0]]
    x = torch.randn(plan.sample_batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.full((plan.sample_batch,), 500, device=device)
    module = diffusion_module(cfg, device)
    batch = training_batch(cfg, plan.train_batch, device)

    def call(task: str, precision: str, model: UNet, lever: Lever | None = None) -> Callable[[], None]:
        """A sampling or training step of ``model``; without ``lever``'s grad mode or SDPA backend, if given."""
        if task == TRAIN:
            return TrainStep(module, model, batch, precision)
        model.eval()
        grad_mode = torch.no_grad if lever and lever.no_grad else torch.inference_mode
        math = bool(lever and lever.math_sdpa)

        def step() -> None:
            with grad_mode(), autocast(device, precision), sdpa_kernel(SDPBackend.MATH) if math else nullcontext():
                model(x, t)

        return step

    out, compiled = [], {}  # compiled: one net per task (sampling compiles a graph per precision within it)
    for task in (SAMPLE, TRAIN):
        for precision in PRECISIONS:
            chosen = [
                lever
                for lever in LEVERS
                if lever.applies(task, precision, device) and (plan.compile or not lever.compiled)
            ]
            calls = {"default": call(task, precision, net(cfg, device))}
            for lever in chosen:
                if lever.compiled:  # with it: compiled; without it: the default
                    if task not in compiled:
                        compiled[task] = net(cfg, device, compiled=True)
                    calls[lever.name] = call(task, precision, compiled[task])
                    continue
                without = call(task, precision, net(cfg, device, lever.nchw_weights), lever)
                calls[lever.name] = with_settings(without, lever.without)
            seconds = timer.group(calls, reps, warmup)
            items = plan.sample_batch if task == SAMPLE else plan.train_batch
            default = items / seconds["default"]
            for lever in chosen:
                rate = items / seconds[lever.name]
                with_it, without_it = (rate, default) if lever.compiled else (default, rate)
                out.append({"lever": lever.name, "task": task, "precision": precision, "with": with_it})
                out[-1]["without"] = without_it
    return out


def section(plan: Plan, rows: list[dict[str, Any]]) -> list[str]:
    """The report's lever table and what each lever does."""
    lines = [f"## Levers (our net, {plan.first[0]} configuration, side by side)", ""]
    lines += [
        "Each row times our net with the lever and without it, in turns with the other rows of its task and"
        " precision (img/s: images per training step, or per network evaluation while sampling). *With* is the"
        " default net, except for torch.compile, which is off by default.",
        "",
    ]
    cells = [
        [r["lever"], r["task"], r["precision"], num(r["with"]), num(r["without"]), f"{r['with'] / r['without']:.2f}x"]
        for r in rows
    ]
    lines += table(["lever", "measured", "precision", "with (img/s)", "without (img/s)", "with / without"], cells)
    measured = {r["lever"] for r in rows}
    described = {lever.name: lever.does for lever in LEVERS if lever.name in measured}
    does = "; ".join(f"*{name}*: {text}" for name, text in described.items())
    return lines + ["", f"What the levers do: {does}."]
