"""MLflow tracking against a real `mlflow server` process (SQLite backend, artifact root in a temp dir).

The smoke pipeline runs through `dvc repro evaluate` in a copy of the smoke project (conftest.py: prepared
data and featurizer) with MLFLOW_TRACKING_URI pointed at the server: three trainings of different length give
three runs whose FIDs exercise the champion rule; the server goes down and comes back during the third.
Checked where their pipeline runs already happen: a killed and resumed train stage continues its run
(test_pipeline.py, the kill test), and tracking off logs nothing (test_flows.py, whose project has it off).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from ddpm import generate, registry
from ddpm.module import DiffusionModule
from test_pipeline import clone_project, ran_stages, run, stage_env

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    root: Path, port: int, app: str | None = None, env: dict | None = None
) -> tuple[subprocess.Popen, str]:
    """`mlflow server` with a SQLite backend and an artifact root under ``root`` (and ``--app-name app``, its
    settings in ``env``), answering /health."""
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "server.log", "a")  # noqa: SIM115 (open while the server runs)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art")]
    cmd += ["--app-name", app] if app else []
    env = {**os.environ, **(env or {}), "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    log.close()
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Server:
    """A real tracking server (``start_server``) on a free port; ``stop``, then ``start`` keeps its port and store."""

    def __init__(self, root: Path, app: str | None = None, env: dict | None = None) -> None:
        self.root, self.port, self.app, self.env = root, free_port(), app, env
        self.proc, self.uri = start_server(root, self.port, app, env)

    def stop(self) -> None:
        stop_server(self.proc)

    def start(self) -> None:
        self.proc, _ = start_server(self.root, self.port, self.app, self.env)


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    """A real tracking server for the module (``runs`` takes it down once); stopped afterwards."""
    server = Server(tmp_path_factory.mktemp("mlflow_server"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(server_process) -> str:
    """The URI of the module's tracking server."""
    return server_process.uri


def only_run(client: MlflowClient, experiment: str) -> list[str]:
    """The run ids of an experiment (empty while it does not exist)."""
    found = client.get_experiment_by_name(experiment)
    return [r.info.run_id for r in client.search_runs([found.experiment_id])] if found else []


def logged_model_files(client: MlflowClient, run_id: str) -> set[str]:
    """The files of the run's Logged model (its one model output)."""
    (output,) = client.get_run(run_id).outputs.model_outputs
    listed = client.list_logged_model_artifacts(output.model_id)
    return {
        f.path
        for d in listed
        for f in (client.list_logged_model_artifacts(output.model_id, d.path) if d.is_dir else [d])
    }


def set_params(project: Path, **sections) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def tracked(cmd: list[str], project: Path, uri: str, check: bool = True) -> subprocess.CompletedProcess:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        return run(cmd, project, check=check)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def records(project: Path) -> tuple[dict, dict, dict]:
    out = project / "outputs"
    return tuple(json.loads(p.read_text()) for p in (out / "train/run.json", out / "evaluate/registry.json",
                                                      out / "metrics/evaluate.json"))  # fmt: skip


def through_outage(cmd: list[str], project: Path, server: Server, experiment: str) -> tuple[str, str]:
    """Run ``cmd`` (a tracked pipeline execution) and stop ``server`` for 5 s once the new run of ``experiment``
    has logged its first training loss; (the run's id seen before the outage, the output of ``cmd``)."""
    env = stage_env(MLFLOW_TRACKING_URI=server.uri)
    client = MlflowClient(server.uri)
    known, log = set(only_run(client, experiment)), project.parent / "outage.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=project, env=env, text=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (new := [r for r in only_run(client, experiment) if r not in known]) or not (
            client.get_metric_history(new[0], "train/loss")
        ):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        server.stop()  # the outage: training goes on and buffers
        time.sleep(5)
        server.start()
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output
    return new[0], output


@pytest.fixture(scope="module")
def runs(server_process, smoke_repro, tmp_path_factory):
    """Three pipeline executions: 24 steps (baseline), 2 steps (worse), 150 steps (better, through an outage).

    Returns the project, (stages run, run.json, registry.json, evaluate.json) of each, and the outage: the
    third run's id as seen before the server stopped, and the output of its `dvc exp run`.
    """
    server = server_process.uri
    project = clone_project(smoke_repro[0], tmp_path_factory.mktemp("tracked") / "project")
    set_params(project, sample={"n": 100})
    set_params(project, tracking={"experiment": "smoke", "registered_model": "ddpm-smoke", "wait_seconds": 120})
    results = []
    for steps in (24, 2):
        set_params(project, train={"max_steps": steps, "warmup_steps": min(10, steps - 1), "val_every": steps})
        result = tracked(["dvc", "repro", "evaluate"], project, server)
        results.append((ran_stages(result), *records(project)))
    # the third as a named DVC experiment, which the run carries as its name and tag
    exp = ["dvc", "exp", "run", "-n", "longer", "-S", "train.max_steps=150", "-S", "train.val_every=150"]
    exp += ["-S", "train.log_every=5", "evaluate"]
    run_id, output = through_outage(exp, project, server_process, "smoke")
    results.append((ran_stages(subprocess.CompletedProcess(exp, 0, output)), *records(project)))
    return project, results, (run_id, output)


def test_the_run_record_has_params_curves_fid_and_artifacts(server, runs):
    _, results, _ = runs
    stages, record, decision, scores = results[0]
    assert {"train", "sample", "evaluate"} <= stages
    client = MlflowClient(server)
    run = client.get_run(record["run_id"])
    params = run.data.params
    assert params["train.max_steps"] == "24" and params["data.dataset"] == "digits"
    assert params["config/T"] == "100"  # the resolved DDPMConfig, from Lightning's hyperparameters
    assert run.data.tags["dataset"] == "digits" and len(run.data.tags["dataset.sha256"]) == 64
    assert {"git.commit", "host", "device"} <= run.data.tags.keys()
    history = client.get_metric_history(record["run_id"], "train/loss")
    assert len({m.step for m in history}) > 1
    assert client.get_metric_history(record["run_id"], "train/images_per_second")
    key = f"{scores['sampler']}_{scores['steps']}"
    assert run.data.metrics[f"fid/{key}"] == pytest.approx(scores["fid"])
    assert 0 < run.data.metrics["featurizer/test_accuracy"] <= 1
    assert run.data.metrics[f"sample/nfe/{key}"] == scores["nfe"]
    folders = ("checkpoints", "plots", "config", f"samples/{key}")
    artifacts = {a.path for folder in folders for a in client.list_artifacts(record["run_id"], folder)}
    assert {"checkpoints/last.ckpt", "plots/loss.png", f"samples/{key}/grid.png"} <= artifacts
    assert "data/model.pt" in logged_model_files(client, record["run_id"])  # the EMA model: the run's Logged model
    assert {"config/params.yaml", "config/dvc.lock"} <= artifacts
    assert record["run_url"].startswith(server) and record["run_id"] in record["run_url"]
    assert "dvc.experiment" not in run.data.tags
    longer = client.get_run(results[2][1]["run_id"])
    assert longer.data.tags["dvc.experiment"] == "longer" and longer.info.run_name == "longer"


def test_the_ui_shows_a_model_training_run_with_its_data_source_and_logged_model(server, runs):
    """MLflow 3's conventions, read as the UI reads them: the experiment's kind, the run's dataset inputs and
    source tags, the EMA model as the run's Logged model with the evaluation metrics, and the registered
    version made from that model."""
    _, results, _ = runs
    _, record, decision, scores = results[0]
    client = MlflowClient(server)
    run = client.get_run(record["run_id"])
    assert client.get_experiment(record["experiment_id"]).tags["mlflow.experimentKind"] == "custom_model_development"
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "pipeline.train" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == tags["git.commit"] and len(tags["git.commit"]) == 40
    assert tags["mlflow.user"]
    inputs = {t.value: i.dataset for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert set(inputs) == {"train", "test"}
    assert inputs["train"].name == "digits-train" and inputs["train"].digest == tags["dataset.sha256"][:16]
    assert inputs["test"].name == "digits-test" and len(inputs["test"].digest) == 16
    assert json.loads(inputs["train"].source)["uri"].endswith("outputs/data/train.npz")

    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.name == "model" and model.source_run_id == run.info.run_id and str(model.status) == "READY"
    assert output.step == int(run.data.params["train.max_steps"])
    assert {"MLmodel", "data/model.pt", "requirements.txt"} <= logged_model_files(client, run.info.run_id)
    linked = {m.key: m for m in model.metrics}
    key = f"{scores['sampler']}_{scores['steps']}"
    assert linked[f"fid/{key}"].value == pytest.approx(scores["fid"]) and f"kid/{key}" in linked
    assert linked[f"fid/{key}"].dataset_name == f"digits-{scores['reference']}"
    assert "final/train_loss" in linked, "the final training metrics are the model's too"
    version = client.get_model_version("ddpm-smoke", decision["version"])
    assert version.source == f"models:/{model.model_id}" and version.run_id == run.info.run_id
    registered = json.loads(model.tags["mlflow.modelVersions"])
    assert [(v["name"], str(v["version"])) for v in registered] == [("ddpm-smoke", decision["version"])]


def test_checkpoint_artifact_loads_and_samples(server, runs, tmp_path):
    _, results, _ = runs
    record = results[0][1]
    uri = f"runs:/{record['run_id']}/checkpoints/last.ckpt"
    path = mlflow.artifacts.download_artifacts(uri, dst_path=tmp_path, tracking_uri=server)
    module = DiffusionModule.from_checkpoint(path)
    images = generate.sample(module.ema, generate.plan(module.config, "dpmpp_2m", 5), 4, seed=0)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()


def test_registry_keeps_champion_on_worse_and_moves_it_on_better(server, runs):
    _, results, _ = runs
    (_, _, first, _), (_, _, worse, _), (_, _, better, _) = results
    assert first["alias"] == "champion" and first["promoted"] and first["reason"] == "no champion yet"
    assert worse["fid"] > first["fid"], "2 training steps must score worse than 24"
    assert worse["alias"] == "challenger" and not worse["promoted"]
    assert better["fid"] < first["fid"], "150 training steps must score better than 24"
    assert better["alias"] == "champion" and better["promoted"]
    client = MlflowClient(server)
    assert client.get_model_version_by_alias("ddpm-smoke", "champion").version == better["version"]
    assert len({first["version"], worse["version"], better["version"]}) == 3
    # the promotion is idempotent: asking again changes nothing
    assert registry.promote(server, "ddpm-smoke", better["version"])["alias"] == "champion"
    assert registry.promote(server, "ddpm-smoke", worse["version"])["alias"] == "challenger"


def test_search_runs_orders_runs_by_fid(server, runs):
    _, results, _ = runs
    key = "fid/" + "_".join(str(results[0][3][k]) for k in ("sampler", "steps"))
    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("smoke")
    found = client.search_runs([experiment.experiment_id], order_by=[f"metrics.`{key}` ASC"])
    by_fid = [r.info.run_id for r in found]
    expected = [r[1]["run_id"] for r in sorted(results, key=lambda r: r[3]["fid"])]
    assert by_fid == expected


def test_make_sample_draws_from_the_champion(server, runs):
    project, results, _ = runs
    out = project / "outputs" / "from_champion"
    result = tracked([sys.executable, "-m", "pipeline.sample", "--model", "champion", "--out", str(out),
                      "--n", "9", "--quiet"], project, server)  # fmt: skip
    assert "models:/ddpm-smoke@champion" in result.stdout
    assert (out / "samples.npz").is_file() and json.loads((out / "meta.json").read_text())["n"] == 9

    def draw(model: str, name: str) -> np.ndarray:
        folder = project / "outputs" / name
        tracked([sys.executable, "-m", "pipeline.sample", "--model", model, "--out", str(folder), "--n", "9",
                 "--seed", "3", "--quiet"], project, server)  # fmt: skip
        with np.load(folder / "samples.npz") as f:
            return f["arr_0"]

    client = MlflowClient(server)
    champion = client.get_model_version_by_alias("ddpm-smoke", "champion").version
    others = [v.version for v in client.search_model_versions("name='ddpm-smoke'") if v.version != champion]
    assert others, "the runs registered a non-champion version too"
    by_alias = draw("champion", "by_alias")
    assert np.array_equal(by_alias, draw(f"models:/ddpm-smoke/{champion}", "by_version")), "the champion's images"
    assert not np.array_equal(by_alias, draw(f"models:/ddpm-smoke/{others[0]}", "other")), "another model's differ"


def test_rerunning_only_evaluate_updates_the_same_run(server, runs):
    project, results, _ = runs
    record = results[-1][1]
    set_params(project, evaluate={"kid_subsets": 7})
    result = tracked(["dvc", "repro", "evaluate"], project, server)
    assert ran_stages(result) == {"evaluate"}
    again, decision, _ = records(project)
    assert again["run_id"] == record["run_id"] and decision["run_id"] == record["run_id"]
    client = MlflowClient(server)
    logged = client.get_run(record["run_id"]).data
    # params are immutable in MLflow: the value the run started with stays, the re-run's value is a tag
    assert logged.params["evaluate.kid_subsets"] == "100" and logged.tags["latest.evaluate.kid_subsets"] == "7"


def test_unreachable_server_fails_before_training(runs):
    project, _, _ = runs
    before = (project / "outputs" / "train" / "last.ckpt").stat().st_mtime_ns
    uri = f"http://127.0.0.1:{free_port()}"
    result = tracked([sys.executable, "-m", "pipeline.train"], project, uri, check=False)
    assert result.returncode == 2
    assert f"error: MLflow tracking server {uri} is not reachable" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (project / "outputs" / "train" / "last.ckpt").stat().st_mtime_ns == before


def test_server_outage_during_training_buffers_and_sends_the_metrics(server, runs):
    """The server stopped while the longer run's train stage ran and came back: its loss curve has no gap."""
    _, results, (run_id, output) = runs
    assert "buffering metrics" in output and "buffered metrics sent" in output
    assert results[2][1]["run_id"] == run_id, "the run open before the outage is the one recorded"
    client = MlflowClient(server)
    earlier = {results[0][1]["run_id"], results[1][1]["run_id"]}
    assert [r for r in only_run(client, "smoke") if r not in earlier] == [run_id], "no second run after the outage"
    steps = sorted({m.step for m in client.get_metric_history(run_id, "train/loss")})
    assert steps[-1] >= 145 and all(b - a == 5 for a, b in zip(steps, steps[1:])), steps
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "data/model.pt" in logged_model_files(client, run_id)


def test_ddp_training_logs_one_run_from_rank_zero(smoke_repro, tmp_path):
    """A 2-process DDP train stage (CPU, gloo) into the embedded store: one run, one curve."""
    project = clone_project(smoke_repro[0], tmp_path / "project")  # prepared data; no MLflow store
    set_params(project, tracking={"experiment": "ddp"})
    ddp = {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "precision": "32-true"}
    set_params(project, train={"max_steps": 6, "log_every": 2, "val_every": 6, "warmup_steps": 2, **ddp})
    trained = run([sys.executable, "-m", "pipeline.train"], project)
    log = trained.stdout + trained.stderr
    assert "MEMBER: 2/2" in log and "Starting with 2 processes" in log, "two ranks trained"
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddp")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert len(steps) == len(set(steps)) >= 2  # rank 1 logged nothing: no step twice
    assert json.loads((project / "outputs/train/run.json").read_text())["run_id"] == runs[0].info.run_id
