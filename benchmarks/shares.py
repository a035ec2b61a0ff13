"""Where the time goes: the torch profiler's self CPU time of a training step and a sampling chunk, by operator kind,
for our net and the peer."""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.calls import TrainStep, compared_nets, diffusion_module, sample_call, training_batch
from benchmarks.configs import PRECISIONS, Plan, diffusion_config
from benchmarks.report import table

SHARES = ("convolutions", "matmuls", "attention", "GroupNorm", "SiLU", "casts and copies", "other")


def op_kind(name: str) -> str:
    """The kind of an aten operator, for the time shares (:data:`SHARES`)."""
    if any(k in name for k in ("convolution", "conv2d", "conv_transpose", "winograd")) or name in (
        "_Conv3x3",
        "_Conv3x3Backward",
    ):  # oneDNN's; ATen's im2col path (aten::_slow_conv2d_*: bf16 on CPUs without oneDNN's bf16 path); the Winograd
        return "convolutions"  # kernel (forward without autograd, forward, backward)
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


def time_shares(plan: Plan, device: torch.device, peer: bool, calls: int = 2) -> list[dict[str, Any]]:
    """Where the time of a training step and of a sampling chunk goes, by operator kind (first configuration).

    The torch profiler's self CPU time of every operator over ``calls`` calls after one warm-up call, summed by
    :func:`op_kind`. The convolutions are oneDNN's for both nets, so ``peer total / our convolutions`` bounds
    the ratio ours/peer that any change outside our convolutions could reach. CPU only (on a GPU the host's
    time is not the kernels').
    """
    if device.type != "cpu":
        return []
    from torch.profiler import ProfilerActivity, profile

    _, cfg = plan.first
    nets = compared_nets(cfg, device, peer)
    module = diffusion_module(cfg, device)
    batch = training_batch(cfg, plan.train_batch, device)
    out = []
    for task in ("train", "sample"):
        for precision in PRECISIONS:
            for net_name, net in nets.items():
                if task == "train":
                    call = TrainStep(module, net.train(), batch, precision)
                else:
                    config = diffusion_config(cfg)
                    call = sample_call(net, config, plan.sample_batch, plan.sampler, plan.sample_steps, precision)
                call()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(calls):
                        call()
                ms = dict.fromkeys(SHARES, 0.0)
                for event in prof.key_averages():
                    ms[op_kind(event.key)] += event.self_cpu_time_total / 1e3 / calls
                out.append({"task": task, "precision": precision, "net": net_name, "ms": ms})
    return out


def bounds(shares: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """(task, precision) -> the peer's total time over our convolutions' time: the most ours/peer can be."""
    by = {(r["task"], r["precision"], r["net"]): r["ms"] for r in shares}
    return {
        (task, precision): sum(by[task, precision, "peer"].values()) / by[task, precision, "ours"]["convolutions"]
        for task, precision, net in by
        if net == "ours" and (task, precision, "peer") in by and by[task, precision, "ours"]["convolutions"] > 0
    }


def section(plan: Plan, shares: list[dict[str, Any]]) -> list[str]:
    """The report's time shares, and the bound they set on ours/peer."""
    if not shares:
        return []
    lines = [
        f"## Where the time goes ({plan.first[0]} configuration, torch profiler)",
        "",
        "Self CPU time of every operator, summed by kind, per training step (batch"
        f" {plan.train_batch}) and per sampling chunk ({plan.sample_batch} images, {plan.sample_steps} steps), after"
        " one warm-up call; the profiler adds a little time to every operator. The peer's total over our"
        " convolutions' time bounds what ours/peer could become with everything else free. Our convolutions"
        " are the Winograd kernel's (fp32 3x3, stride 1) and oneDNN's (the rest, and all of them under bf16"
        " autocast, where they add the residuals too); the peer's are oneDNN's. Our GroupNorm column is the"
        " native kernel, which includes the SiLU after the norm (and, under bf16 autocast, the casts around"
        " it); our attention column is the native attention kernel.",
        "",
    ]
    cells = []
    for r in shares:
        total = sum(r["ms"].values())
        shares_of = [f"{100 * r['ms'][k] / total:.0f}%" for k in SHARES]
        cells.append([r["task"], r["precision"], r["net"], f"{total:,.0f}", *shares_of])
    lines += table(["task", "precision", "net", "ms per call", *SHARES], cells)
    bound = bounds(shares)
    if bound:
        listed = ", ".join(f"{task} {precision} {b:.2f}x" for (task, precision), b in bound.items())
        lines += ["", f"Bound on ours/peer (peer total / our convolutions): {listed}."]
    return lines
