"""Memory: peak RSS of the sample stage drawing ever more images, and of training steps, each in a fresh process
(:mod:`benchmarks.job`)."""

from __future__ import annotations

import json
import statistics
from typing import Any

from benchmarks.configs import Plan
from benchmarks.report import check, table


def memory_jobs(plan: Plan) -> list[list[str]]:
    """Peak RSS of the sample stage drawing each of ``memory_n`` images (the most ``memory_repeats`` times), and
    of training steps (``job`` arguments)."""
    model = ["--model", json.dumps(plan.first[1].to_dict())]
    counts = list(plan.memory_n) + [plan.memory_n[-1]] * (plan.memory_repeats - 1)
    chunk = str(plan.memory_chunk)
    sample = [["sample", "--n", str(n), "--batch-size", chunk, "--sampler", plan.sampler] for n in counts]
    kept = sample[: plan.memory_kept] + sample[len(plan.memory_n) :]
    jobs = [j + model for j in sample] + [j + model + ["--keep-freed-memory"] for j in kept]
    train = [["train", "--batch-size", str(plan.train_batch), "--precision", p, *model] for p in plan.memory_precisions]
    return jobs + train


def targets(mem: list[dict[str, Any]]) -> list[str]:
    """The sampling-memory targets: within the largest job, the peak grows by at most the output array."""
    lines = []
    for kept in (False, True):
        samples = [m for m in mem if m["job"] == "sample" and m["keep_freed_memory"] == kept]
        counts = sorted({m["n"] for m in samples})
        if len(counts) < 2:
            continue
        peak = {n: statistics.median(m["peak_mb"] for m in samples if m["n"] == n) for n in counts}
        peaks = ", ".join(f"{peak[n]:,.0f} MB ({n:,} images)" for n in counts)
        largest = [m for m in samples if m["n"] == counts[-1]]
        last = largest[0]
        grow = peak[counts[-1]] - peak[counts[-2]]
        array = last["output_mb"] * (1 - counts[-2] / counts[-1])
        withins = [m["peak_mb"] - m["early_peak_mb"] for m in largest]
        within = statistics.median(withins)
        array_within = last["output_mb"] * (1 - last["early_n"] / last["n"])
        each = f" (median of {len(withins)} processes: {', '.join(f'{w:+.0f}' for w in withins)} MB)"
        judged = (
            f" Within a {last['n']:,}-image process, the peak moves {within:+.0f} MB from its first"
            f" {last['early_n']:,} images to its end{each if len(withins) > 1 else ''}, while the output grows by"
            f" {array_within:.1f} MB (target: at most that: {check(within <= array_within)})."
            if last["early_n"] < last["n"]
            else f" (Not judged: the largest job has no chunks after its first {last['early_n']:,} images.)"
        )
        lines.append(
            f"- Sampling memory ({'keep_freed_memory' if kept else 'default malloc'}), chunks of"
            f" {last['batch_size']}: peak RSS {peaks}.{judged} Across processes, from {counts[-2]:,} to"
            f" {counts[-1]:,} images the peak moves {grow:+.0f} MB against {array:.1f} MB more output (processes of"
            " the same job differ by up to about 100 MB, see Memory)."
        )
    return lines


def section(plan: Plan, mem: list[dict[str, Any]]) -> list[str]:
    """The report's memory table."""
    lines = ["## Memory (peak RSS, each in a fresh process)", ""]
    if not mem:
        lines += ["Not measured in this run: the memory rows are host RSS of CPU processes (run without a GPU)."]
    cells = []
    for m in mem:
        what = (
            f"sample stage, {m['n']:,} images in chunks of {m['batch_size']}"
            if m["job"] == "sample"
            else f"training step, batch {m['batch_size']}, {m['precision']}"
        )
        malloc = "keep_freed_memory" if m["keep_freed_memory"] else "default"
        grow = m["peak_mb"] - m["before_mb"]
        early = f"{m['early_peak_mb']:.0f} ({m['early_n']:,} images)" if "early_peak_mb" in m else ""
        row = [what, malloc, f"{m['before_mb']:.0f}", early, f"{m['peak_mb']:.0f}", f"{grow:+.0f}"]
        cells.append(row + [m.get("output_mb", "")])
    header = ["job", "malloc", "RSS before (MB)", "peak RSS after the first chunks (MB)", "peak RSS (MB)"]
    lines += table([*header, "peak - before (MB)", "output array (MB)"], cells)
    return lines + [
        "",
        "The sample stage (`pipeline.sample.write_samples`, one step per image here: a chunk's memory does not"
        " depend on the step count) streams each chunk into the `.npz`, so its peak is one chunk's forward pass,"
        " whatever the number of images (see Targets). The peak is the kernel's high-water mark of the resident"
        " set, reset just before the job, and read again after the job's first chunks: what the later chunks add is"
        " measured within one process. The jobs run one after the other. Between processes of the same job the"
        " peak moved by up to about 100 MB over runs of this benchmark (allocator and thread timing), more than"
        " the 10,000-image output array, so the target is judged within the largest job, which runs"
        f" {plan.memory_repeats} time(s) with each allocator: now and then the peak of one process still jumps late"
        " by tens of MB, so the median counts.",
    ]
