"""The credentials preflight against a real `mlflow server --app-name basic-auth` (SQLite, loopback).

A basic-auth server answers ``/health`` without credentials but refuses its API: the stages check both before
any work, and a missing or wrong login (401) or a missing permission (403) is one line that names the server
and the user, never the password. A train stage with the right login logs a run that holds no secret.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys

import pytest
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from ddpm import tracking
from ddpm.config import TrackingConfig
from test_pipeline import clone_project, stage_env
from test_tracking import Server, set_params

pytestmark = pytest.mark.slow

ADMIN, BOB = "admin", "bob"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A basic-auth tracking server: admin ``admin``, user ``bob``, and no permission by default; passwords fresh."""
    root = tmp_path_factory.mktemp("mlflow_auth")
    passwords = {ADMIN: secrets.token_urlsafe(16), BOB: secrets.token_urlsafe(16)}
    (root / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
        f"admin_username = {ADMIN}\nadmin_password = {passwords[ADMIN]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n"  # one password hash check per minute, not per request
    )
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini")}
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(16)
    server = Server(root, app="basic-auth", env=env)
    with pytest.MonkeyPatch.context() as mp:
        login(mp, ADMIN, passwords[ADMIN])
        get_app_client("basic-auth", tracking_uri=server.uri).create_user(BOB, passwords[BOB])
        MlflowClient(server.uri).create_experiment("guarded")
    yield server, passwords
    server.stop()


def login(monkeypatch, user: str | None, password: str | None) -> None:
    for name, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def test_no_or_wrong_credentials_are_one_line_naming_the_server_and_user(auth_server, monkeypatch):
    server, passwords = auth_server
    login(monkeypatch, None, None)
    with pytest.raises(tracking.TrackingError) as refused:
        tracking.check_server(server.uri)
    assert str(refused.value) == (
        f"MLflow tracking server {server.uri} refused an unauthenticated request (no user set) (HTTP 401); "
        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account of that server"
    )
    login(monkeypatch, BOB, "not-" + passwords[BOB])
    with pytest.raises(tracking.TrackingError, match=f"refused the credentials of user '{BOB}' \\(HTTP 401\\)") as e:
        tracking.check_server(server.uri)
    assert passwords[BOB] not in str(e.value) and len(str(e.value).splitlines()) == 1
    login(monkeypatch, BOB, passwords[BOB])
    tracking.check_server(server.uri)  # the right login passes


def test_a_user_without_permission_is_one_line(auth_server, monkeypatch):
    server, passwords = auth_server
    login(monkeypatch, BOB, passwords[BOB])
    with pytest.raises(tracking.TrackingError) as refused:
        tracking.start_run(TrackingConfig(uri=server.uri, experiment="guarded"), {}, {})
    assert str(refused.value).startswith(
        f"MLflow user '{BOB}' lacks permission to create runs in experiment 'guarded' on {server.uri} (HTTP 403)"
    )
    assert passwords[BOB] not in str(refused.value)


def test_the_train_stage_checks_the_login_first_and_logs_no_secret(auth_server, smoke_repro, tmp_path):
    server, passwords = auth_server
    project = clone_project(smoke_repro[0], tmp_path / "project")
    set_params(project, tracking={"experiment": "auth"}, train={"max_steps": 4, "warmup_steps": 2, "val_every": 4})
    before = (project / "outputs/train/last.ckpt").stat().st_mtime_ns
    train = [sys.executable, "-m", "pipeline.train"]

    anonymous = subprocess.run(train, cwd=project, env=stage_env(MLFLOW_TRACKING_URI=server.uri),
                               capture_output=True, text=True, timeout=600)  # fmt: skip
    assert anonymous.returncode == 2 and len(anonymous.stderr.strip().splitlines()) == 1, anonymous.stderr
    assert anonymous.stderr.startswith(f"error: MLflow tracking server {server.uri} refused an unauthenticated")
    assert (project / "outputs/train/last.ckpt").stat().st_mtime_ns == before, "nothing trained"

    env = stage_env(MLFLOW_TRACKING_URI=server.uri, MLFLOW_TRACKING_USERNAME=ADMIN,
                    MLFLOW_TRACKING_PASSWORD=passwords[ADMIN])  # fmt: skip
    trained = subprocess.run(train, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stderr
    record = json.loads((project / "outputs/train/run.json").read_text())
    with pytest.MonkeyPatch.context() as mp:  # read the run as the admin
        login(mp, ADMIN, passwords[ADMIN])
        client = MlflowClient(server.uri)
        logged = client.get_run(record["run_id"])
        model = client.get_logged_model(logged.outputs.model_outputs[0].model_id)
    assert logged.data.tags["mlflow.user"] == ADMIN and logged.data.tags["mlflow.source.name"] == "pipeline.train"
    seen = [logged.data.params, logged.data.tags, model.params, model.tags, record, trained.stdout + trained.stderr]
    for secret in passwords.values():
        assert all(secret not in json.dumps(part) for part in seen), "a password reached MLflow or the logs"
