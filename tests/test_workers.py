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
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from pipeline import flows, params
from pipeline import overrides as dotted
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL

from test_flows import SHRINK
from test_pipeline import ROOT, copy_project, stage_env

pytestmark = pytest.mark.slow

POOL = "gpu"  # prefect.yaml's work pool
WORKERS = ("alpha", "beta")
ON_CPU = {"profile": None}  # nightly-retrain without its GPU profile (configs/gpu.yaml): the default net, on the CPU


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
        # one thread per worker, as on two machines; polling every 2 s instead of Prefect's 10 s
        env = {**self.env, "DDPM_WORKER_HOME": str(home), "OMP_NUM_THREADS": "1", "PREFECT_WORKER_QUERY_SECONDS": "2"}
        cmd = [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", POOL, "--type", "process",
               "--limit", "1", "--name", name]  # fmt: skip
        # cwd: the worker's own folder, where no clone of the project exists
        self.workers[name] = subprocess.Popen(cmd, cwd=home, env=env, stdout=(home / "worker.log").open("w"),
                                              stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def kill(self, name: str, worker_too: bool = True) -> None:
        """SIGKILL the worker's flow runs (and the worker itself): a lost job, or a lost machine."""
        try:
            node = psutil.Process(self.workers[name].pid)
            for p in [*node.children(recursive=True), *([node] if worker_too else [])]:
                p.kill()
        except psutil.NoSuchProcess:
            pass
        if worker_too:
            self.workers.pop(name).wait()

    def stop_workers(self) -> None:
        for name in list(self.workers):
            self.kill(name)

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
    # no scheduled retrain (nightly-retrain's cron) may take a worker while the tests run
    prefect = str(Path(sys.executable).parent / "prefect")
    in_project([prefect, "--no-prompt", "deployment", "schedule", "pause", "--all"], seed, env)
    # `make deploy`'s automation: a run without a heartbeat (every 30 s, prefect.yaml) for 45 s is Crashed
    in_project([sys.executable, "-m", "pipeline.deployments", "zombies", "--within", "45"], seed, env)
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
    run = wait(run_deployment("retrain/nightly-retrain", parameters={"overrides": overrides, **ON_CPU}, timeout=0))
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


def worker_of(flow_run_id) -> str:
    """The worker that ran a flow run (Prefect logs "Worker 'name' submitting flow run ...")."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    return re.search(r"Worker '(\w+)' submitting flow run", flow_logs(run)).group(1)


def test_fan_out_runs_the_grid_on_both_workers_side_by_side_and_names_a_failed_point(team, tmp_path):
    scheduler = team.clone(tmp_path / "scheduler")
    lr = yaml.safe_load((scheduler / "params.yaml").read_text())["train"]["lr"]
    grid = {"train.lr": [lr, 1e20], "sample.steps": [3, 5]}  # lr 1e20: the loss diverges, train fails
    result = flows.experiment_grid(grid=grid, project=str(scheduler), deployment="sweep-point/sweep-point")
    assert sorted(r["overrides"]["sample.steps"] for r in result["runs"]) == [3, 5]
    assert all(r["overrides"]["train.lr"] == lr for r in result["runs"])
    assert result["best"] == min(result["runs"], key=lambda r: r["fid"])
    assert sorted(f["overrides"]["sample.steps"] for f in result["failed"]) == [3, 5]
    for f in result["failed"]:  # named, with its error, in the report
        assert f["overrides"]["train.lr"] == 1e20 and f["error"] and f["error"] in result["message"]
    names = [r["flow_run"] for r in result["runs"]] + [f["flow_run"] for f in result["failed"]]
    with get_client(sync_client=True) as client:
        points = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)))
    assert len(points) == 4
    assert {worker_of(r.id) for r in points} == set(WORKERS)  # both workers took points
    spans = sorted((r.start_time, r.end_time) for r in points)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans  # two points ran at the same time
    for r in result["runs"]:  # each in the workspace of the worker that ran it
        assert Path(r["workspace"]).parents[1] == team.home(worker_of(r["flow_run_id"]))
    # the metrics came through git and the DVC remote: the scheduler's clone has the experiments
    shown = in_project(["dvc", "exp", "show", "--json", "--no-pager"], scheduler, team.env).stdout
    assert all(r["experiment"] in shown for r in result["runs"])


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
    parameters = {"overrides": {"sample.steps": 4}, **ON_CPU}
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


def resume_objects(team_stack) -> list[str]:
    """The resume checkpoints in the shared store (pipeline.remote: <remote>/resume/<key>.ckpt)."""
    import boto3

    env = team_stack.env
    bucket, _, prefix = env["DDPM_DVC_REMOTE"].removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")  # fmt: skip
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="/".join(filter(None, [prefix, "resume/"])))
    return [o["Key"] for o in listing.get("Contents", [])]


def test_a_killed_worker_crashes_its_run_and_the_other_resumes_it(team, team_stack, tmp_path):
    overrides = {"train.max_steps": 800, "train.checkpoint_every": 50, "train.val_every": 400, "train.seed": 3}
    assert resume_objects(team_stack) == []
    first = run_deployment("retrain/nightly-retrain", parameters={"overrides": overrides, **ON_CPU}, timeout=0)
    deadline = time.monotonic() + 300
    while not (resume_objects(team_stack) and "resume checkpoint pushed" in flow_logs(first)):
        assert time.monotonic() < deadline, flow_logs(first)
        time.sleep(0.5)
    workspace = Path(re.search(r"^workspace (\S+)$", flow_logs(first), re.M).group(1))
    lost = workspace.parents[1].name  # the worker that runs it
    team.kill(lost)  # the whole machine: the worker and its flow run's processes, mid-train
    crashed = wait(first)  # nobody reports it: its heartbeats stop and the automation marks it Crashed
    assert crashed.state.is_crashed() and "no heartbeat for 45 s" in crashed.state.message, crashed.state
    try:
        parameters = {"overrides": overrides, **ON_CPU}
        second = wait(run_deployment("retrain/nightly-retrain", parameters=parameters, timeout=0))
        text = flow_logs(second)
        assert second.state.is_completed(), f"{second.state.message}\n{text}"
        other = Path(re.search(r"^workspace (\S+)$", text, re.M).group(1))
        assert other.parents[1].name != lost
        assert "resume checkpoint fetched from the shared store" in text
        step = int(re.search(r"resuming from outputs/train/resume.ckpt at step (\d+)", text).group(1))
        assert 0 < step < 800
        assert resume_objects(team_stack) == []  # the finished run removed it

        # the same run uninterrupted, here, one thread as on the workers
        reference = team.clone(tmp_path / "reference")
        in_project([sys.executable, "-m", "pipeline.remote", "pull"], reference, team.env)
        env = {**team.env, "OMP_NUM_THREADS": "1"}
        in_project(["dvc", "exp", "run", *dotted.set_flags(overrides), "train"], reference, env)  # the stages to it
        resumed = torch.load(other / "outputs/train/model.pt", weights_only=True)["state_dict"]
        uninterrupted = torch.load(reference / "outputs/train/model.pt", weights_only=True)["state_dict"]
        assert resumed.keys() == uninterrupted.keys()
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
        # the EMA snapshots: those of the lost worker up to the checkpoint came from the store, the rest were
        # written here, and together they are the uninterrupted run's
        assert re.search(r"\d+ EMA snapshots fetched from the shared store", text), text
        snapshots = sorted(p.name for p in (other / "outputs/train/ema").glob("*.pt"))
        assert snapshots == sorted(p.name for p in (reference / "outputs/train/ema").glob("*.pt"))
        assert any(int(name.split("-step")[1][:-3]) < step for name in snapshots), snapshots
        for name in snapshots:
            mine = torch.load(other / "outputs/train/ema" / name, weights_only=True)["state_dict"]
            theirs = torch.load(reference / "outputs/train/ema" / name, weights_only=True)["state_dict"]
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name
    finally:
        team.start_worker(lost)
