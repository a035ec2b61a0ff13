"""Throughput and memory of the U-Net, side by side with diffusers' UNet2DModel at the same FLOPs (``make bench``).

Every timed row is the median of ``--reps`` repetitions after warm-up calls. The rows of one group (our net,
the peer, and probes of the machine's matmul rate) take turns within every repetition, so their ratios hold
on a shared, noisy machine; the limit is the fastest timing of the best probe. FLOPs are counted with
``torch.utils.flop_counter`` (attention through the math SDPA backend, whose matmuls the counter sees).
Peak memory, and the settings applied at process start, are measured in fresh processes (:mod:`benchmarks.job`).

One module per measurement: :mod:`~benchmarks.throughput`, :mod:`~benchmarks.levers`, :mod:`~benchmarks.shares`
(where the time goes), :mod:`~benchmarks.phases` (convolution phases), :mod:`~benchmarks.memory`,
:mod:`~benchmarks.process` (allocator and OpenMP wait), :mod:`~benchmarks.evaluation`, :mod:`~benchmarks.syncs`;
:mod:`~benchmarks.report` writes the markdown.

    python -m benchmarks.bench            # the full run (15-25 min on 2 CPU cores) -> benchmarks/results.md
    python -m benchmarks.bench --quick    # a tiny configuration in about a minute (the harness's own test)
    python -m benchmarks.bench --throughput-only --out t.md   # ours against the peer only (about a minute)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import pipeline  # noqa: F401  (the stages' OpenMP environment, set before torch loads libgomp)
import torch

from benchmarks import evaluation, levers, memory, phases, process, report, shares, syncs, throughput
from benchmarks.configs import ROOT, Plan, plan
from benchmarks.job import Jobs
from benchmarks.peer import peer_version
from benchmarks.timing import Probes, Timer
from ddpm.runtime import keep_freed_memory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny configuration in seconds (tests the harness)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per row (default 5; quick 2)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile rows")
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time with ddpm.runtime.keep_freed_memory() applied (default: yes)",
    )
    parser.add_argument(
        "--compile-peer", action="store_true", help="both nets compiled, bf16-mixed (first configuration)"
    )
    parser.add_argument(
        "--throughput-only",
        action="store_true",
        help="only the throughput rows of the default model, ours beside the peer (about a minute; writes --out only)",
    )
    parser.add_argument("--train-batch", type=int, default=None, help="training batch (default: params.yaml's)")
    parser.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default 256)")
    parser.add_argument(
        "--out", type=Path, default=None, help="markdown output (default: benchmarks/results.md; none for --quick)"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    kept = keep_freed_memory() if args.keep_freed_memory else False
    p = plan(args.quick, args.reps, args.compile)
    p = replace(
        p,
        train_batch=args.train_batch or p.train_batch,
        sample_batch=args.sample_batch or p.sample_batch,
        compile_peer=args.compile_peer,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peer = peer_version() is not None
    sizes = (256, 256, 256) if p.quick else (4096, 1024, 1024) if device.type == "cpu" else (8192, 8192, 8192)
    probes = Probes(device, *sizes)
    timer = Timer(device, probes)
    phase = time.perf_counter()

    def done(what: str) -> None:
        nonlocal phase
        print(f"{what}: {time.perf_counter() - phase:.0f} s", file=sys.stderr, flush=True)
        phase = time.perf_counter()

    if args.throughput_only:
        p = replace(p, configs=dict([p.first]), compile_peer=False)
    rows, info = throughput.throughput(p, timer, device, peer)
    done("throughput")
    command = "python -m benchmarks.bench" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    mach = {**report.machine(device, peer_version()), "keep_freed_memory": kept}
    if args.throughput_only:
        targets = throughput.targets(p, probes, rows, {})
        sections = [probes.section(), throughput.section(p, probes, rows, info, peer)]
        text = report.document(command, (time.perf_counter() - started) / 60, mach, targets, sections)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
        print(text)
        return
    lever_rows = levers.levers(p, timer, device)
    done("levers")
    evals = evaluation.evaluation(p, timer, device)
    done("evaluation")
    counted = syncs.synchronisations(p, device)
    time_shares = shares.time_shares(p, device, peer)
    done("time shares")
    conv_phases = phases.conv_phases(p, timer, device)
    done("convolution phases")
    mem, alloc = measure_processes(p, device)
    done("memory and allocator")

    targets = throughput.targets(p, probes, rows, shares.bounds(time_shares))
    targets += process.targets(alloc) + memory.targets(mem) + syncs.targets(counted)
    sections = [
        probes.section(),
        throughput.section(p, probes, rows, info, peer),
        shares.section(p, time_shares),
        phases.section(p, probes, conv_phases, rows),
        levers.section(p, lever_rows),
        process.section(p, alloc),
        memory.section(p, mem),
        evaluation.section(evals),
    ]
    text = report.document(command, (time.perf_counter() - started) / 60, mach, targets, sections)
    out = args.out or (None if p.quick else ROOT / "benchmarks" / "results.md")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)


def measure_processes(p: Plan, device: torch.device) -> tuple[list[dict], list[dict]]:
    """The memory jobs and the process-start settings' jobs (CPU only: host memory and glibc's allocator).

    They run one after the other, after the timings of this process: run at once, the memory jobs' peaks moved by
    tens of MB with the thread timing of their neighbours. The quick run measures nothing precisely: there two
    single-threaded jobs run at a time (started beside this process's rows, or with more threads each, they
    oversubscribed the two cores and took longer).
    """
    if device.type != "cpu":
        return [], []
    mem_jobs, alloc_jobs = memory.memory_jobs(p), process.allocator_jobs(p)
    if p.quick:
        results = Jobs(mem_jobs + alloc_jobs, at_once=2, env={"OMP_NUM_THREADS": "1"}).results()
        return results[: len(mem_jobs)], process.merge_rounds(results[len(mem_jobs) :])
    return Jobs(mem_jobs).results(), process.merge_rounds(Jobs(alloc_jobs).results())


if __name__ == "__main__":
    main()
