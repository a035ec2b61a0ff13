"""Time to quality: the classifier FID of the EMA model against training minutes, one curve per recipe.

    python -m benchmarks.time_to_fid --minutes 8 --every 2     (make bench-ttf: default-constant and ddpm, ~27 min)
    python -m benchmarks.time_to_fid --recipes ddpm,edm --minutes 5
    python -m benchmarks.time_to_fid --quick --minutes 0.2 --out /tmp/t.md   # the smoke data: checks the harness

The data and the featurizer are the pipeline's own: ``dvc repro featurizer`` in a copy of the project
(params.yaml, with ``--quick`` configs/smoke.yaml on top). Each recipe (overrides of params.yaml, ``RECIPES``;
all but ``ON_PARAMS_YAML`` start from configs/ddpm.yaml's)
then trains in this process through the train stage's code, ``ddpm.fit.train`` (Lightning, validation, resume
checkpoints: everything around the steps counts), one recipe after the other, until ``--minutes`` of training
wall time or its ``train.max_steps``. Every ``--every`` minutes a callback copies the EMA weights; the copying
is not counted. Afterwards every copy draws ``sample.n`` images with the sample stage's sampler, steps and
noise, and is scored as the evaluate stage scores: FID and KID against the train split in the featurizer's
features, and the featurizer's mean max-softmax confidence.

A recipe with ``train.lr_scheduler: constant`` has no horizon, so each point of its curve is what a run stopped
there gives. A cosine recipe's points before its last are taken mid-decay; only its last point is a finished run.

Writes the report (``--out``), ``<--csv-dir>/<recipe>.csv`` (minutes, step, images, fid, kid, confidence: the
DVC plot "time to FID" of dvc.yaml) and ``--png`` (matplotlib).
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pipeline  # noqa: F401  (the OpenMP environment, before torch loads)
import pytorch_lightning as pl
import torch
import yaml
from pipeline import overrides, params, paths, scoring, sweep

from benchmarks.conditional import cpu_line
from benchmarks.team import env_with, smoke_project
from ddpm import ema, export, fit, generate, io
from ddpm.nets import UNet

ROOT = Path(__file__).resolve().parents[1]
HORIZON_FREE = {"train.lr_scheduler": "constant", "train.max_steps": 1_000_000}
# Ho et al.'s objective as configs/ddpm.yaml sets it over params.yaml: the base of every recipe but `default`
DDPM = overrides.read(ROOT / "configs" / "ddpm.yaml")
# EDM's preconditioning and training noise (Karras et al. 2022) on that base; ddim is the ddpm family's sampler only
EDM = {
    "diffusion.preconditioning": "edm",
    "diffusion.P_mean": -1.2,
    "diffusion.sampler": "dpmpp_2m",
    "sweep.runs": ["dpmpp_2m-10", "heun-10"],
}
# Each recipe: overrides of params.yaml. `default` is params.yaml as it is (cosine over its own max_steps).
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "default-constant": {**HORIZON_FREE},  # params.yaml's recipe with a constant lr: a curve of stopped runs
    "ddpm-profile": {**DDPM},  # configs/ddpm.yaml as it is
    "ddpm": {**DDPM, **HORIZON_FREE},
    "ddpm-b32": {**DDPM, **HORIZON_FREE, "train.batch_size": 32, "train.lr": 5e-4},
    "ddpm-min-snr": {**DDPM, **HORIZON_FREE, "diffusion.weighting": "min_snr"},
    "edm": {**DDPM, **HORIZON_FREE, **EDM},
    "edm-b32": {**DDPM, **HORIZON_FREE, **EDM, "train.batch_size": 32, "train.lr": 5e-4},
    # half configs/ddpm.yaml's optimizer steps, cosine over them: what may replace it at half its time
    "half": {**DDPM, "train.max_steps": 600},
    "half-min-snr": {**DDPM, "train.max_steps": 600, "diffusion.weighting": "min_snr"},
    "half-lr2e-3": {**DDPM, "train.max_steps": 600, "train.lr": 2e-3},
    "half-v": {**DDPM, "train.max_steps": 600, "diffusion.prediction": "v"},
    "half-cosine": {**DDPM, "train.max_steps": 600, "diffusion.schedule": "cosine"},
    "half-edm": {**DDPM, "train.max_steps": 600, **EDM},
    "half-edm-P-0.4": {**DDPM, "train.max_steps": 600, **EDM, "diffusion.P_mean": -0.4},
    "half-edm-P-0.4-lr2e-3": {**DDPM, "train.max_steps": 600, **EDM, "diffusion.P_mean": -0.4, "train.lr": 2e-3},
    # the same images in twice the updates of half the batch
    "half-edm-P-0.4-b64": {**DDPM, "train.max_steps": 1200, "train.batch_size": 64, **EDM, "diffusion.P_mean": -0.4},
    "half-edm-P0": {**DDPM, "train.max_steps": 600, **EDM, "diffusion.P_mean": 0.0},
    "half-edm-P0.4": {**DDPM, "train.max_steps": 600, **EDM, "diffusion.P_mean": 0.4},
}
ON_PARAMS_YAML = {"default", "default-constant"}  # the recipes that do not start from configs/ddpm.yaml
COLUMNS = ["minutes", "step", "images", "fid", "kid", "confidence"]


@dataclass
class Snapshot:
    seconds: float
    step: int
    state: dict[str, torch.Tensor]
    scores: dict[str, float] = field(default_factory=dict)


class Snapshots(pl.Callback):
    """Copy the EMA weights every ``every_s`` seconds of training; stop after ``budget_s`` seconds.

    Training seconds are wall seconds since the fit started, less the time spent copying.
    """

    def __init__(self, every_s: float, budget_s: float, log_every: int = 1) -> None:
        self.every_s, self.budget_s, self.log_every = every_s, budget_s, log_every
        self.taken: list[Snapshot] = []
        self.started, self.paused, self.due = 0.0, 0.0, every_s

    def seconds(self) -> float:
        return time.perf_counter() - self.started - self.paused

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def take(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        seconds, begun = self.seconds(), time.perf_counter()
        state = {k: v.detach().to("cpu", copy=True) for k, v in module.ema.state_dict().items()}
        self.taken.append(Snapshot(seconds, trainer.global_step, state))
        self.paused += time.perf_counter() - begun

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        seconds = self.seconds()
        if seconds >= self.budget_s:  # stop at a step the loss curve records (fit.train reports its last row)
            if trainer.global_step % self.log_every == 0:
                trainer.should_stop = True  # on_train_end takes the last copy
        elif seconds >= self.due:
            self.take(trainer, module)
            self.due = (int(seconds / self.every_s) + 1) * self.every_s

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not self.taken or self.taken[-1].step != trainer.global_step:
            self.take(trainer, module)


class PowerEMAs(pl.Callback):
    """Power-function EMAs (:mod:`ddpm.ema`) of the trained weights beside the run's own EMA, one per sigma_rel:
    the EMA length's sweep from one run. Their updates follow each optimizer step; their time is not counted."""

    def __init__(self, stds: Sequence[float], snapshots: Snapshots) -> None:
        self.gammas = {std: ema.gamma_from_std(std) for std in stds}
        self.snapshots = snapshots
        self.nets: dict[float, torch.nn.Module] = {}
        self.updates = 0

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.nets = {std: copy.deepcopy(module.ema) for std in self.gammas}

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.updates:
            return
        begun, self.updates = time.perf_counter(), trainer.global_step
        for std, net in self.nets.items():
            ema.update(net, module.net, ema.power_decay(self.updates, self.gammas[std]))
        self.snapshots.paused += time.perf_counter() - begun

    def taken(self, trainer_seconds: float) -> dict[float, Snapshot]:
        return {
            std: Snapshot(trainer_seconds, self.updates, {k: v.detach().clone() for k, v in net.state_dict().items()})
            for std, net in self.nets.items()
        }


def recipe_params(base: dict, recipe: dict[str, Any]) -> dict:
    """params.yaml's sections with the recipe's overrides, tracking off."""
    return overrides.merge(base, {**recipe, "tracking.enabled": False})


def train_recipe(
    name: str, raw: dict, minutes: float, every: float, work: Path, ema_stds: Sequence[float] = ()
) -> tuple[list[Snapshot], dict[float, Snapshot], dict]:
    """Train recipe ``raw`` (params sections) in the project in the working directory; its snapshots, the final
    weights of a power-function EMA per ``ema_stds`` and the train stage's metrics."""
    p = params.validate(raw)
    train_set, test_set = paths.load_splits()
    model = params.resolved_model(p.model, len(train_set.classes))
    snaps = Snapshots(every * 60, minutes * 60, p.train.log_every)
    emas = PowerEMAs(ema_stds, snaps)
    metrics = fit.train(
        train_set,
        test_set,
        model,
        p.diffusion,
        p.train,
        work / name,
        progress=False,
        resume=False,
        callbacks=[snaps, emas],
    )
    return (
        snaps.taken,
        emas.taken(snaps.taken[-1].seconds),
        {**metrics, "precision": fit.resolve_precision(p.train).precision},
    )


def snapshot_model(template: export.Model, snap: Snapshot) -> export.Model:
    """The run's exported model ``template`` (its net's config and DDPMConfig) with the snapshot's weights."""
    net = UNet(template.net.config)
    net.load_state_dict(snap.state)
    return export.Model(net.eval().requires_grad_(False), template.config)


def score(raw: dict, snapshots: list[Snapshot], out_dir: Path) -> None:
    """Draw ``sample.n`` images from each snapshot as the sample stage does, and score them as evaluate does."""
    p = params.validate(raw)
    template = export.load_model(out_dir / "model.pt")
    for snap in snapshots:
        model = snapshot_model(template, snap)
        plan = generate.plan(model.config, p.sample.sampler, p.sample.steps, eta=p.sample.eta)
        fake, _ = sweep.draw(model, plan, p.sample, None)
        result = scoring.score(fake, p.evaluate)
        snap.scores = {k: float(result[k]) for k in ("fid", "kid", "confidence")}
        print(
            f"  step {snap.step} ({snap.seconds / 60:.2f} min): FID {snap.scores['fid']:.2f}, "
            f"confidence {snap.scores['confidence']:.3f}",
            flush=True,
        )


def keep(run_dir: Path, last: Snapshot, emas: dict[float, Snapshot], dest: Path) -> None:
    """Write the run's final EMA as ``dest/model.pt`` and each power-function EMA as ``dest/model-ema_std-<s>.pt``:
    model files that ``make sample MODEL=...`` draws from."""
    template = export.load_model(run_dir / "model.pt")
    named = {"model.pt": last, **{f"model-ema_std-{std:g}.pt": snap for std, snap in emas.items()}}
    for filename, snap in named.items():
        model = snapshot_model(template, snap)
        export.save_model(dest / filename, model.net, model.config)


def rows(snapshots: list[Snapshot], batch_size: int) -> list[list]:
    return [
        [round(s.seconds / 60, 3), s.step, s.step * batch_size, *(round(s.scores[k], 5) for k in COLUMNS[3:])]
        for s in snapshots
    ]


def plot(curves: dict[str, list[list]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, table in curves.items():
        ax.plot([r[0] for r in table], [r[3] for r in table], marker="o", label=name)
    ax.set_xlabel("training minutes")
    ax.set_ylabel("classifier FID (lower is better)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def report(results: dict[str, dict], args: argparse.Namespace, base: dict) -> str:
    s = base["sample"]
    lines = [
        "# Time to FID",
        "",
        f"`python -m benchmarks.time_to_fid {' '.join(sys.argv[1:])}` on {cpu_line()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Data: "
        f"params.yaml{' with configs/smoke.yaml' if args.quick else ''} ({base['data']['dataset']}). Each point: the "
        f"EMA weights after that many minutes of training wall time, {s['n']} samples (the recipe's sample stage "
        f"sampler and steps, seed {s['seed']}) scored against the train split in the featurizer's features.",
        "",
        "| recipe | overrides of params.yaml | precision | img/s | minutes | steps | FID | KID | confidence "
        "| sampler |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        recipe = RECIPES[name]
        on_ddpm = name not in ON_PARAMS_YAML  # configs/ddpm.yaml and the recipe's changes to it
        unset = object()
        shown = {
            k: v
            for k, v in recipe.items()
            if k not in HORIZON_FREE and not k.startswith("sweep.") and not (on_ddpm and DDPM.get(k, unset) == v)
        }
        changes = ", ".join(f"{k}={v}" for k, v in shown.items())
        if all(k in recipe for k in HORIZON_FREE):
            changes = ", ".join(filter(None, ["constant lr", changes]))
        if on_ddpm:
            changes = ", ".join(filter(None, ["configs/ddpm.yaml", changes]))
        changes = changes or "-"
        for i, row in enumerate(r["rows"]):
            head = f"| {name} | {changes} | {r['precision']} | {r['images_per_second']:.0f} " if i == 0 else "| | | | "
            sampler = r["sampler"] if i == 0 else ""
            lines.append(f"{head}| {row[0]:.2f} | {row[1]} | {row[3]:.2f} | {row[4]:.4f} | {row[5]:.3f} | {sampler} |")
    best = min(((r["rows"][-1][3], n) for n, r in results.items()))
    lines += ["", f"Lowest FID at the end of the budget: {best[1]} ({best[0]:.2f})."]
    if args.ema_stds:
        lines += [
            "",
            "## The EMA's length",
            "",
            "At the end of each run: the run's own EMA (train.ema_std, or ema_decay and its warmup) and power-function "
            "EMAs (ddpm.ema) of relative standard deviation sigma_rel, kept beside it through the run.",
            "",
            "| recipe | EMA | FID | KID | confidence |",
            "|---|---|---|---|---|",
        ]
        for name, r in results.items():
            own = r["rows"][-1]
            lines.append(f"| {name} | the run's own | {own[3]:.2f} | {own[4]:.4f} | {own[5]:.3f} |")
            for std, sc in r["emas"].items():
                lines.append(f"| | sigma_rel {std:g} | {sc['fid']:.2f} | {sc['kid']:.4f} | {sc['confidence']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="default-constant,ddpm", help=f"comma list of {sorted(RECIPES)}")
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall minutes per recipe (at most)")
    parser.add_argument("--every", type=float, default=2.0, help="minutes between EMA snapshots")
    parser.add_argument("--quick", action="store_true", help="configs/smoke.yaml on top (checks the harness)")
    parser.add_argument("--project", type=Path, help="a project copy whose featurizer stage ran (default: a new one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/time_to_fid.md")
    parser.add_argument("--csv-dir", type=Path, default=ROOT / "benchmarks/time_to_fid")
    parser.add_argument("--png", type=Path, default=ROOT / "docs/time_to_fid.png")
    parser.add_argument(
        "--ema-stds",
        type=lambda text: [float(v) for v in text.split(",") if v.strip()],
        default=[],
        help="comma list of sigma_rel: power-function EMAs (ddpm.ema) kept beside each run's own and scored at its end",
    )
    parser.add_argument("--keep", type=Path, help="write each recipe's final EMA models to KEEP/<recipe>/")
    args = parser.parse_args()
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        parser.error(f"--recipes: unknown {unknown}; allowed: {sorted(RECIPES)}")
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    if args.quick:
        base = overrides.merge(base, yaml.safe_load((ROOT / "configs/smoke.yaml").read_text()))
    out, csv_dir, png = args.out.resolve(), args.csv_dir.resolve(), args.png.resolve()
    kept = args.keep.resolve() if args.keep else None
    with tempfile.TemporaryDirectory(prefix="bench-ttf-") as work:
        project = args.project
        if project is None:
            project = smoke_project(Path(work) / "project", yaml.safe_dump(base, sort_keys=False))
            subprocess.run(["dvc", "repro", "featurizer"], cwd=project, env=env_with({}), check=True)
        os.chdir(project)
        results = {}
        for name in names:
            raw = recipe_params(base, RECIPES[name])
            print(f"{name}: training for at most {args.minutes:g} min", flush=True)
            snapshots, emas, metrics = train_recipe(
                name, copy.deepcopy(raw), args.minutes, args.every, Path(work), args.ema_stds
            )
            score(raw, snapshots + list(emas.values()), Path(work) / name)
            if kept:
                keep(Path(work) / name, snapshots[-1], emas, kept / name)
            table = rows(snapshots, raw["train"]["batch_size"])
            io.write_csv(csv_dir / f"{name}.csv", COLUMNS, table)
            sample, diffusion = raw["sample"], raw["diffusion"]
            sampler = f"{sample['sampler'] or diffusion['sampler']}, {sample['steps'] or diffusion['steps']} steps"
            scores = {std: snap.scores for std, snap in emas.items()}
            results[name] = {**metrics, "rows": table, "emas": scores, "sampler": sampler}
            # after each recipe: a long run stopped early keeps the recipes it finished
            plot({n: r["rows"] for n, r in results.items()}, png, f"time to FID ({cpu_line()})")
            text = report(results, args, base)
            out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
