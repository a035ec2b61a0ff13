"""The train and sample stages' own code, timed end to end with the throughput switches on and off.

    python -m benchmarks.e2e --steps 300 --out benchmarks/e2e.md
    python -m benchmarks.e2e --quick --params P   # a tiny run that checks the harness (its test); rates mean nothing

Trains the params.yaml model on the params.yaml data with :func:`ddpm.fit.train` (a Lightning fit,
``--steps`` optimizer steps) once per training variant (precision, ``train.compile``), then draws
``--n`` images with :func:`pipeline.sample.write_samples` once per sampling variant (``sample.precision``,
``sample.compile``) from the first variant's model. Training throughput is the steady rate after
``--warmup-steps`` (compilation happens in the first step); the total wall time, compilation included, is
reported beside it. A sampling variant draws one chunk first (where it compiles), then the timed ``--n``.
Each variant runs in a fresh process, as a stage does (with :func:`ddpm.runtime.keep_freed_memory`): one
process that compiles several networks can get slower code for the later ones. Where torch sees a GPU,
everything runs there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml

from ddpm import datasets, export, fit, generate
from ddpm.config import DataConfig, SampleConfig, TrainConfig
from ddpm.runtime import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
TRAIN_VARIANTS = (("bf16-mixed", False), ("bf16-mixed", True), ("32-true", False))
SAMPLE_VARIANTS = (("32-true", False), ("bf16-mixed", False), ("32-true", True), ("bf16-mixed", True))
FULL = (("steps", 300), ("warmup-steps", 50), ("compile", "true"), ("at-once", 1))
QUICK = (("steps", 3), ("warmup-steps", 1), ("n", 16), ("compile", "eager"), ("at-once", 2))


class SteadyRate(pl.Callback):
    """Images per second between the ends of step ``warmup`` and of the last step (two synchronisations).

    The final validation, which Lightning runs after the last step's end, is not timed.
    """

    def __init__(self, warmup: int, batch_size: int) -> None:
        self.warmup, self.batch_size = warmup, batch_size
        self.start: tuple[int, float] | None = None
        self.rate = float("nan")

    def _now(self, module: pl.LightningModule) -> float:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.start = (trainer.global_step, self._now(module))
        elif self.start is not None and trainer.global_step == trainer.max_steps:
            step, started = self.start
            self.rate = (trainer.global_step - step) * self.batch_size / (self._now(module) - started)


PARAMS = ROOT / "params.yaml"  # --params replaces it, in this process and in its jobs


def params() -> dict[str, Any]:
    return yaml.safe_load(PARAMS.read_text())


def accelerator() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def train_job(precision: str, compile: bool, out: Path, steps: int, warmup: int) -> dict[str, Any]:
    """One training variant: steady img/s, total seconds and the final EMA validation loss."""
    p = params()
    train_set, val_set = datasets.split(
        datasets.load(DataConfig.from_dict(p["data"], "data")), p["data"]["test_fraction"], p["data"]["seed"]
    )
    settings = {"max_steps": steps, "val_every": steps, "checkpoint_every": None, "accelerator": accelerator()}
    cfg = TrainConfig.from_dict({**p["train"], **settings, "precision": precision, "compile": compile}, "train")
    rate = SteadyRate(warmup, cfg.batch_size)
    started = time.perf_counter()
    result = fit.train(train_set, val_set, p["model"], p["diffusion"], cfg, out, False, resume=False, callbacks=[rate])
    total = time.perf_counter() - started
    return {"rate": rate.rate, "total": total, "val_loss_ema": result["val_loss_ema"], "n_train": len(train_set)}


def sample_job(precision: str, compile: bool, model: Path, n: int | None) -> dict[str, Any]:
    """One sampling variant: img/s of the timed draw after a one-chunk warm-up, and the warm-up's seconds."""
    sample = params()["sample"]
    sample["n"] = n or sample["n"]
    from pipeline.sample import write_samples  # after torch: the stages' OpenMP setting is the stage's own

    loaded = export.load_model(model)
    if accelerator() == "gpu":
        loaded.net.cuda()
    warm = SampleConfig.from_dict(
        {**sample, "n": sample["batch_size"], "precision": precision, "compile": compile}, "sample"
    )
    plan = generate.plan(loaded.config, warm.sampler, warm.steps, warm.eta)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        write_samples(loaded, plan, warm, Path(tmp), progress=False)
        warmup = time.perf_counter() - started
        timed = SampleConfig.from_dict({**sample, "precision": precision}, "sample")  # compiled in place above
        meta = write_samples(loaded, plan, timed, Path(tmp), progress=False)
    return {"rate": meta["images_per_second"], "nfe": meta["nfe"], "warmup": warmup}


def run_job(*args: str, threads: int | None = None) -> dict[str, Any]:
    """``python -m benchmarks.e2e --job ...`` in a fresh process (with ``threads`` OpenMP threads); its JSON line."""
    command = [sys.executable, "-m", "benchmarks.e2e", "--params", str(PARAMS), "--job", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    global PARAMS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a tiny run that checks the harness, not the speed (defaults {' '.join(f'--{k} {v}' for k, v in QUICK)})",
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per training variant (default 300)")
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="steps before the steady rate is timed (default 50)"
    )
    parser.add_argument("--n", type=int, default=None, help="images per sampling variant (default: sample.n)")
    parser.add_argument("--out", type=Path, default=None, help="markdown output (also printed)")
    parser.add_argument(
        "--compile",
        default=None,
        help="the compiled variants' setting: true (inductor, the default) or a backend (eager)",
    )
    parser.add_argument("--params", type=Path, default=None, help="params.yaml of the model and data (the project's)")
    parser.add_argument(
        "--at-once",
        type=int,
        default=None,
        help="variants run at a time, sharing the cores (default 1; more than 1 checks the code, not the speed)",
    )
    parser.add_argument("--job", nargs=4, metavar=("KIND", "PRECISION", "COMPILE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in QUICK if args.quick else FULL:  # what the command line left unset
        if getattr(args, key.replace("-", "_")) is None:
            setattr(args, key.replace("-", "_"), value)
    PARAMS = (args.params or PARAMS).resolve()
    if args.job:
        keep_freed_memory()
        kind, precision, compile, path = args.job
        compile = json.loads(compile)
        if kind == "train":
            result = train_job(precision, compile, Path(path), args.steps, args.warmup_steps)
        else:
            result = sample_job(precision, compile, Path(path), args.n)
        print(json.dumps(result))
        return
    p = params()
    device = torch.cuda.get_device_name() if accelerator() == "gpu" else "cpu"
    lines = [f"# End to end: the stages' code on {device} (torch {torch.__version__})", ""]
    rows = ["| training | compile | steady img/s | total s | val loss (EMA) |", "|---|---|---|---|---|"]
    common = ["--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps)]
    setting = json.dumps(True if args.compile == "true" else args.compile)
    threads = max(1, (os.cpu_count() or 1) // args.at_once) if args.at_once > 1 else None
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=args.at_once) as pool:
        outs = [Path(tmp, f"{precision}-{compile}") for precision, compile in TRAIN_VARIANTS]
        trained = [
            pool.submit(
                run_job, "train", precision, setting if compile else "false", str(out), *common, threads=threads
            )
            for (precision, compile), out in zip(TRAIN_VARIANTS, outs)
        ]
        n_train = trained[0].result()["n_train"]  # the sampling variants draw from the first variant's model
        n = args.n or p["sample"]["n"]
        extra = ["--n", str(n)]
        drawn = [
            pool.submit(
                run_job,
                "sample",
                precision,
                setting if compile else "false",
                str(outs[0] / "model.pt"),
                *extra,
                threads=threads,
            )
            for precision, compile in SAMPLE_VARIANTS
        ]
        for (precision, compile), job in zip(TRAIN_VARIANTS, trained):
            r, shown = job.result(), args.compile if compile else "false"
            rows.append(f"| {precision} | {shown} | {r['rate']:,.0f} | {r['total']:.1f} | {r['val_loss_ema']:.4f} |")
            print(rows[-1], flush=True)
        lines += [
            f"`python -m benchmarks.e2e --steps {args.steps}`: `ddpm.fit.train` for {args.steps} steps at"
            f" batch {p['train']['batch_size']} ({n_train} training images), steady rate from step"
            f" {args.warmup_steps} to the last step; total wall time includes Lightning's start, compilation and"
            " the final validation. Each variant in a fresh process.",
            "",
            *rows,
        ]
        lines += [
            "",
            f"Sampling: `pipeline.sample.write_samples` of {n} images, {p['sample']['sampler']} with"
            f" {p['sample']['steps']} steps, chunks of {p['sample']['batch_size']}, after one chunk of warm-up"
            " (compilation); each variant in a fresh process.",
            "",
            "| sampling | compile | img/s | img-steps/s | warm-up chunk s |",
            "|---|---|---|---|---|",
        ]
        for (precision, compile), job in zip(SAMPLE_VARIANTS, drawn):
            r, shown = job.result(), args.compile if compile else "false"
            lines.append(
                f"| {precision} | {shown} | {r['rate']:,.1f} | {r['rate'] * r['nfe']:,.0f} | {r['warmup']:.1f} |"
            )
            print(lines[-1], flush=True)
    if args.at_once > 1:
        lines += ["", f"{args.at_once} variants ran at a time, sharing the cores: these rates do not compare."]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
