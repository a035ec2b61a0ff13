"""DVC as a subprocess: what would run, ``dvc repro`` / ``dvc exp run`` with streamed output, and interrupts.

A long DVC command runs in its own process group with its output logged line by line. When the caller is
interrupted (a Prefect timeout, or any exception), DVC gets SIGINT, so that it releases its locks and the
stage's atomic writes delete their temp files, then SIGKILL after :data:`GRACE_SECONDS`; temp files a killed
stage left behind are removed. A failed DVC command raises :class:`PipelineError` naming its last error line.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pipeline import overrides as dotted
from pipeline import params, paths

DVC = (sys.executable, "-m", "dvc")  # the DVC command, with this interpreter's DVC
GRACE_SECONDS = 30  # after SIGINT, how long DVC and its stage get to exit before SIGKILL
EXPERIMENT = re.compile(r"Ran experiment\(s\): (\S+)")

Logger = logging.Logger | logging.LoggerAdapter


class PipelineError(RuntimeError):
    """A DVC command failed; the message ends with its last error line."""


def dvc_env(root: Path | None = None) -> dict[str, str]:
    """The environment of DVC and its stages: this interpreter first on PATH (dvc.yaml runs ``python``), no
    telemetry, and the project's own ``src/`` first on PYTHONPATH, so the stages run the library of the commit
    DVC hashes (a worker's installed package may be another version)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if root is not None and (Path(root) / "src" / "ddpm").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(root).resolve() / "src"), env.get("PYTHONPATH")]))
    for key, value in {"DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        env.setdefault(key, value)
    return env


def dvc(root: Path, *args: str) -> str:
    """Run a short DVC command; its stdout, or PipelineError with its last error line."""
    result = subprocess.run([*DVC, *args], cwd=root, env=dvc_env(root), capture_output=True, text=True)
    if result.returncode != 0:
        raise PipelineError(f"dvc {' '.join(args)} failed ({result.returncode}): {last_line(result.stderr)}")
    return result.stdout


def git_commit(root: Path) -> str:
    """The commit checked out in ``root``."""
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise PipelineError(f"git rev-parse HEAD failed in {root}: {last_line(result.stderr)}")
    return result.stdout.strip()


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def stream(root: Path, args: list[str], log: Callable[[str], None]) -> list[str]:
    """Run a long DVC command, logging its output line by line; interrupt it if this thread is interrupted.

    Returns the output lines; raises PipelineError when DVC fails.
    """
    proc = subprocess.Popen(
        [*DVC, *args],
        cwd=root,
        env=dvc_env(root),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=default_sigint,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=pump, args=(proc.stdout, lines), daemon=True).start()
    output = []
    try:
        while (line := next_line(lines)) is not None:
            if line.strip():
                output.append(line.rstrip())
                log(line.rstrip())
        proc.wait()
    except BaseException:
        interrupt(proc, root)
        raise
    if proc.returncode != 0:
        errors = [line for line in output if line.startswith(("ERROR", "error"))] or output or ["no output"]
        raise PipelineError(f"dvc {' '.join(args)} failed ({proc.returncode}): {' / '.join(errors[-2:])}")
    return output


def default_sigint() -> None:
    """In the DVC child: SIGINT back to its default. A process that starts with SIGINT ignored (as Prefect's
    runner may leave it) passes that on to DVC and the stage, and an interrupt would then be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def pump(stdout: Iterable[str], lines: queue.Queue[str | None]) -> None:
    """Copy a process's output into a queue, then None."""
    for line in stdout:
        lines.put(line)
    lines.put(None)


def next_line(lines: queue.Queue[str | None]) -> str | None:
    """The next output line; wakes up every second so that a timeout can interrupt the wait."""
    while True:
        try:
            return lines.get(timeout=1.0)
        except queue.Empty:
            continue


def interrupt(proc: subprocess.Popen, root: Path) -> None:
    """Stop DVC and its stage: SIGINT, then SIGKILL after the grace period; remove leftover temp files."""
    for sig, wait in ((signal.SIGINT, GRACE_SECONDS), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    for tmp in (root / paths.OUT).rglob(".*.tmp"):  # atomic-write temp files of a killed stage
        tmp.unlink(missing_ok=True)


def stages_run(output: Iterable[str]) -> list[str]:
    """The stages DVC executed, in order (not those it skipped as unchanged)."""
    return re.findall(r"Running stage '([^']+)'", "\n".join(output))


def changes(root: Path, overrides: dict[str, Any]) -> list[str]:
    """What would make DVC run: stages ``dvc status`` reports, and overrides that differ from params.yaml."""
    status = json.loads(dvc(root, "status", "--json") or "{}")
    return [f"stage {name}" for name in status] + dotted.differences(params.read_yaml(root / params.PARAMS), overrides)


def repro(
    root: Path, overrides: dict[str, Any], force: bool, logger: Logger, as_experiment: bool = False
) -> dict[str, Any]:
    """``dvc repro`` (``dvc exp run -S ...`` with overrides, or ``as_experiment``): the command, the stages it
    ran, the experiment.

    A failed or interrupted run leaves params.yaml as it was (``dvc exp run -S`` writes the overrides first).
    """
    args = ["exp", "run", *dotted.set_flags(overrides)] if overrides or as_experiment else ["repro"]
    args += ["--force"] if force else []
    params_file = root / params.PARAMS
    before = params_file.read_bytes()
    logger.info("$ dvc %s", " ".join(args))
    try:
        output = stream(root, args, logger.info)
    except BaseException:
        if params_file.read_bytes() != before:
            params_file.write_bytes(before)
            logger.warning("restored params.yaml as it was before the failed run")
        raise
    experiment = EXPERIMENT.search("\n".join(output))
    return {
        "command": "dvc " + " ".join(args),
        "stages": stages_run(output),
        "experiment": experiment.group(1) if experiment else None,
    }


def experiment(root: Path, overrides: dict[str, Any], logger: Logger) -> str:
    """``dvc exp run --temp -S ...``: one experiment in a temp copy of the workspace; its name."""
    args = ["exp", "run", "--temp", *dotted.set_flags(overrides)]
    logger.info("$ dvc %s", " ".join(args))
    name = EXPERIMENT.search("\n".join(stream(root, args, logger.info)))
    if name is None:
        raise PipelineError(f"dvc {' '.join(args)} did not name its experiment")
    return name.group(1)


def push_experiment(root: Path, name: str, logger: Logger) -> str:
    """``dvc exp push --run-cache origin NAME``: the experiment's commit to git's ``origin``, its outputs and the
    run cache to the default DVC remote; a teammate then runs ``dvc exp pull origin NAME``."""
    args = ["exp", "push", "--run-cache", "origin", name]
    logger.info("$ dvc %s", " ".join(args))
    dvc(root, *args)
    return "dvc " + " ".join(args)


def pull_experiments(root: Path, names: list[str]) -> None:
    """``dvc exp pull origin NAMES``: the experiments' commits and outputs, from git's origin and the DVC remote."""
    dvc(root, "exp", "pull", "origin", *names)


def experiment_metrics(root: Path, names: list[str], metrics_file: Path) -> dict[str, dict[str, Any]]:
    """The metrics in ``metrics_file`` (relative to the project) of the named experiments (``dvc exp show``)."""
    key = metrics_file.as_posix()
    found: dict[str, dict[str, Any]] = {}

    def walk(node: dict[str, Any]) -> None:
        metrics = ((node.get("data") or {}).get("metrics") or {}).get(key, {}).get("data")
        if node.get("name") in names and metrics and node["name"] not in found:
            found[node["name"]] = metrics
        for child in node.get("experiments") or []:
            for rev in child.get("revs") or []:
                walk(rev)

    for baseline in json.loads(dvc(root, "exp", "show", "--json", "--no-pager")):
        walk(baseline)
    missing = sorted(set(names) - found.keys())
    if missing:
        raise PipelineError(f"dvc exp show has no {key} metrics for {missing}")
    return found
