"""What the team stack costs, measured side by side in one run: starting it, and the stores on a smoke run.

    python -m benchmarks.team --rounds 2 --out benchmarks/team.md

Starts a fresh team stack (the code of ``make stack-up``: PostgreSQL, SeaweedFS, MLflow, Prefect) in a temp
folder on free ports and times each server's start. Then, ``--rounds`` times, it copies the project on the
smoke configuration (``configs/smoke.yaml``) into two fresh git repositories and runs ``dvc repro`` in each:
one with the embedded stores (SQLite ``mlflow.db``, the project's DVC cache), one against the stack (MLflow
server on PostgreSQL with artifacts proxied to the object store) followed by ``make push`` (``pipeline.remote
push``: outputs and run cache to the S3 remote). The two kinds alternate within a round, so machine load
drifts through both alike. The report gives each wall time and the medians' difference: the extra time the
shared stores add to a smoke ``dvc repro``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline import stack

ROOT = Path(__file__).resolve().parents[1]
COPIED = ["params.yaml", "dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore", ".gitignore"]
COPIED_DIRS = ["pipeline", "src", "configs", "data"]
QUIET = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def env_with(extra: dict[str, str]) -> dict[str, str]:
    """This interpreter first on PATH (``dvc`` and the stages it runs), telemetry off, and ``extra``."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, **QUIET, "PATH": path, **extra}


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Run ``cmd`` (it must succeed); its wall seconds."""
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def smoke_project(dest: Path, params_text: str) -> Path:
    """The project's pipeline files in ``dest`` with the smoke params, as a git repository with one commit."""
    for name in COPIED:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    for name in COPIED_DIRS:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (dest / "params.yaml").write_text(params_text)
    env = env_with({})
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for cmd in (["git", "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "smoke"]):
        run(cmd, dest, env)
    run(["dvc", "config", "--local", "core.analytics", "false"], dest, env)
    return dest


def smoke_params(folder: Path) -> str:
    params = folder / "params.yaml"
    shutil.copy2(ROOT / "params.yaml", params)
    overrides = [sys.executable, "-m", "pipeline.overrides", "configs/smoke.yaml", "--apply", str(params)]
    run(overrides, ROOT, env_with({}))
    return params.read_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="smoke repros of each kind (default 2)")
    parser.add_argument("--out", type=Path, help="also write the report (Markdown) here")
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="ddpm-bench-team-"))
    base.chmod(0o711)  # the postgres user traverses it to its cluster
    lines: list[str] = []
    the_stack = stack.Stack(base / "stack", ports={name: stack.free_port() for name in stack.DEFAULT_PORTS})
    try:
        started = time.perf_counter()
        team_env = the_stack.up(say=lambda line: lines.append(f"- {line}"))
        up_seconds = time.perf_counter() - started
        params_text = smoke_params(base)
        times: dict[str, list[float]] = {"embedded": [], "team": [], "team push": []}
        for round_ in range(args.rounds):
            for kind in ("embedded", "team"):
                project = smoke_project(base / f"{kind}{round_}", params_text)
                env = env_with(team_env if kind == "team" else {})
                if kind == "team":
                    run([sys.executable, "-m", "pipeline.remote", "configure"], project, env)
                times[kind].append(run(["dvc", "repro"], project, env))
                print(f"round {round_ + 1}: {kind} dvc repro {times[kind][-1]:.1f} s", flush=True)
                if kind == "team":
                    times["team push"].append(run([sys.executable, "-m", "pipeline.remote", "push"], project, env))
    finally:
        the_stack.down(say=lambda line: None)
        shutil.rmtree(base, ignore_errors=True)

    cpu = platform.processor() or platform.machine()
    report = [
        f"# The team stack's costs ({os.cpu_count()} CPUs, {cpu}, python {platform.python_version()})",
        "",
        f"`make stack-up` code from nothing: {up_seconds:.1f} s",
        *lines,
        "",
        "| smoke run | " + " | ".join(f"round {i + 1}" for i in range(args.rounds)) + " | median |",
        "|---|" + "---|" * (args.rounds + 1),
    ]
    for kind, seconds in times.items():
        cells = " | ".join(f"{s:.1f} s" for s in seconds)
        report.append(f"| {kind} | {cells} | {statistics.median(seconds):.1f} s |")
    extra = statistics.median(times["team"]) - statistics.median(times["embedded"])
    report += ["", f"The shared stores add {extra:+.1f} s to a smoke `dvc repro` (medians; push not included)."]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
