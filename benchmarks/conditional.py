"""Conditional or unconditional default? Both trained the same way, side by side, scored under one protocol.

    python -m benchmarks.conditional --steps 600 --out benchmarks/conditional.md   (make bench-conditional)
    python -m benchmarks.conditional --quick --out /tmp/c.md    # the smoke data: checks the harness only
    python -m benchmarks.conditional --profile configs/ddpm.yaml --steps 500    # the DDPM recipe's arms

Each arm is a copy of the project (a git repo in a temp folder) running ``dvc repro evaluate guidance`` on
params.yaml (with ``--profile``'s overrides on top) with ``--steps`` training steps and tracking off; the arms
differ only in conditioning:

- *unconditional*: params.yaml as it is (``model.num_classes: null``);
- *conditional*: ``model.num_classes: auto``, ``train.label_dropout`` (0.1), ``sample.labels: balanced`` and
  the guidance stage over ``--scales`` with the sample stage's sampler and steps, ``sweep.n = sample.n`` and
  ``sweep.seed = sample.seed``, so every scale's FID is comparable with the unconditional arm's evaluate FID
  (same sampler, n, noise and reference).

The report gives each arm's train-stage time, the unconditional arm's FID and confidence, and for the
conditional arm FID, label accuracy and confidence at every scale (scale 0: its unconditional draws).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from pipeline import overrides

from benchmarks.team import env_with, smoke_project

ROOT = Path(__file__).resolve().parents[1]


def run_arm(name: str, params: dict, work: Path) -> dict:
    project = smoke_project(work / name, yaml.safe_dump(params, sort_keys=False))
    started = time.perf_counter()
    done = subprocess.run(
        ["dvc", "repro", "evaluate", "guidance"], cwd=project, env=env_with({}), capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{name}: dvc repro failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    out = project / "outputs"
    train = json.loads((out / "metrics/train.json").read_text())
    with open(out / "guidance/fid_vs_guidance.csv", newline="") as f:
        curve = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return {
        "name": name,
        "seconds": time.perf_counter() - started,
        "train_seconds": train["seconds"],
        "images_per_second": train["images_per_second"],
        "precision": (re.findall(r"train: precision auto -> (\S+)", done.stdout) or [params["train"]["precision"]])[0],
        "evaluate": json.loads((out / "metrics/evaluate.json").read_text()),
        "curve": curve,
    }


def arms(base: dict, steps: int | None, scales: list[float], dropout: float) -> dict[str, dict]:
    common = {"tracking.enabled": False}
    if steps is not None:
        common["train.max_steps"] = steps
    unconditional = overrides.merge(base, common)
    sample, diffusion = unconditional["sample"], unconditional["diffusion"]
    n, seed = sample["n"], sample["seed"]
    run = f"{sample['sampler'] or diffusion['sampler']}-{sample['steps'] or diffusion['steps']}"  # the sample stage's
    conditional = overrides.merge(
        base,
        {
            **common,
            "model.num_classes": "auto",
            "train.label_dropout": dropout,
            "sample.labels": "balanced",
            "sample.guidance": 1.0,
            "sweep.guidance": scales,
            "sweep.guidance_run": run,
            "sweep.n": n,
            "sweep.seed": seed,
        },
    )
    return {"unconditional": unconditional, "conditional": conditional}


def cpu_line() -> str:
    """The CPU's model name and its widest vector extensions, e.g. ``AMD EPYC (avx2, no AVX-512)``."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    wide = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags] or [
        "avx2" if "avx2" in flags else "no avx2"
    ]
    vector = ", ".join(wide) + ("" if "avx512f" in flags else ", no AVX-512")
    return f"{name or platform.processor() or platform.machine()} ({vector})"


def report(results: dict[str, dict], args: argparse.Namespace, base: dict) -> str:
    u, c = results["unconditional"], results["conditional"]
    lines = [
        "# Conditional or unconditional default",
        "",
        f"`python -m benchmarks.conditional {' '.join(sys.argv[1:])}` on {cpu_line()}, {os.cpu_count()} cores. "
        "Both arms: params.yaml"
        f"{' with configs/smoke.yaml' if args.quick else ''}"
        f"{f' with {args.profile}' if args.profile else ''}, train.max_steps {u['params']['train']['max_steps']}, "
        f"batch {u['params']['train']['batch_size']}, precision {u['precision']}; "
        f"{u['evaluate']['n_gen']} samples ({c['params']['sample']['sampler']}, "
        f"{c['params']['sample']['steps']} steps) against the {u['evaluate']['reference']} split "
        f"({u['evaluate']['n_ref']} images), classifier features.",
        "",
        "| arm | draw | guidance | FID | label accuracy | confidence | train stage s |",
        "|---|---|---|---|---|---|---|",
        f"| unconditional | unconditional | - | {u['evaluate']['fid']:.3f} | - | {u['evaluate']['confidence']:.3f} "
        f"| {u['train_seconds']:.0f} |",
    ]
    for r in c["curve"]:
        draw = "unconditional (null class)" if r["guidance"] == 0 else "balanced labels"
        lines.append(
            f"| conditional (label dropout {args.dropout}) | {draw} | {r['guidance']:g} | {r['fid']:.3f} "
            f"| {r['label_accuracy']:.1%} | {r['confidence']:.3f} | {c['train_seconds']:.0f} |"
        )
    guided = [r for r in c["curve"] if r["guidance"] > 0]
    best = min(guided, key=lambda r: r["fid"])
    winner = "conditional" if best["fid"] < u["evaluate"]["fid"] else "unconditional"
    lines += [
        "",
        f"Best conditional FID: guidance {best['guidance']:g}, FID {best['fid']:.3f} at label accuracy "
        f"{best['label_accuracy']:.1%}, against the unconditional model's {u['evaluate']['fid']:.3f}: the "
        f"{winner} model has the lower FID.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="train.max_steps of both arms (default: params.yaml's)")
    parser.add_argument("--scales", default="0,1,1.5,2,3,4", help="the conditional arm's guidance scales")
    parser.add_argument("--dropout", type=float, default=0.1, help="the conditional arm's train.label_dropout")
    parser.add_argument("--quick", action="store_true", help="configs/smoke.yaml on top (checks the harness)")
    parser.add_argument("--profile", type=Path, help="a profile of overrides on top, e.g. configs/ddpm.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/conditional.md")
    args = parser.parse_args()
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    if args.quick:
        base = overrides.merge(base, yaml.safe_load((ROOT / "configs/smoke.yaml").read_text()))
    if args.profile:
        base = overrides.merge(base, overrides.read(args.profile))
    scales = [float(w) for w in args.scales.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-conditional-") as work:
        for name, params in arms(base, args.steps, scales, args.dropout).items():
            results[name] = {**run_arm(name, params, Path(work)), "params": params}
            print(f"{name}: {results[name]['seconds']:.0f} s", flush=True)
    text = report(results, args, base)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
