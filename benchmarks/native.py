"""Which native kernels to run on this CPU: our net's fp32 training step and sampling chunk with PyTorch's ops, with
the kernels this CPU's path runs by default (``ddpm.kernels.build.DEFAULT_KERNELS``), with all three, and with all
but one, side by side in one process (the rows take turns within each repetition, medians).

``python -m benchmarks.native --out benchmarks/native.md`` (``make bench-native``, about 6 minutes on 2 cores);
``--quick`` times the tiny net once (a check that it runs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.calls import TrainStep, diffusion_module, sample_call, training_batch
from benchmarks.configs import default_model, diffusion_config, tiny_model
from benchmarks.report import table
from benchmarks.timing import in_turns
from ddpm import kernels
from ddpm.kernels import build
from ddpm.nets import UNet, UNetConfig

# row: (DDPM_NATIVE_KERNELS, kernel settings switched off)
ARMS: dict[str, tuple[str, dict[str, bool]]] = {
    "PyTorch's ops (DDPM_NATIVE_KERNELS=0)": ("0", {}),
    "this CPU's default (auto)": ("auto", {}),
    "all three kernels (DDPM_NATIVE_KERNELS=1)": ("1", {}),
    "all but Winograd": ("1", {"winograd": False}),
    "all but GroupNorm+SiLU": ("1", {"native_group_norm": False}),
    "all but attention": ("1", {"native_attention": False}),
}
BASELINE = next(iter(ARMS))


@contextlib.contextmanager
def _env(value: str) -> Iterator[None]:
    saved = os.environ.get(kernels.ENV)
    os.environ[kernels.ENV] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[kernels.ENV]
        else:
            os.environ[kernels.ENV] = saved


def arm(call: Callable[[], Any], env: str, off: dict[str, bool]) -> Callable[[], None]:
    """``call`` with ``DDPM_NATIVE_KERNELS=env`` and the kernel settings ``off``, restored after each call."""

    def run() -> None:
        with _env(env), kernels.using(**off):
            call()

    return run


def measure(cfg: UNetConfig, train_batch: int, sample_batch: int, reps: int) -> dict[str, dict[str, float]]:
    """Median seconds of a training step and of a sampling chunk (dpmpp_2m, 2 steps) per arm, fp32."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    net = UNet(cfg)
    step = TrainStep(diffusion_module(cfg, device), net, training_batch(cfg, train_batch, device), "32-true")
    draw = sample_call(net, diffusion_config(cfg), sample_batch, "dpmpp_2m", 2, "32-true")
    seconds = {}
    for task, call in (("train", step), ("sample", draw)):
        times = in_turns({name: arm(call, env, off) for name, (env, off) in ARMS.items()}, reps, 1)
        seconds[task] = {name: statistics.median(t) for name, t in times.items()}
    return seconds


def report(seconds: dict[str, dict[str, float]], args: argparse.Namespace, cfg: UNetConfig) -> list[str]:
    flags, model = "", platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    wide = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx2") if f" {f}" in flags]
    lines = [
        "# Native kernels on this CPU",
        "",
        f"`python -m benchmarks.native{' --quick' if args.quick else ''} --reps {args.reps}` on"
        f" {model} ({', '.join(wide) or 'no AVX2'}), {torch.get_num_threads()}"
        f" threads, torch {torch.__version__}. {build.summary(file=False)}.",
        "",
        f"Our net `UNetConfig({', '.join(f'{k}={v}' for k, v in cfg.to_dict().items())})` in fp32: a training step"
        f" at batch {args.train_batch} and a sampling chunk of {args.sample_batch} images (dpmpp_2m, 2 steps), the"
        f" rows taking turns within each of {args.reps} repetitions; medians, and PyTorch's ops over each row.",
        "",
    ]
    rows = []
    for name in ARMS:
        cells = [name]
        for task in ("train", "sample"):
            s = seconds[task][name]
            cells += [f"{s:.3f}", f"{seconds[task][BASELINE] / s:.2f}x"]
        rows.append(cells)
    return lines + table(["kernels", "train step s", "vs ops", "sampling chunk s", "vs ops"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny net, one repetition")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5; 1 with --quick)")
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--sample-batch", type=int, default=250)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here (default: print)")
    args = parser.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 5)
    if args.quick:
        args.train_batch, args.sample_batch = 8, 8
    cfg = tiny_model() if args.quick else default_model()
    if build.extension() is None:
        raise SystemExit(f"benchmarks.native: {build.summary()}")
    text = "\n".join(report(measure(cfg, args.train_batch, args.sample_batch, args.reps), args, cfg)) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
