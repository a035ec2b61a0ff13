"""Team mode end to end: clones of a project share the team stack's DVC remote, MLflow server and registry.

Clone A runs the smoke pipeline against the stack (runs and registry in PostgreSQL, artifacts proxied to the
object store) and pushes; clone B pulls and has everything without running a stage, and samples the champion.
The faults: the object store down during a push or restarted before a pull, PostgreSQL restarted during
training, and wrong keys, bucket or endpoint.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient
from pipeline import servers
from pipeline.stack import free_port

from test_pipeline import clone_project, copy_project, digest, ran_stages, stage_env

pytestmark = pytest.mark.slow


def team_env(team_stack, drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    env = stage_env(**{**team_stack.env, **extra})
    return {k: v for k, v in env.items() if k not in drop}


def in_project(cmd: list[str], project: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def remote_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.remote", *args]


def pg_query(team_stack, sql: str, *args):
    conn = team_stack.server("postgres").connect("mlflow", team_stack.creds["PG_MLFLOW_PASSWORD"], "mlflow")
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def clone_a(team_stack, smoke_params, tmp_path_factory):
    """Clone A after `dvc repro` against the stack, its dvc.lock committed, and `make push` (pipeline.remote)."""
    project = copy_project(tmp_path_factory.mktemp("team") / "a", smoke_params)
    env = team_env(team_stack)
    in_project(remote_cmd("configure"), project, env)
    repro = in_project(["dvc", "repro"], project, env)
    in_project(["git", "add", "dvc.lock"], project, env)
    in_project(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"], project, env)
    push = in_project(remote_cmd("push"), project, env)
    return project, repro, push


def test_a_second_clone_pulls_everything_and_reproduces_nothing(clone_a, team_stack, tmp_path):
    project_a, _, _ = clone_a
    team_stack.restart("seaweedfs")  # between push and pull: objects are on disk, nothing is lost
    project_b = tmp_path / "b"
    subprocess.run(["git", "clone", "-q", str(project_a), str(project_b)], check=True)
    env = team_env(team_stack)  # DDPM_DVC_REMOTE and the keys: `make pull` writes the remote
    in_project(remote_cmd("pull"), project_b, env)
    assert digest(project_b / "outputs") == digest(project_a / "outputs")  # checksums match
    repro = in_project(["dvc", "repro"], project_b, env)
    assert ran_stages(repro) == set(), repro.stdout
    status = in_project(["dvc", "status"], project_b, env)
    assert "up to date" in status.stdout, status.stdout
    assert not (project_b / "mlflow.db").exists() and not (project_b / "mlartifacts").exists()


def test_the_champion_is_sampled_from_the_second_clone_without_object_store_keys(clone_a, team_stack, tmp_path):
    project_a, _, _ = clone_a
    project_b = tmp_path / "b"
    subprocess.run(["git", "clone", "-q", str(project_a), str(project_b)], check=True)
    decision = json.loads((project_a / "outputs" / "evaluate" / "registry.json").read_text())
    assert decision["alias"] == "champion", decision
    env = team_env(team_stack, drop=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"))
    drawn, version = {}, f"models:/{decision['model_name']}/{decision['version']}"
    local = str(project_a / "outputs" / "train" / "model.pt")
    for name, model in [("champion", "champion"), ("version", version), ("local", local)]:
        cmd = [sys.executable, "-m", "pipeline.sample", "--model", model, "--out", str(tmp_path / name), "--n", "8",
               "--seed", "5", "--quiet"]  # fmt: skip
        in_project(cmd, project_b, env)
        drawn[name] = np.load(tmp_path / name / "samples.npz")["arr_0"]
    np.testing.assert_array_equal(drawn["champion"], drawn["version"])
    np.testing.assert_array_equal(drawn["champion"], drawn["local"])  # the champion is clone A's model


def test_runs_and_registry_live_in_postgres_and_artifacts_in_the_bucket(clone_a, team_stack):
    project_a, _, _ = clone_a
    record = json.loads((project_a / "outputs" / "train" / "run.json").read_text())
    decision = json.loads((project_a / "outputs" / "evaluate" / "registry.json").read_text())
    assert record["tracking_uri"] == team_stack.env["MLFLOW_TRACKING_URI"]
    assert pg_query(team_stack, "SELECT status FROM runs WHERE run_uuid = %s", record["run_id"]) == [("FINISHED",)]
    versions = pg_query(team_stack, "SELECT version FROM model_versions WHERE name = %s AND run_id = %s",
                        decision["model_name"], record["run_id"])  # fmt: skip
    assert versions == [(int(decision["version"]),)]
    aliases = pg_query(team_stack, "SELECT alias, version FROM registered_model_aliases WHERE name = %s",
                       decision["model_name"])  # fmt: skip
    assert ("champion", int(decision["version"])) in aliases
    s3 = boto3.client("s3", endpoint_url=team_stack.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=team_stack.creds["S3_MLFLOW_ACCESS_KEY"],
                      aws_secret_access_key=team_stack.creds["S3_MLFLOW_SECRET_KEY"])  # fmt: skip
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=servers.MLFLOW_BUCKET)
            for o in page.get("Contents", [])]  # fmt: skip
    run_keys = [k for k in keys if record["run_id"] in k]
    assert any(k.endswith("samples/grid.png") or k.endswith("grid.png") for k in run_keys), run_keys
    assert any(k.endswith("model.pt") for k in keys), keys
    assert not (project_a / "mlartifacts").exists() and not (project_a / "mlflow.db").exists()


def test_a_push_with_the_store_down_fails_in_one_line_and_a_retry_pushes_everything(clone_a, team_stack, tmp_path):
    project = clone_project(clone_a[0], tmp_path / "c")
    env = team_env(team_stack, DDPM_DVC_REMOTE=f"s3://{servers.DVC_BUCKET}/store-c")  # an empty prefix
    in_project(remote_cmd("configure"), project, env)

    def state() -> tuple[str, str, dict]:
        git = in_project(["git", "status", "--porcelain"], project, env).stdout
        return git, in_project(["dvc", "status"], project, env).stdout, digest(project / "outputs")

    before = state()
    team_stack.server("seaweedfs").stop()
    try:
        push = in_project(remote_cmd("push"), project, env, check=False)
    finally:
        team_stack.stack.up(say=lambda line: None)
    assert push.returncode == 1
    endpoint = team_stack.env["AWS_ENDPOINT_URL"]
    assert push.stderr.strip().splitlines() == [
        f"error: DVC remote 'team': object store at {endpoint} is unreachable (EndpointConnectionError); is it "
        "running? (`make stack-status`)"
    ]
    assert state() == before
    in_project(remote_cmd("push"), project, env)
    synced = in_project(["dvc", "status", "--cloud"], project, env)
    assert "in sync" in synced.stdout, synced.stdout


@pytest.mark.parametrize("fault", ["bucket", "key", "endpoint"])
def test_a_wrong_bucket_key_or_endpoint_fails_in_one_line_before_any_transfer(clone_a, team_stack, tmp_path, fault):
    project = tmp_path / "b"
    subprocess.run(["git", "clone", "-q", str(clone_a[0]), str(project)], check=True)
    endpoint, prefix = team_stack.env["AWS_ENDPOINT_URL"], "error: DVC remote 'team': "
    if fault == "bucket":
        env = team_env(team_stack, DDPM_DVC_REMOTE="s3://no-such-bucket/store")
        expected = f"bucket 'no-such-bucket' does not exist at {endpoint}, or the access key may not use it (403)"
    elif fault == "key":
        env = team_env(team_stack, AWS_SECRET_ACCESS_KEY="wrong-secret")
        expected = f"{endpoint} refused the access key (SignatureDoesNotMatch): check AWS_ACCESS_KEY_ID / " + (
            "AWS_SECRET_ACCESS_KEY"
        )
    else:
        endpoint = f"http://127.0.0.1:{free_port()}"
        env = team_env(team_stack, AWS_ENDPOINT_URL=endpoint)
        expected = f"object store at {endpoint} is unreachable (EndpointConnectionError); is it running? " + (
            "(`make stack-status`)"
        )
    pull = in_project(remote_cmd("pull"), project, env, check=False)
    assert pull.returncode == 1
    assert pull.stderr.strip().splitlines() == [prefix + expected]
    assert not (project / "outputs").exists()
    assert "wrong-secret" not in (project / ".dvc" / "config").read_text()


def test_wrong_mlflow_credentials_fail_in_one_line_before_training(clone_a, team_stack, tmp_path):
    project = clone_project(clone_a[0], tmp_path / "d")
    before = digest(project / "outputs" / "train")
    env = team_env(team_stack, MLFLOW_TRACKING_PASSWORD="not-the-password")
    train = in_project([sys.executable, "-m", "pipeline.train"], project, env, check=False)
    assert train.returncode != 0
    lines = train.stderr.strip().splitlines()
    assert len(lines) == 1 and team_stack.env["MLFLOW_TRACKING_URI"] in lines[0], train.stderr
    assert "ddpm" in lines[0] and "not-the-password" not in train.stderr + train.stdout
    assert digest(project / "outputs" / "train") == before


def test_a_postgres_restart_during_training_loses_no_metric_and_registers_once(clone_a, team_stack, tmp_path):
    project = clone_project(clone_a[0], tmp_path / "e")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["max_steps"] = 160
    params["tracking"]["registered_model"] = "ddpm-restart"  # its own registry entry: clone A's champion stays
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    old_runs = {r for (r,) in pg_query(team_stack, "SELECT run_uuid FROM runs")}
    env = team_env(team_stack)
    repro = subprocess.Popen(["dvc", "repro", "evaluate"], cwd=project, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while not ({r for (r,) in pg_query(team_stack, "SELECT run_uuid FROM runs WHERE status = 'RUNNING'")} - old_runs):
        assert repro.poll() is None and time.monotonic() < deadline, "the training never opened its run"
        time.sleep(0.5)
    time.sleep(3)
    stages = [" ".join(p.cmdline()) for p in psutil.Process(repro.pid).children(recursive=True)]
    assert any("pipeline.train" in cmd for cmd in stages), stages  # the restart happens during training
    team_stack.restart("postgres")
    out, _ = repro.communicate(timeout=900)
    assert repro.returncode == 0, out[-3000:]
    record = json.loads((project / "outputs" / "train" / "run.json").read_text())
    assert record["run_id"] not in old_runs
    client = MlflowClient(team_stack.env["MLFLOW_TRACKING_URI"])
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            mp.setenv(key, team_stack.env[key])
        run = client.get_run(record["run_id"])
        assert run.info.status == "FINISHED"
        steps = sorted({m.step for m in client.get_metric_history(record["run_id"], "train/loss")})
    log_every = params["train"]["log_every"]
    assert len(steps) >= 160 // log_every - 1, steps  # every logged step, before, during and after the restart
    decision = json.loads((project / "outputs" / "evaluate" / "registry.json").read_text())
    versions = pg_query(team_stack, "SELECT version FROM model_versions WHERE name = %s AND run_id = %s",
                        decision["model_name"], record["run_id"])  # fmt: skip
    assert versions == [(int(decision["version"]),)]


def test_no_secret_reaches_a_log_a_param_a_tag_the_lock_or_git(clone_a, team_stack):
    project_a, repro, push = clone_a
    texts = {"repro output": repro.stdout + repro.stderr, "push output": push.stdout + push.stderr,
             "dvc.lock": (project_a / "dvc.lock").read_text()}  # fmt: skip
    texts["git"] = subprocess.run(["git", "log", "-p", "--all"], cwd=project_a, capture_output=True, text=True).stdout
    texts["git diff"] = subprocess.run(["git", "diff"], cwd=project_a, capture_output=True, text=True).stdout
    for log in (team_stack.root / "logs").glob("*.log"):
        texts[log.name] = log.read_text(errors="replace")
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            mp.setenv(key, team_stack.env[key])
        client = MlflowClient(team_stack.env["MLFLOW_TRACKING_URI"])
        for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
            texts[f"run {run.info.run_id}"] = json.dumps([run.data.params, run.data.tags])
    assert len(texts) > 6
    for secret in team_stack.secrets():
        leaks = [where for where, text in texts.items() if secret in text]
        assert not leaks, f"a secret appears in {leaks}"
    assert not re.search(r"AWS_SECRET_ACCESS_KEY|MLFLOW_TRACKING_PASSWORD", texts["dvc.lock"])
