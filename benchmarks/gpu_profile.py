"""The GPU profile (``configs/gpu.yaml``) against its goals, measured in one process on one GPU.

    benchmarks/gpu/profile.sh                      # on a GPU machine: the whole run -> benchmarks/gpu/profile.md
    python -m benchmarks.gpu_profile --dry-run     # the resolved profile and what would be measured; nothing runs
    python -m benchmarks.gpu_profile --quick       # a tiny net, 2 repetitions, traced with `eager` (tests the harness)

What it measures, each group of calls taking turns with the probes of the matmul rate (:mod:`benchmarks.timing`):

- the machine's bf16 matmul limit (``torch.mm`` of 8192 x 8192 matrices on a GPU);
- training images/s at the profile's batch: our net as the train stage runs it with the profile (its
  ``train.precision``, compiled as ``train.compile`` says, channels-last, fused AdamW on CUDA, clipping and EMA
  as :class:`~benchmarks.calls.TrainStep`), and diffusers' UNet2DModel of the same architecture
  (:mod:`benchmarks.peer`) as a plain script runs it: eager, NCHW, torch's default AdamW, same precision;
- sampling image-steps/s: one chunk of ``sample.batch_size`` images with the profile's sampler and steps through
  ``sample_batches`` (as the sample stage draws), ours compiled as ``sample.compile`` says
  (``reduce-overhead``: CUDA graphs), diffusers eager, both under ``sample.precision``;
- our share of the bf16 limit (FLOPs counted by ``torch.utils.flop_counter`` on the plain nets);
- the compile seconds: a first call's wall time beyond a steady call's, for training and for sampling;
- host-device synchronisations in a training step and in a sampling chunk (CUDA's sync debug mode; GPU only).

The goals (issue 26): training at least 2x diffusers and 30% of the bf16 limit; sampling at least 3x diffusers;
no synchronisation in a training step and one per sampling chunk (the copy of its images to the host).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pipeline  # noqa: F401  (the stages' OpenMP environment, set before torch loads libgomp)
import torch
import yaml
from pipeline import overrides, params

from benchmarks import syncs
from benchmarks.calls import TrainStep, nfe, sample_call, sample_step_flops, training_batch
from benchmarks.configs import ROOT
from benchmarks.peer import PeerNet, peer_kwargs, peer_version
from benchmarks.report import check, document, machine, num, percent, table
from benchmarks.throughput import Row
from benchmarks.timing import Probes, Timer
from ddpm.config import ConfigError, DDPMConfig, SampleConfig, TrainConfig, UNetConfig
from ddpm.module import DiffusionModule, adamw
from ddpm.nets import UNet
from ddpm.runtime import compile_in_place, inductor_cache

PROFILE = Path("configs/gpu.yaml")
OUT = Path("benchmarks/gpu/profile.md")
GOALS = {"train": 2.0, "share": 0.30, "sample": 3.0}  # ours/diffusers, share of the bf16 limit, ours/diffusers


@dataclass(frozen=True)
class Setup:
    """What one run measures: the nets, the diffusion, the profile's train and sample sections, and its sizes."""

    profile: Path
    net: UNetConfig
    diffusion: DDPMConfig
    train: TrainConfig
    sample: SampleConfig
    reps: int
    quick: bool

    @property
    def sampler(self) -> tuple[str, int]:
        """The sampler and steps of a chunk (the sample section's, else the diffusion section's)."""
        cfg = self.diffusion.with_sampler(self.sample.sampler, self.sample.steps)
        return cfg.sampler, cfg.steps


def setup(profile: Path, quick: bool, reps: int | None, compile: Any) -> Setup:
    """The profile over params.yaml, validated as a stage validates it; ``quick`` shrinks the net and the batches,
    ``compile`` (not None) replaces both compile settings."""
    p = params.validate(overrides.merge(params.read_yaml(ROOT / params.PARAMS), overrides.read(ROOT / profile)))
    size, channels = p.data.native_shape()
    model = {**p.model, "num_classes": None}  # unconditional, as the peer
    if quick:  # the profile's kind of net, tiny: 8x8 images, two levels, attention at 4
        model.update(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), norm_groups=8)
        size = 8
    net = UNetConfig.from_dict({**model, "in_channels": channels, "image_size": size}, "model")
    diffusion = DDPMConfig.from_dict({**p.diffusion, "channels": channels, "image_size": size}, "diffusion")
    train, sample = p.train, p.sample
    if quick:
        train, sample = train.replace(batch_size=4), sample.replace(batch_size=4, steps=2)
    if compile is not None:  # validated as the params keys it replaces
        train = TrainConfig.from_dict({**train.to_dict(), "compile": compile}, "train")
        sample = SampleConfig.from_dict({**sample.to_dict(), "compile": compile}, "sample")
    return Setup(profile, net, diffusion, train, sample, reps or (2 if quick else 5), quick)


def describe(s: Setup, device: str) -> list[str]:
    """The settings of a run, as lines of markdown."""
    sampler, steps = s.sampler
    return [
        f"- profile `{s.profile}` over params.yaml; device {device}",
        f"- ours: `UNetConfig({', '.join(f'{k}={v}' for k, v in s.net.to_dict().items())})`",
        f"- diffusers: `UNet2DModel({', '.join(f'{k}={v}' for k, v in peer_kwargs(s.net).items())})`",
        f"- training: batch {s.train.batch_size}, precision {s.train.precision}, compile {s.train.compile!r} (ours),"
        " fused AdamW where the net is on CUDA (ours), torch's default AdamW (diffusers)",
        f"- sampling: one chunk of {s.sample.batch_size} images, {sampler} with {steps} steps,"
        f" precision {s.sample.precision}, compile {s.sample.compile!r} (ours)",
        f"- {s.reps} timed repetitions per row after warm-up; inductor cache {inductor_cache()}",
    ]


def timed(call: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Seconds of one call of ``call``."""
    sync()
    start = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - start


def measure(s: Setup, device: torch.device, timer: Timer) -> tuple[list[Row], dict[str, float], dict[str, int]]:
    """The training and sampling rows of ours and diffusers, ours' compile seconds (a first call's seconds beyond
    a steady call's) and synchronisations (GPU only), by task."""
    torch.manual_seed(0)
    module = DiffusionModule(UNet(s.net), s.diffusion, s.train).to(device)
    sampling = copy.deepcopy(module.net)  # the EMA net's twin: compiled for sampling only
    plain = copy.deepcopy(module.net)  # FLOPs are counted on a net that is not compiled
    torch.manual_seed(0)
    peer = PeerNet(s.net).to(device)
    compile_in_place(module.net, s.train.compile)
    batch = training_batch(s.net, s.train.batch_size, device)
    precision = s.train.precision
    steps = {
        "ours": TrainStep(module, module.net, batch, precision, adamw(list(module.net.parameters()), module.optim)),
        "diffusers": TrainStep(module, peer, batch, precision),
    }
    flops = {
        "ours": TrainStep(module, plain, batch[:2], precision).flops_per_image(),
        "diffusers": TrainStep(module, peer, batch[:2], precision).flops_per_image(),
    }
    first = timed(steps["ours"], timer.sync)
    seconds = timer.group(steps, s.reps, warmup=1)
    rows = [Row("profile", "train", precision, n, s.train.batch_size, flops[n], seconds[n]) for n in steps]
    compiling = {"train": first - seconds["ours"]}

    compile_in_place(sampling, s.sample.compile)
    sampler, n_steps = s.sampler
    chunk = s.sample.batch_size
    draws = {
        n: sample_call(net, s.diffusion, chunk, sampler, n_steps, s.sample.precision)
        for n, net in (("ours", sampling), ("diffusers", peer))
    }
    step_flops = {"ours": sample_step_flops(plain, s.net, device), "diffusers": sample_step_flops(peer, s.net, device)}
    first = timed(draws["ours"], timer.sync)
    seconds = timer.group(draws, s.reps, warmup=1)
    items = chunk * nfe(s.diffusion, sampler, n_steps)
    rows += [Row("profile", "sample", s.sample.precision, n, items, step_flops[n], seconds[n]) for n in draws]
    compiling["sample"] = first - seconds["ours"]

    counted = {}
    if device.type == "cuda":
        counted = {
            "training step": syncs.count(steps["ours"], device),
            "sampling chunk": syncs.count(draws["ours"], device),
        }
    return rows, compiling, counted


def targets(s: Setup, rows: list[Row], bf16: float, compiling: dict[str, float], counted: dict[str, int]) -> list[str]:
    """The goals and whether this run met them (``bf16``: the limit in GFLOP/s)."""
    by = {(r.task, r.net): r for r in rows}
    train, sample = by["train", "ours"], by["sample", "ours"]
    train_ratio = train.rate / by["train", "diffusers"].rate
    sample_ratio = sample.rate / by["sample", "diffusers"].rate
    share = train.gflops / bf16
    lines = [
        f"- Training, ours as the profile trains it: {num(train.rate)} img/s, {train_ratio:.2f}x diffusers eager"
        f" (goal {GOALS['train']}x: {check(train_ratio >= GOALS['train'])}), {percent(share)} of the bf16 matmul"
        f" limit (goal {percent(GOALS['share'])}: {check(share >= GOALS['share'])}).",
        f"- Sampling, ours as the profile draws: {num(sample.rate)} img-steps/s, {sample_ratio:.2f}x diffusers eager"
        f" (goal {GOALS['sample']}x: {check(sample_ratio >= GOALS['sample'])}).",
        f"- Compile seconds (the first call beyond a steady one): training {compiling['train']:.1f} s"
        f" (compile {s.train.compile!r}), sampling {compiling['sample']:.1f} s (compile"
        f" {s.sample.compile!r}); inductor's cache is {inductor_cache()}, which a second run loads from.",
    ]
    if counted:
        step, chunk = counted["training step"], counted["sampling chunk"]
        lines.append(
            f"- Host-device synchronisations (CUDA's sync debug mode): {step} in a training step (goal 0:"
            f" {check(step == 0)}), {chunk} in a sampling chunk (goal 1: {check(chunk == 1)})."
        )
    else:
        lines.append("- Host-device synchronisations: counted on a GPU only.")
    return lines


def rows_section(rows: list[Row], bf16: float) -> list[str]:
    """The timed rows as a table (``bf16``: the limit in GFLOP/s)."""
    by = {(r.task, r.net): r for r in rows}
    cells = [
        [
            r.task,
            r.net,
            f"{r.flops_per_item / 1e9:.3f}",
            f"{num(r.rate)} {'img/s' if r.task == 'train' else 'img-steps/s'}",
            num(r.gflops),
            percent(r.gflops / bf16),
            f"**{r.rate / by[r.task, 'diffusers'].rate:.2f}x**" if r.net == "ours" else "",
        ]
        for r in rows
    ]
    header = ["task", "net", "GFLOP/item", "rate", "GFLOP/s", "% bf16 limit", "ours/diffusers"]
    return ["## Rows", "", *table(header, cells)]


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--profile", type=Path, default=PROFILE, help=f"overrides file of the project (default {PROFILE})")
    cli.add_argument("--dry-run", action="store_true", help="print the resolved settings and stop")
    cli.add_argument("--quick", action="store_true", help="a tiny net and batches, compile eager (tests the harness)")
    cli.add_argument("--reps", type=int, default=None, help="timed repetitions per row (default 5; quick 2)")
    cli.add_argument(
        "--compile", type=yaml.safe_load, default=None, help="replace both compile settings (e.g. false, eager)"
    )
    cli.add_argument("--out", type=Path, default=None, help=f"markdown output (default {OUT}; none for --quick)")
    return cli


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    compile = "eager" if args.quick and args.compile is None else args.compile
    s = setup(args.profile, args.quick, args.reps, compile)
    device = torch.device("cuda" if cuda else "cpu")
    where = torch.cuda.get_device_name(device) if cuda else "cpu"
    if args.dry_run:
        print("\n".join(describe(s, where)))
        return
    if not cuda and not args.quick:
        raise ConfigError(
            "torch sees no CUDA GPU: run this on a GPU machine, or --quick (a tiny net) or --dry-run here"
        )
    if peer_version() is None:
        raise ConfigError("diffusers is not installed: pip install -e '.[bench]'")
    probes = Probes(device, *((256,) * 3 if args.quick else (8192,) * 3))
    timer = Timer(device, probes)
    rows, compiling, counted = measure(s, device, timer)
    bf16 = probes.limit("bf16")
    command = "python -m benchmarks.gpu_profile " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = [["## Settings", "", *describe(s, where)], probes.section(), rows_section(rows, bf16)]
    mach = machine(device, peer_version())
    text = document(
        command.strip(),
        (time.perf_counter() - started) / 60,
        mach,
        targets(s, rows, bf16, compiling, counted),
        sections,
    )
    out = args.out or (None if args.quick else ROOT / OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, OSError) as e:  # a bad profile or setting, no GPU: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
