"""Convolution phases: our net's convolutions in one fp32 training step, timed by phase (forward, input gradient,
weight gradient), each as the net runs it: the Winograd kernel or oneDNN."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.calls import diffusion_module, training_batch
from benchmarks.configs import Plan
from benchmarks.report import num, percent, table
from benchmarks.throughput import Row
from benchmarks.timing import Probes, Timer
from ddpm import kernels
from ddpm.nets import Conv2d, UNet

CONV_PHASES = ("forward", "input gradient", "weight gradient")


def convolutions(plan: Plan, device: torch.device) -> dict[tuple, int]:
    """The distinct convolutions of a training forward at the training batch (first configuration), by forward
    hooks, with how often each runs: (input shape, weight shape, stride, padding, dilation, groups, with bias, input
    needs a gradient, output shape, Winograd tile or 0, upsample) -> count.

    A decoder block's 1x1 skip convolution gets (input, skip connection): one convolution per part, with its slice of
    the weight (the bias with the first). The net's Upsample convolves x upsampled x2 (within the Winograd kernel).
    """
    _, cfg = plan.first
    torch.manual_seed(0)
    net = UNet(cfg).to(device).train()
    found: dict[tuple, int] = {}

    def hook(conv: nn.Conv2d, args: tuple[Tensor, ...], kwargs: dict[str, Any], out: Tensor) -> None:
        x, upsample = args[0], bool(kwargs.get("upsample"))
        parts = (x,) if isinstance(x, Tensor) else tuple(x)
        for k, part in enumerate(parts):
            w_shape = (conv.weight.shape[0], part.shape[1], *conv.weight.shape[2:])
            key = (tuple(part.shape), w_shape, conv.stride, conv.padding, conv.dilation, conv.groups)
            winograd = isinstance(conv, Conv2d) and kernels.uses_winograd(conv, part)
            tile = kernels.settings.winograd_tile if winograd else 0
            key += (conv.bias is not None and k == 0, part.requires_grad, tuple(out.shape), tile, upsample)
            found[key] = found.get(key, 0) + 1

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in net.modules() if isinstance(m, nn.Conv2d)]
    diffusion_module(cfg, device).model_step(training_batch(cfg, plan.train_batch, device), net=net)
    for h in handles:
        h.remove()
    return found


def conv_phases(plan: Plan, timer: Timer, device: torch.device) -> list[dict[str, Any]]:
    """Our net's convolutions in one fp32 training step, timed by phase: forward, input and weight gradient.

    Each distinct convolution (:func:`convolutions`) runs alone, as the net runs it, its phases taking turns with all
    the others': the Winograd kernel's forward, input gradient and weight gradient (each with its filter transform)
    for the 3x3 convolutions that take it, oneDNN's through ``aten::convolution_backward`` with one output at a time
    for the others. Every phase does the forward's FLOPs (counted as a direct convolution's). A convolution whose
    input needs no gradient (the first, on the data) has no input-gradient phase, as in training. Returns one dict
    per phase: convolutions, of which Winograd, ms and GFLOP per step.
    """
    cl = torch.channels_last
    calls: dict[str, Callable[[], Any]] = {}
    work: dict[str, tuple[str, int, float, bool]] = {}  # call -> (phase, count, FLOPs, Winograd)
    for i, (key, count) in enumerate(convolutions(plan, device).items()):
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
        seconds = timer.group(calls, max(3, plan.reps[plan.first[0]]), 1)
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


def section(plan: Plan, probes: Probes, phases: list[dict[str, Any]], rows: list[Row]) -> list[str]:
    """The report's convolution phases, and what the fp32 training step would reach without the rest."""
    if not phases:
        return []
    fp32, first = probes.limit("fp32"), plan.first[0]
    lines = [
        f"## Convolution phases (our net, {first} configuration, one fp32 training step at batch {plan.train_batch})",
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

    lines += table(
        ["phase", "convolutions", "Winograd", "ms per step", "GFLOP per step", "GFLOP/s", "% fp32 limit"],
        [
            [p["phase"], p["convolutions"], p["winograd"], f"{p['ms']:,.1f}", f"{p['gflop']:.1f}", num(rate(p)),
             percent(rate(p) / fp32)]
            for p in [*phases, total]
        ],
    )  # fmt: skip
    by_phase = {p["phase"]: p for p in phases}
    fwd, wgrad = by_phase["forward"], by_phase["weight gradient"]
    at_forward_rate = total["ms"] - wgrad["ms"] + wgrad["gflop"] / fwd["gflop"] * fwd["ms"]
    key = (first, "train", "32-true", "ours")
    step = next((r for r in rows if (r.config, r.task, r.precision, r.net) == key), None)
    text = (
        "With no time outside these convolutions, the fp32 training step would run at"
        f" {100 * rate(total) / fp32:.0f}% of the fp32 limit"
    )
    if step is not None:
        text += f" (the whole step, measured above: {100 * step.gflops / fp32:.0f}%)"
    at_forward = 100 * total["gflop"] / at_forward_rate * 1e3 / fp32
    text += f"; with the weight gradients at the forward's rate, at {at_forward:.0f}%."
    return lines + ["", text]
