"""What Prefect workers and multi-node training give on this machine, measured in one run.

    python -m benchmarks.workers --out benchmarks/workers.md

Starts the team stack (the code of ``make stack-up``) in a temp folder, makes a seed clone of the project on
the smoke configuration (tracking off), runs its pipeline, pushes outputs and run cache to the stack's DVC
remote and the commit to a bare git origin, and deploys ``prefect.yaml`` to the stack's Prefect server. Then:

- a 4-point grid (``experiment-grid --deployment sweep-point/sweep-point``, 4 values of ``sample.steps``) with
  1 worker and with 2 workers, each worker limited to one thread and one run at a time, with fresh worker
  folders each time (a first run on a worker clones); the grids differ in ``sample.seed`` only, so neither
  finds the other's results in the run cache;
- from the sweep-point flow runs' logs: the time to the first ``dvc`` command from the trigger (a worker's first
  run, so nothing waits in its queue) and from the worker's pick-up (clone or fetch, ``dvc pull``), for a
  worker's first run and for its later ones;
- the smoke train stage on loopback: one node of one process, and two ``torchrun`` nodes of one process each
  (one thread per process), images per second from ``outputs/metrics/train.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml
from pipeline import overrides as dotted
from pipeline import stack

from benchmarks.team import env_with, run, smoke_params, smoke_project

POINTS = [3, 4, 5, 6]
TRAIN_STEPS = 300


def prefect(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "prefect"), *args]


def start_worker(home: Path, name: str, env: dict[str, str]) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    worker_env = {**env, "DDPM_WORKER_HOME": str(home), "OMP_NUM_THREADS": "1", "PREFECT_WORKER_QUERY_SECONDS": "2"}
    cmd = prefect("worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1", "--name", name)
    return subprocess.Popen(cmd, cwd=home, env=worker_env, stdout=(home / "worker.log").open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            node = psutil.Process(proc.pid)
            for p in [*node.children(recursive=True), node]:
                p.kill()
        except psutil.NoSuchProcess:
            pass
        proc.wait()


def pickup_seconds(env: dict[str, str], flow_run_names: list[str]) -> list[tuple[str, float, float]]:
    """(worker, seconds from the flow run's creation to its first `$ dvc` log line, seconds from the worker's
    pick-up to it) of each named flow run, in creation order."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    settings = {PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_API_AUTH_STRING: env.get("PREFECT_API_AUTH_STRING")}
    found = []
    with temporary_settings(settings), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=flow_run_names)))
        for r in runs:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id])), limit=200)
            picked = next(e for e in logs if re.search(r"Worker '\w+' submitting", e.message))
            worker = re.search(r"Worker '(\w+)' submitting", picked.message).group(1)
            first_dvc = next(e.timestamp for e in logs if e.message.startswith("$ dvc"))
            found.append((r.created, worker, (first_dvc - r.created).total_seconds(),
                          (first_dvc - picked.timestamp).total_seconds()))  # fmt: skip
    return [row[1:] for row in sorted(found, key=lambda row: row[0])]


def points_span(env: dict[str, str], flow_run_names: list[str]) -> float:
    """Seconds from the first sweep-point run's start to the last one's end (the grid's share on the workers)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    settings = {PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_API_AUTH_STRING: env.get("PREFECT_API_AUTH_STRING")}
    with temporary_settings(settings), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=flow_run_names)))
    return (max(r.end_time for r in runs) - min(r.start_time for r in runs)).total_seconds()


def busy_cores(before, after) -> float:
    """Cores kept busy on average between two ``psutil.cpu_times()`` (all processes of the machine)."""
    idle = (after.idle + getattr(after, "iowait", 0)) - (before.idle + getattr(before, "iowait", 0))
    total = sum(after) - sum(before)
    return (total - idle) / total * (os.cpu_count() or 1)


def grid(scheduler: Path, env: dict[str, str], seed: int) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "pipeline.flows", "experiment-grid", "-G", f"sample.steps={POINTS}", "-G",
           f"sample.seed=[{seed}]", "--deployment", "sweep-point/sweep-point", "--project", str(scheduler)]  # fmt: skip
    start, cpu = time.perf_counter(), psutil.cpu_times()
    result = subprocess.run(cmd, cwd=scheduler, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    cores = busy_cores(cpu, psutil.cpu_times())
    if result.returncode != 0:
        raise SystemExit(f"experiment-grid failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    names = re.findall(r"submitted \d+ run\(s\) of [^:]+: (.+)", result.stdout + result.stderr)
    return seconds, {"flow_runs": names[-1].split(", ") if names else [], "cores": cores}


def train_nodes(seed_project: Path, base: Path, env: dict[str, str]) -> dict[str, float]:
    """Images per second of the smoke train stage: one process, and two torchrun nodes of one process each."""
    results = {}
    settings = {"train.max_steps": TRAIN_STEPS, "train.checkpoint_every": None, "train.precision": "32-true",
                "train.accelerator": "cpu", "train.devices": 1}  # fmt: skip
    two_nodes = {"train.num_nodes": 2, "train.strategy": "ddp"}
    for label, extra, nodes in (("1 node x 1 process", {}, 1), ("2 nodes x 1 process", two_nodes, 2)):
        copies = []
        for rank in range(nodes):
            dest = base / f"nodes-{nodes}-{rank}"
            shutil.copytree(seed_project, dest, symlinks=True)
            raw = yaml.safe_load((dest / "params.yaml").read_text())
            (dest / "params.yaml").write_text(yaml.safe_dump(dotted.merge(raw, {**settings, **extra}), sort_keys=False))
            copies.append(dest)
        port = stack.free_port()
        node_env = {**env, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "DDPM_MASTER_ADDR": "127.0.0.1",
                    "DDPM_MASTER_PORT": str(port)}  # fmt: skip
        procs = [
            subprocess.Popen([sys.executable, "-m", "pipeline.train"], cwd=dest,
                             env={**node_env, "DDPM_NODE_RANK": str(rank)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
            for rank, dest in enumerate(copies)
        ]  # fmt: skip
        if any(p.wait() for p in procs):
            raise SystemExit(f"{label}: the train stage failed")
        metrics = json.loads((copies[0] / "outputs/metrics/train.json").read_text())
        results[label] = metrics["images_per_second"]
        print(f"{label}: {results[label]:.0f} img/s", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the report (Markdown) here")
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="ddpm-bench-workers-"))
    base.chmod(0o711)  # the postgres user traverses it to its cluster
    the_stack = stack.Stack(base / "stack", ports={name: stack.free_port() for name in stack.DEFAULT_PORTS})
    workers: list[subprocess.Popen] = []
    try:
        team_env = the_stack.up(say=lambda line: None)
        env = env_with({k: v for k, v in team_env.items() if not k.startswith("MLFLOW_TRACKING")})
        params_text = dotted.merge(yaml.safe_load(smoke_params(base)), {"tracking.enabled": False})
        seed = smoke_project(base / "seed", yaml.safe_dump(params_text, sort_keys=False))
        shutil.copy2(Path(__file__).resolve().parents[1] / "prefect.yaml", seed / "prefect.yaml")
        git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
        run([sys.executable, "-m", "pipeline.remote", "configure"], seed, env)
        run(["dvc", "repro"], seed, env)
        run([*git, "add", "-A"], seed, env)
        run([*git, "commit", "-qm", "repro"], seed, env)
        run([sys.executable, "-m", "pipeline.remote", "push"], seed, env)
        origin = base / "origin.git"
        run(["git", "clone", "-q", "--bare", str(seed), str(origin)], base, env)
        branch = subprocess.run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=seed, capture_output=True,
                                text=True).stdout.strip()  # fmt: skip
        run(prefect("work-pool", "create", "gpu", "--type", "process"), seed, env)
        run(
            prefect("--no-prompt", "deploy", "--all"),
            seed,
            {**env, "DDPM_GIT_URL": str(origin), "DDPM_GIT_BRANCH": branch},
        )
        # nightly-retrain's cron (03:00 UTC) would start a retrain on the pool in the middle of the rounds
        run(prefect("--no-prompt", "deployment", "schedule", "pause", "--all"), seed, env)
        nodes = train_nodes(seed, base, env)

        sweeps: dict[int, list[float]] = {1: [], 2: []}
        pickups: dict[int, list] = {1: [], 2: []}
        spans: dict[int, list[float]] = {1: [], 2: []}
        cores: dict[int, list[float]] = {1: [], 2: []}
        # the pool's limit is the most workers of a round, set once (each worker takes one run at a time itself)
        run(prefect("work-pool", "set-concurrency-limit", "gpu", "2"), seed, env)
        # two rounds, the order alternating, so machine drift touches both counts alike; a new seed per grid
        for count, sample_seed in ((1, 11), (2, 12), (2, 13), (1, 14)):
            workers = [start_worker(base / f"w{sample_seed}-{i}", f"w{sample_seed}x{i}", env) for i in range(count)]
            scheduler = base / f"scheduler{sample_seed}"
            run(["git", "clone", "-q", str(origin), str(scheduler)], base, env)
            run([sys.executable, "-m", "pipeline.remote", "configure"], scheduler, env)
            seconds, info = grid(scheduler, env, sample_seed)
            sweeps[count].append(seconds)
            pickups[count].append(pickup_seconds(env, info["flow_runs"]))
            spans[count].append(points_span(env, info["flow_runs"]))
            cores[count].append(info["cores"])
            print(f"{count} worker(s): 4-point grid {seconds:.1f} s, points {spans[count][-1]:.1f} s, "
                  f"{info['cores']:.2f} cores busy; pick-up {pickups[count][-1]}", flush=True)  # fmt: skip
            stop(workers)
            workers = []
    finally:
        stop(workers)
        the_stack.down(say=lambda line: None)
        shutil.rmtree(base, ignore_errors=True)

    first, later, triggered = [], [], []
    for runs in (one_grid for grids in pickups.values() for one_grid in grids):
        seen = set()
        for worker, from_trigger, from_pickup in runs:
            (later if worker in seen else first).append(from_pickup)
            if worker not in seen:
                triggered.append(from_trigger)  # nothing queued before it on that worker
            seen.add(worker)
    cpu = platform.processor() or platform.machine()
    one, two = nodes["1 node x 1 process"], nodes["2 nodes x 1 process"]
    report = [
        f"# Workers and nodes ({os.cpu_count()} CPUs, {cpu}, python {platform.python_version()})",
        "",
        "One thread per worker and per training process; workers poll every 2 s and run one flow at a time.",
        "",
        "| 4-point smoke grid (sample.steps = 3, 4, 5, 6) | round 1 | round 2 | median |",
        "|---|---|---|---|",
        *(
            f"| {n} worker{'s' if n > 1 else ''} | "
            + " | ".join(f"{t:.1f} s" for t in sweeps[n])
            + f" | {statistics.median(sweeps[n]):.1f} s |"
            for n in (1, 2)
        ),  # fmt: skip
        "",
        f"2 workers take {statistics.median(sweeps[2]) / statistics.median(sweeps[1]):.2f}x the time of 1 (medians).",
        "",
        "| medians | whole grid | sweep-point runs (first start to last end) | rest (scheduler: submit, "
        "`dvc exp pull`, `dvc exp show`) | cores busy (machine) |",
        "|---|---|---|---|---|",
        *(
            f"| {n} worker{'s' if n > 1 else ''} | {statistics.median(sweeps[n]):.1f} s | "
            f"{statistics.median(spans[n]):.1f} s | "
            f"{statistics.median(t - s for t, s in zip(sweeps[n], spans[n])):.1f} s | "
            f"{statistics.median(cores[n]):.2f} of {os.cpu_count()} |"
            for n in (1, 2)
        ),  # fmt: skip
        "",
        f"The sweep-point runs alone: 2 workers take "
        f"{statistics.median(spans[2]) / statistics.median(spans[1]):.2f}x the time of 1.",
        "",
        "| sweep-point run: time to its first `dvc exp run` | median | runs |",
        "|---|---|---|",
        f"| from the trigger, a worker's first run (poll, full clone, dvc pull) | {statistics.median(triggered):.1f} s "
        f"| {len(triggered)} |",
        f"| from the worker's pick-up, its first run (full clone, dvc pull) | {statistics.median(first):.1f} s "
        f"| {len(first)} |",
        f"| from the worker's pick-up, its later runs (fetch, dvc pull) | {statistics.median(later):.1f} s "
        f"| {len(later)} |",
        "",
        f"| smoke train stage, {TRAIN_STEPS} steps, loopback | images/s |",
        "|---|---|",
        f"| 1 node x 1 process | {one:.0f} |",
        f"| 2 nodes x 1 process (torchrun, gloo) | {two:.0f} ({two / one:.2f}x) |",
    ]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
