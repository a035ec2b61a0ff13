"""Throughput of our U-Net and of the peer at the same FLOPs: training steps and sampling chunks, fp32 and bf16
autocast, side by side in the same process (and, with ``--compile-peer``, both compiled)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.calls import (
    TrainStep,
    compared_nets,
    diffusion_module,
    nfe,
    sample_call,
    sample_step_flops,
    training_batch,
)
from benchmarks.configs import PRECISIONS, Plan, diffusion_config
from benchmarks.peer import PeerNet, peer_kwargs
from benchmarks.report import check, num, table
from benchmarks.timing import Probes, Timer
from ddpm.nets import UNet, UNetConfig

TARGETS = (("train", 1.5, "Training"), ("sample", 2.0, "Sampling"))  # task, ratio ours/peer, label


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


def throughput(plan: Plan, timer: Timer, device: torch.device, peer: bool) -> tuple[list[Row], dict[str, Any]]:
    """Training and sampling rows of every configuration for our net and, if installed, the peer."""
    rows: list[Row] = []
    info: dict[str, Any] = {}
    for name, cfg in plan.configs.items():
        reps, warmup = plan.reps[name], plan.warmup[name]
        nets = compared_nets(cfg, device, peer)
        module = diffusion_module(cfg, device)
        batch = training_batch(cfg, plan.train_batch, device)
        steps = {(n, p): TrainStep(module, net, batch, p) for n, net in nets.items() for p in PRECISIONS}
        train_flops = {n: steps[n, PRECISIONS[0]].flops_per_image() for n in nets}
        seconds = timer.group({f"{n} {p}": step for (n, p), step in steps.items()}, reps, warmup)
        rows += [Row(name, "train", p, n, plan.train_batch, train_flops[n], seconds[f"{n} {p}"]) for n, p in steps]
        del steps

        config = diffusion_config(cfg)
        step_flops = {n: sample_step_flops(net, cfg, device) for n, net in nets.items()}
        evaluations = plan.sample_batch * nfe(config, plan.sampler, plan.sample_steps)
        calls = {
            f"{n} {p}": sample_call(net, config, plan.sample_batch, plan.sampler, plan.sample_steps, p)
            for n, net in nets.items()
            for p in PRECISIONS
        }
        seconds = timer.group(calls, reps, warmup)
        rows += [
            Row(name, "sample", p, n, evaluations, step_flops[n], seconds[f"{n} {p}"]) for n in nets for p in PRECISIONS
        ]
        info[name] = {
            "ours": cfg.to_dict(),
            "params": {n: sum(p.numel() for p in net.parameters()) for n, net in nets.items()},
            "train_gflop": {n: v / 1e9 for n, v in train_flops.items()},
            "step_gflop": {n: v / 1e9 for n, v in step_flops.items()},
        }
        if peer:
            info[name]["peer"] = {k: list(v) if isinstance(v, tuple) else v for k, v in peer_kwargs(cfg).items()}
        if plan.compile_peer and name == plan.first[0]:
            rows += compiled_rows(plan, timer, cfg, batch, train_flops, step_flops, peer)
        del nets, module
    return rows, info


def compiled_rows(
    plan: Plan,
    timer: Timer,
    cfg: UNetConfig,
    batch: torch.Tensor,
    train_flops: dict[str, float],
    step_flops: dict[str, float],
    peer: bool,
) -> list[Row]:
    """Both nets under torch.compile (inductor), trained and sampled in bf16-mixed, side by side.

    Each net's own ``forward`` is compiled: ``nn.Module.compile`` compiles ``Module._call_impl``, a code object
    that all modules share, and two modules compiled that way in one process slowed one of them down (on a
    GPU: ours compiled alone trained 1.5-1.7x faster than eagerly; compiled beside the peer, no faster).
    """
    name = plan.first[0]
    device, precision = batch.device, "bf16-mixed"
    torch.manual_seed(0)
    nets: dict[str, nn.Module] = {"ours": UNet(cfg).to(device)}
    if peer:
        torch.manual_seed(0)
        nets["peer"] = PeerNet(cfg).to(device)
    for net in nets.values():
        net.forward = torch.compile(net.forward)
    module = diffusion_module(cfg, device)
    steps = {n: TrainStep(module, net, batch, precision) for n, net in nets.items()}
    seconds = timer.group(steps, plan.reps[name], plan.warmup[name])
    rows = [Row(name, "train", precision, f"{n}, compiled", plan.train_batch, train_flops[n], seconds[n]) for n in nets]
    config = diffusion_config(cfg)
    evaluations = plan.sample_batch * nfe(config, plan.sampler, plan.sample_steps)
    calls = {
        n: sample_call(net, config, plan.sample_batch, plan.sampler, plan.sample_steps, precision)
        for n, net in nets.items()
    }
    seconds = timer.group(calls, plan.reps[name], plan.warmup[name])
    return rows + [
        Row(name, "sample", precision, f"{n}, compiled", evaluations, step_flops[n], seconds[n]) for n in nets
    ]


def targets(plan: Plan, probes: Probes, rows: list[Row], bounds: dict[tuple[str, str], float]) -> list[str]:
    """The throughput targets (first configuration): share of the fp32 limit, and ours over the peer."""
    fp32 = probes.limit("fp32")
    by_key = {(r.task, r.precision, r.net): r for r in rows if r.config == plan.first[0]}
    lines = []
    for task, ratio_target, label in TARGETS:
        for precision in PRECISIONS:
            ours, peer = by_key[task, precision, "ours"], by_key.get((task, precision, "peer"))
            share = ours.gflops / fp32
            text = f"- {label}, {precision}: {100 * share:.0f}% of the fp32 limit (target 60%: {check(share >= 0.6)})"
            if peer is not None:
                ratio = ours.rate / peer.rate
                met = check(ratio >= ratio_target)
                text += f"; {ratio:.2f}x the peer in the same process (target {ratio_target}x: {met})"
                if (task, precision) in bounds:
                    text += (
                        f"; {bounds[task, precision]:.2f}x at most if our net spent no time outside its"
                        " convolutions (see Where the time goes)"
                    )
            lines.append(text + ".")
    for task, ratio_target, label in TARGETS:
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
    return lines


def section(plan: Plan, probes: Probes, rows: list[Row], info: dict[str, Any], peer: bool) -> list[str]:
    """The report's throughput table and the configurations measured."""
    fp32, bf16 = probes.limit("fp32"), probes.limit("bf16")
    lines = [
        "## Throughput: our U-Net and the peer (diffusers UNet2DModel) at the same FLOPs",
        "",
        f"Training: the full step at batch {plan.train_batch} (DiffusionModule.model_step, backward, gradient"
        " clipping, AdamW, EMA update); GFLOP/img is forward + backward. Sampling: `sample_batches` drawing one chunk"
        f" of {plan.sample_batch} images with {plan.sampler} ({plan.sample_steps} steps), in img-steps/s (network"
        " evaluations per second); GFLOP/img is one network evaluation. `bf16-mixed` is bf16 autocast with fp32"
        " weights (Lightning's precision of that name; the params.yaml default for training); `32-true` is fp32.",
        "",
    ]
    cells = []
    by_key = {(r.config, r.task, r.precision, r.net): r for r in rows}
    for r in rows:
        other = by_key.get((r.config, r.task, r.precision, "peer" + r.net[4:]))
        ratio = f"**{r.rate / other.rate:.2f}x**" if r.net.startswith("ours") and other else ""
        task = r.task + (" (img/s)" if r.task == "train" else " (img-steps/s)")
        cells.append(
            [r.config, task, r.precision, r.net, f"{r.flops_per_item / 1e9:.3f}", num(r.rate), num(r.gflops)]
            + [f"{100 * r.gflops / fp32:.0f}%", f"{100 * r.gflops / bf16:.0f}%", ratio]
        )
        if r.net == "ours" and not peer:
            cells.append([r.config, task, r.precision, "peer", "not installed", "", "", "", "", ""])
    header = ["config", "task", "precision", "net", "GFLOP/img", "rate", "GFLOP/s", "% fp32 limit"]
    lines += table([*header, "% bf16 limit", "ours/peer"], cells)
    lines += ["", "Configurations (the peer has the same blocks, widths, attention levels and parameter count):", ""]
    for name, i in info.items():
        lines.append(f"- **{name}**: ours `UNetConfig({', '.join(f'{k}={v}' for k, v in i['ours'].items())})`")
        if "peer" in i:
            lines.append(f"  peer `UNet2DModel({', '.join(f'{k}={v}' for k, v in i['peer'].items())})`")
        gflop = ", ".join(f"{n} {v:.3f}" for n, v in i["train_gflop"].items())
        lines.append(f"  parameters {i['params']}; GFLOP per training image: {gflop}")
    return lines
