"""Prefect workers that fetch the project: real ``prefect worker start`` processes against the Prefect server of
the tests (the harness), each in its own folder as on its own machine, a bare git repository as the origin and
the team stack's object store as the DVC remote.

A seed clone runs the shrunk smoke pipeline, pushes its outputs and run cache to the DVC remote and its commit
to the origin, and deploys ``prefect.yaml`` with the real ``prefect deploy``. The workers have no clone: the
pull step ``ddpm.worker.checkout`` clones the origin into the worker's own workspace and pulls the DVC data;
the flows push their results as DVC experiments that another clone pulls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from pipeline import flows, params
from pipeline import overrides as dotted
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL

from test_flows import SHRINK
from test_pipeline import ROOT, copy_project, stage_env

pytestmark = pytest.mark.slow

POOL = "gpu"  # prefect.yaml's work pool
WORKERS = ("alpha", "beta")


def git(root: Path, *args: str) -> str:
    result = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def in_project(cmd: list[str], root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{cmd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


class Team:
    """The origin, the seed clone, the client environment and the two workers' folders."""

    def __init__(self, base: Path, env: dict[str, str], origin: Path, seed: Path, branch: str) -> None:
        self.base, self.env, self.origin, self.seed, self.branch = base, env, origin, seed, branch
        self.workers: dict[str, subprocess.Popen] = {}

    def home(self, worker: str) -> Path:
        return self.base / worker

    def start_worker(self, name: str) -> None:
        home = self.home(name)
        home.mkdir(exist_ok=True)
        env = {**self.env, "DDPM_WORKER_HOME": str(home), "OMP_NUM_THREADS": "1"}
        cmd = [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", POOL, "--type", "process",
               "--limit", "1", "--name", name]  # fmt: skip
        # cwd: the worker's own folder, where no clone of the project exists
        self.workers[name] = subprocess.Popen(cmd, cwd=home, env=env, stdout=(home / "worker.log").open("w"),
                                              stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def stop_workers(self) -> None:
        for proc in self.workers.values():
            try:
                node = psutil.Process(proc.pid)
                for p in [*node.children(recursive=True), node]:
                    p.kill()
            except psutil.NoSuchProcess:
                pass
        self.workers.clear()

    def workspaces(self, worker: str) -> list[Path]:
        root = self.home(worker) / "workspaces"
        return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

    def clone(self, dest: Path) -> Path:
        """A teammate's clone of the origin, its DVC remote configured (``make pull`` does it)."""
        subprocess.run(["git", "clone", "-q", str(self.origin), str(dest)], check=True)
        in_project([sys.executable, "-m", "pipeline.remote", "configure"], dest, self.env)
        return dest


@pytest.fixture(scope="module")
def team(team_stack, prefect_server, smoke_params, tmp_path_factory):
    base = tmp_path_factory.mktemp("workers")
    # the stack's DVC remote and keys; the harness's Prefect server; tracking is off (SHRINK)
    env = stage_env(**{**team_stack.env, "PREFECT_API_URL": PREFECT_API_URL.value()})
    env = {k: v for k, v in env.items() if not k.startswith(("MLFLOW_TRACKING", "PREFECT_API_AUTH"))}
    shrunk = dotted.merge(yaml.safe_load(smoke_params), SHRINK)
    params.validate(shrunk)
    seed = copy_project(base / "seed", yaml.safe_dump(shrunk, sort_keys=False))
    (seed / "prefect.yaml").write_text((ROOT / "prefect.yaml").read_text())
    git(seed, "add", "prefect.yaml")
    git(seed, "commit", "-qm", "prefect.yaml")
    in_project([sys.executable, "-m", "pipeline.remote", "configure"], seed, env)
    in_project(["dvc", "repro"], seed, env)
    git(seed, "add", "dvc.lock")
    git(seed, "commit", "-qm", "repro")
    in_project([sys.executable, "-m", "pipeline.remote", "push"], seed, env)
    origin = base / "origin.git"
    git(base, "clone", "-q", "--bare", str(seed), str(origin))
    git(seed, "remote", "add", "origin", str(origin))
    branch = git(seed, "rev-parse", "--abbrev-ref", "HEAD")
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)
        client.update_work_pool(POOL, WorkPoolUpdate(concurrency_limit=len(WORKERS)))
    deploy_env = {**env, "DDPM_GIT_URL": str(origin), "DDPM_GIT_BRANCH": branch}
    in_project([str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all"], seed, deploy_env)
    the_team = Team(base, env, origin, seed, branch)
    for name in WORKERS:
        the_team.start_worker(name)
    yield the_team
    the_team.stop_workers()


def wait(flow_run, seconds: float = 600):
    """The flow run once it reached a final state."""
    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run.id)
            if run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"{run.name} still {run.state.name}"
            time.sleep(1.0)


def flow_logs(flow_run) -> str:
    lines, page = [], 200
    with get_client(sync_client=True) as client:
        while True:
            batch = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])), limit=page, offset=len(lines)
            )
            lines += [entry.message for entry in batch]
            if len(batch) < page:
                return "\n".join(lines)


def exp_refs(origin: Path) -> list[str]:
    out = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=origin, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return out.split()


def test_worker_clones_runs_and_pushes_what_a_teammate_pulls(team, tmp_path):
    before = set(exp_refs(team.origin))
    overrides = {"sample.steps": 4}  # the rest as the seed ran it: the trained model comes from the remote
    run = wait(run_deployment("retrain/nightly-retrain", parameters={"overrides": overrides}, timeout=0))
    text = flow_logs(run)
    assert run.state.is_completed(), f"{run.state.message}\n{text}"
    used = [w for w in WORKERS if team.workspaces(w)]
    assert len(used) == 1, used  # one worker took it, in its own folder
    (workspace,) = team.workspaces(used[0])
    assert f"workspace {workspace}" in text and (workspace / ".dvc" / "cache").is_dir()
    assert "Running stage 'sample'" in text and "Running stage 'train'" not in text  # train came from the remote
    (new,) = set(exp_refs(team.origin)) - before  # dvc exp push origin
    name = new.rsplit("/", 1)[-1]

    mate = team.clone(tmp_path / "mate")
    in_project(["dvc", "exp", "pull", "origin", name], mate, team.env)
    in_project(["dvc", "exp", "apply", name], mate, team.env)
    assert yaml.safe_load((mate / "params.yaml").read_text())["sample"]["steps"] == 4
    in_project(["dvc", "checkout"], mate, team.env)
    evaluate = json.loads((mate / "outputs/metrics/evaluate.json").read_text())
    assert evaluate == json.loads((workspace / "outputs/metrics/evaluate.json").read_text())
    status = in_project(["dvc", "status", "--json"], mate, team.env)
    assert json.loads(status.stdout or "{}") == {}, status.stdout


def test_fan_out_runs_the_grid_on_both_workers_side_by_side(team, tmp_path):
    scheduler = team.clone(tmp_path / "scheduler")
    grid = {"sample.steps": [3, 5, 6, 7]}
    result = flows.experiment_grid(grid=grid, project=str(scheduler), deployment="sweep-point/sweep-point")
    assert not result["failed"] and len(result["runs"]) == 4
    assert sorted(r["overrides"]["sample.steps"] for r in result["runs"]) == [3, 5, 6, 7]
    assert result["best"] == min(result["runs"], key=lambda r: r["fid"])
    homes = {Path(r["workspace"]).parents[1] for r in result["runs"]}
    assert homes == {team.home(w) for w in WORKERS}, homes  # both workers took points, each in its own folder
    with get_client(sync_client=True) as client:
        spans = sorted(
            (r.start_time, r.end_time) for r in (client.read_flow_run(x["flow_run_id"]) for x in result["runs"])
        )
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans  # two points ran at the same time
    # the metrics came through git and the DVC remote: the scheduler's clone has the experiments
    shown = in_project(["dvc", "exp", "show", "--json", "--no-pager"], scheduler, team.env).stdout
    assert all(r["experiment"] in shown for r in result["runs"])


def test_a_failed_point_is_named_and_the_others_finish(team, tmp_path):
    scheduler = team.clone(tmp_path / "scheduler")
    grid = {"train.lr": [SHRINK.get("train.lr", 1e-3), 1e20], "train.checkpoint_every": [1]}
    result = flows.experiment_grid(grid=grid, project=str(scheduler), deployment="sweep-point/sweep-point")
    assert len(result["runs"]) == 1 and len(result["failed"]) == 1
    (failed,) = result["failed"]
    assert failed["overrides"]["train.lr"] == 1e20 and failed["error"]
    assert "train.lr" in result["message"] and failed["error"] in result["message"]


@pytest.mark.parametrize(
    "job_env, expected",
    [
        ({"DDPM_GIT_URL": "/nowhere/project.git"}, "git clone of /nowhere/project.git (branch"),
        ({"DDPM_GIT_BRANCH": "no-such-branch"}, "(branch 'no-such-branch') failed"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "is unreachable"),
    ],
)
def test_a_bad_origin_or_remote_fails_in_the_pull_step_in_one_line(team, job_env, expected):
    before = {w: [(p, sorted(x.name for x in p.iterdir())) for p in team.workspaces(w)] for w in WORKERS}
    job_variables = {"env": {"DDPM_GIT_URL": str(team.origin), "DDPM_GIT_BRANCH": team.branch, **job_env}}
    parameters = {"overrides": {"sample.steps": 4}}
    run = wait(run_deployment("retrain/nightly-retrain", parameters=parameters, job_variables=job_variables, timeout=0))
    assert run.state.is_failed() or run.state.is_crashed(), run.state
    for _ in range(30):  # the flow run's process sends its last log lines in the background
        text = flow_logs(run)
        errors = [line for line in text.splitlines() if expected in line and line.startswith("checkout: ")]
        if errors:
            break
        time.sleep(1.0)
    assert len(errors) == 1 and "\n" not in errors[0], text
    after = {w: [(p, sorted(x.name for x in p.iterdir())) for p in team.workspaces(w)] for w in WORKERS}
    assert after == before  # no workspace half-written, no temp clone left
    for w in WORKERS:
        root = team.home(w) / "workspaces"
        assert not [p for p in root.glob(".*.tmp")] if root.is_dir() else True
    assert os.environ.get("DDPM_GIT_URL") is None
