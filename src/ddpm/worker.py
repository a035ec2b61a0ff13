"""The worker side of the team's Prefect deployments: fetch the project into a workspace of this worker.

``prefect.yaml``'s pull step ``ddpm.worker.checkout`` runs on the worker before every flow run. It needs no
clone on the worker, only this package installed: it clones the project's git repository (a full clone: DVC
experiments need the history), or updates the clone this worker made before, pulls the DVC-tracked data and
models from the team's remote, and hands Prefect the folder to run the flow in.

A workspace is ``$DDPM_WORKER_HOME/workspaces/<repository>-<slot>`` (``DDPM_WORKER_HOME`` defaults to
``~/.cache/ddpm-pipeline/worker``). It is kept between flow runs, so its DVC cache is too and a second run
pulls only what changed. A flow run holds its workspace's lock for as long as its process lives, so two flow
runs never share a workspace: a second one on the same worker takes the next free slot. A failed clone or
fetch leaves the workspace as it was (a first clone is made in a temp folder and renamed into place).

The repository and branch come from the step's arguments or from ``DDPM_GIT_URL`` / ``DDPM_GIT_BRANCH`` (job
variables of the deployment, or the worker's environment); the DVC remote from ``DDPM_DVC_REMOTE`` and the
``AWS_*`` keys, as for ``make pull``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HOME = "DDPM_WORKER_HOME"
GIT_URL = "DDPM_GIT_URL"
GIT_BRANCH = "DDPM_GIT_BRANCH"
MAX_SLOTS = 16

_held: list[int] = []  # the workspace locks of this process (released when it exits)


class CheckoutError(RuntimeError):
    """The project could not be fetched; the message is one line naming what failed."""


def home() -> Path:
    return Path(os.environ.get(HOME) or Path.home() / ".cache" / "ddpm-pipeline" / "worker")


def workspace_name(repository: str) -> str:
    """``<last path component>-<8 hex of the URL>``: readable, and distinct for two repositories of one name."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", repository.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")) or "repo"
    return f"{stem}-{hashlib.sha256(repository.encode()).hexdigest()[:8]}"


def claim(root: Path, name: str) -> Path:
    """The first workspace slot ``root/name-<k>`` no other process holds; locked until this process exits."""
    root.mkdir(parents=True, exist_ok=True)
    for slot in range(MAX_SLOTS):
        path = root / f"{name}-{slot}"
        fd = os.open(root / f".{name}-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held.append(fd)
        return path
    raise CheckoutError(f"all {MAX_SLOTS} workspaces of {name} under {root} are in use by other flow runs")


def git(args: list[str], cwd: Path | None, what: str) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        raise CheckoutError(f"{what} failed: {lines[-1] if lines else f'git exited {result.returncode}'}")
    return result.stdout


def remote(args: list[str], cwd: Path) -> None:
    """``python -m pipeline.remote ARGS`` of the fetched project (the remote from the environment)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "pipeline.remote", *args], cwd=cwd, env=env, capture_output=True,
                            text=True)  # fmt: skip
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        raise CheckoutError(lines[-1].removeprefix("error: ") if lines else f"dvc {args[0]} failed")


def identity(workspace: Path) -> None:
    """A git author for the DVC experiment commits, unless the worker's git config has one."""
    for key, value in (("user.name", "ddpm worker"), ("user.email", "ddpm-worker@localhost")):
        if subprocess.run(["git", "config", key], cwd=workspace, capture_output=True).returncode != 0:
            git(["config", key, value], workspace, "git config")


def report(message: str) -> None:
    """Log ``message`` as an error of the flow run this step prepares (its logs in the Prefect UI), if any."""
    flow_run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    if flow_run_id:
        import logging

        from prefect.logging.handlers import APILogHandler

        logging.getLogger("prefect.flow_runs").error(message, extra={"flow_run_id": flow_run_id})
        APILogHandler.flush()


def checkout(repository: str | None = None, branch: str | None = None) -> dict[str, str]:
    """Prefect pull step: the project at ``branch`` in a workspace of this worker, its data pulled.

    Fails with :class:`CheckoutError`, whose one line is also logged to the flow run.
    """
    try:
        return _checkout(repository, branch)
    except CheckoutError as e:
        report(f"checkout: {e}")
        raise


def _checkout(repository: str | None = None, branch: str | None = None) -> dict[str, str]:
    """Prefect pull step: the project at ``branch`` in a workspace of this worker, its data pulled.

    Order: git objects first (``clone`` into a temp folder, or ``fetch`` without touching the tree), then the
    DVC remote's check, and only then the workspace moves to the new commit and ``dvc pull`` fills it, so a
    wrong URL or branch or an unreachable remote leaves a workspace as it was. Returns ``{"directory": ...}``
    (Prefect runs the flow there), ``"commit"`` and ``"workspace"``.
    """
    repository = repository or os.environ.get(GIT_URL)
    branch = branch or os.environ.get(GIT_BRANCH) or "main"
    if not repository or "{{" in repository:
        raise CheckoutError(f"no git repository: set {GIT_URL} (a job variable of the deployment; `make deploy` "
                            "sets it from this clone's origin) or the step's repository")  # fmt: skip
    if "{{" in branch:
        branch = "main"
    workspace = claim(home() / "workspaces", workspace_name(repository))
    what = f"git {{}} of {repository} (branch {branch!r})"
    fresh = not (workspace / ".git").is_dir()
    target = workspace.with_name(f".{workspace.name}.tmp") if fresh else workspace
    try:
        if fresh:
            shutil.rmtree(target, ignore_errors=True)
            git(["clone", "--quiet", "--branch", branch, repository, str(target)], None, what.format("clone"))
        else:
            git(["remote", "set-url", "origin", repository], target, what.format("fetch"))
            git(["fetch", "--quiet", "origin", f"+refs/heads/{branch}:refs/remotes/origin/{branch}"], target,
                what.format("fetch"))  # fmt: skip
        remote(["configure"], target)
        remote(["check"], target)
        if not fresh:  # tracked files as the branch has them; DVC outputs and cache stay for dvc pull
            git(["checkout", "--quiet", "--force", "-B", branch, f"origin/{branch}"], target, what.format("checkout"))
            git(["clean", "--quiet", "-fd"], target, what.format("clean"))
        identity(target)
        remote(["pull", "--allow-missing"], target)
    except BaseException:
        if fresh:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if fresh:
        target.rename(workspace)
    commit = git(["rev-parse", "HEAD"], workspace, "git rev-parse").strip()
    print(f"checkout: {repository} {branch} at {commit[:12]} in {workspace}", flush=True)
    return {"directory": str(workspace), "commit": commit, "workspace": str(workspace)}
