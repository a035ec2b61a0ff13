"""Settings applied at process start: the allocator (``keep_freed_memory``) and the OpenMP wait policy, compared
by timing sampling and training steps in fresh processes (:mod:`benchmarks.job`) that take turns by round."""

from __future__ import annotations

import json
import statistics
from typing import Any

from benchmarks.configs import Plan
from benchmarks.report import check, num, table

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


def allocator_jobs(plan: Plan) -> list[tuple[list[str], dict[str, str], tuple[str, ...]]]:
    """Sampling and training steps in fresh processes, one per :data:`PROCESS_SETTINGS` entry, in turns.

    The allocator and the OpenMP wait policy are set once per process, so the settings cannot take turns within
    one process; instead ``alloc_rounds`` rounds of processes run one after the other, and :func:`merge_rounds`
    takes the medians.
    """
    name, cfg = plan.first
    job = ["steps", "--batch-size", str(plan.train_batch), "--sample-batch", str(plan.sample_batch)]
    job += ["--reps", str(plan.reps[name]), "--model", json.dumps(cfg.to_dict())]
    one_round = [(job + (["--keep-freed-memory"] if kept else []), env, OMP_ENV) for _, kept, env in PROCESS_SETTINGS]
    return one_round * plan.alloc_rounds


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


def targets(alloc: list[dict[str, Any]]) -> list[str]:
    """Ours as the stages run it over the peer as a plain script runs it."""
    if not alloc or "peer sample" not in alloc[0]["seconds"]:
        return []
    plain, ours = alloc[0], alloc[-1]
    lines = []
    for task, ratio_target, label in PROCESS_TASKS:
        ratio = plain["seconds"][f"peer {task}"] / ours["seconds"][f"ours {task}"]
        lines.append(
            f"- Ours as the stages run ({ours['setting']}) over the peer as a plain script runs, {label}:"
            f" {ratio:.2f}x (fresh processes in turns, medians of {plain['rounds']} round(s);"
            f" target {ratio_target}x: {check(ratio >= ratio_target)})."
        )
    return lines


def section(plan: Plan, alloc: list[dict[str, Any]]) -> list[str]:
    """The report's table of settings applied at process start."""
    if not alloc:
        return []
    lines = [
        f"## Settings applied at process start (fresh processes taking turns over {alloc[0]['rounds']} round(s))",
        "",
        "Each process interleaves its rows; the figures are medians over the rounds. *plain script* is"
        " glibc's default malloc and libgomp's default OpenMP wait (idle threads spin ~3 ms, then sleep);"
        " *kept* is `ddpm.runtime.keep_freed_memory()` (all the other rows run with it unless"
        " --no-keep-freed-memory); *sleeping threads* is `OMP_WAIT_POLICY=PASSIVE` (idle threads sleep at"
        " once, so every operator wakes them); *bounded spin* is `GOMP_SPINCOUNT=30000` (~0.3 ms of spinning"
        " bridges the gaps between one step's operators; what the stages and the other rows use). These settings"
        " cannot change within a process, so the rows alternate by process, not within one: load from other work"
        " during one process still skews a round, bf16 training most.",
        "",
    ]
    names = [a["setting"] for a in alloc]
    cells = []
    for key in alloc[0]["seconds"]:
        net, task = key.split()
        n = plan.sample_batch if task == "sample" else plan.train_batch
        rates = [n / a["seconds"][key] for a in alloc]
        what = next(label for t, _, label in PROCESS_TASKS if t == task)
        cells.append([net, what, *map(num, rates), *(f"{r / rates[0]:.2f}x" for r in rates[1:])])
    lines += table(["net", "img/s", *names, *(f"{name} / {names[0]}" for name in names[1:])], cells)
    faults = ", ".join(f"{a['page_faults']:,} ({a['setting']})" for a in alloc)
    lines += ["", f"Page faults per process: {faults}."]
    if "peer sample" in alloc[0]["seconds"]:
        cross = [
            f"{label} {alloc[0]['seconds'][f'peer {task}'] / alloc[-1]['seconds'][f'ours {task}']:.2f}x"
            for task, _, label in PROCESS_TASKS
        ]
        lines.append(f"Ours ({names[-1]}) over the peer as a plain script runs it: " + ", ".join(cross) + ".")
    return lines
