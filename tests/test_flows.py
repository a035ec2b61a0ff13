"""Prefect flows against a real Prefect server (prefect_test_harness) and a real DVC project.

The project is a temp git repo copy of this one on a shrunk smoke configuration; its DVC runs are shared
by the tests of this module (retrain, then nothing to do, a retried failure, a stage that always fails, a
timed-out run, an experiment grid, a preempted run). A transient failure and a preemption are injected by
running the flows' DVC through ``tests/fault_dvc.py``; the permanent failure is a train stage that diverges.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from pipeline import dvc_runner, flows, params
from pipeline import overrides as dotted
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler

from ddpm.config import ConfigError
from test_pipeline import copy_project, digest, run

pytestmark = pytest.mark.slow

# On top of configs/smoke.yaml: the whole pipeline in ~1 min of mostly process start-up on 2 cores.
SHRINK = {
    "featurizer.epochs": 1,
    "train.max_steps": 20,
    "train.val_every": 10,
    "sample.n": 64,
    "sample.batch_size": 64,
    "evaluate.batch_size": 64,
    "evaluate.kid_subset_size": 32,
    "evaluate.kid_subsets": 10,
    "sweep.runs": ["euler-5"],
    "sweep.n": 64,
    "tracking.enabled": False,  # tracking has its own tests; the promote step runs against a real server below
}
ALL_STAGES = [
    *("prepare", "featurizer", "train", "ema", "sample", "evaluate"),
    *("sweep@euler-5", "sweep_report", "guidance"),
]
FAST = {"retry_delay_seconds": 0}
FAULT_DVC = Path(__file__).resolve().parent / "fault_dvc.py"


@pytest.fixture(scope="module")
def shrunk_params(smoke_params) -> dict:
    """The project's params: the smoke configuration with SHRINK applied (what `pipeline.overrides --apply` does)."""
    shrunk = dotted.merge(yaml.safe_load(smoke_params), SHRINK)
    params.validate(shrunk)
    return shrunk


@pytest.fixture(scope="module")
def project(shrunk_params, tmp_path_factory) -> Path:
    return copy_project(tmp_path_factory.mktemp("flows"), yaml.safe_dump(shrunk_params, sort_keys=False))


@pytest.fixture(scope="module")
def retrained(prefect_server, project):
    """The first retrain (runs the whole pipeline) and a second one right after it (nothing to do)."""
    first = flows.retrain(project=str(project), **FAST, return_state=True)
    second = flows.retrain(project=str(project), **FAST, return_state=True)
    return first, second


def commit(root: Path, message: str) -> None:
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], root)


def inject(monkeypatch, fault: str, marker: Path) -> None:
    """Run the flows' DVC through tests/fault_dvc.py: one ``fault`` (fail, preempt) while ``marker`` exists."""
    marker.touch()
    monkeypatch.setattr(dvc_runner, "DVC", (sys.executable, str(FAULT_DVC), fault, str(marker)))


def flow_run_id(state) -> UUID:
    return state.state_details.flow_run_id


def task_runs(state) -> dict[str, list]:
    """Task runs of the flow run that ended in ``state``, by task name."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id(state)])))
    by_task: dict[str, list] = {}
    for r in runs:
        by_task.setdefault(r.name.rsplit("-", 1)[0], []).append(r)
    return by_task


def logs(state) -> str:
    """Every log line of the flow run that ended in ``state`` (flushed to the server first)."""
    APILogHandler().flush()
    lines, page = [], 200
    with get_client(sync_client=True) as client:
        while True:
            batch = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id(state)])), limit=page, offset=len(lines)
            )
            lines += [entry.message for entry in batch]
            if len(batch) < page:
                return "\n".join(lines)


def artifact(key: str, state) -> str:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id(state)])),
        )
    assert len(found) == 1, found
    return found[0].data


def workspace_state(root: Path) -> dict[str, str]:
    """Digests of the outputs, params.yaml and dvc.lock."""
    return {**digest(root / "outputs"), **{name: (root / name).read_text() for name in ("params.yaml", "dvc.lock")}}


def outputs_but_resume(root: Path) -> dict[str, str]:
    """Digests of the outputs but a resume checkpoint (a failed or interrupted train stage may leave one)."""
    return {k: v for k, v in digest(root / "outputs").items() if k != "train/resume.ckpt"}


def failed_attempts(state) -> int:
    """How many times the flow's run-pipeline task ran, checked to have failed every time."""
    assert state.is_failed()
    (attempt,) = task_runs(state)["run-pipeline"]
    assert attempt.state.is_failed()
    return attempt.run_count


def read_params(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def test_bad_parameters_are_rejected_before_any_work(prefect_server, project):
    before, params_text = digest(project), (project / "params.yaml").read_text()
    where = str(project)
    cases = [
        (dict(retries=-1), "retrain.retries=-1: Input should be greater than or equal to 0"),
        (dict(timeout_seconds=0), "retrain.timeout_seconds=0: Input should be greater than 0"),
        (dict(overrides={"train.lr": -1}), "train.lr=-1: Input should be greater than 0"),
        (dict(overrides={"lr": 0.1}), "retrain.overrides: keys must look like section.key, got ['lr']"),
        (dict(overrides={"train.nope": 1}), "train.nope: unknown key; allowed keys:"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError) as e:
            flows.retrain(project=where, **kwargs)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^retrain.project='/no/such/dir': expected a DVC project folder"):
        flows.retrain(project="/no/such/dir")
    with pytest.raises(ConfigError, match=r"^experiment_grid.grid=.*: no values for \['sample.steps'\]$"):
        flows.experiment_grid(grid={"sample.steps": []}, project=where)
    with pytest.raises(ConfigError, match=r"^experiment_grid.grid: keys must look like section.key, got \['steps'\]$"):
        flows.experiment_grid(grid={"steps": [5]}, project=where)
    with pytest.raises(ConfigError, match=r"^sample.n=0: "):
        flows.experiment_grid(grid={"sample.steps": [5], "sample.n": [64, 0]}, project=where)
    state = flows.retrain(project=where, overrides={"train.lr": -1}, return_state=True)
    assert state.is_failed() and "train.lr=-1" in state.message
    assert task_runs(state) == {}, "no task ran"
    assert digest(project) == before and (project / "params.yaml").read_text() == params_text


def test_retrain_runs_the_pipeline_end_to_end(retrained, project):
    first, _ = retrained
    assert first.is_completed(), first.message
    summary = first.result()
    assert summary["ran"] and summary["stages"] == ALL_STAGES and summary["command"] == "dvc repro"
    evaluation = json.loads((project / "outputs" / "metrics" / "evaluate.json").read_text())
    assert summary["fid"] == evaluation["fid"] > 0
    assert summary["promoted"] is None and summary["run_url"] is None  # tracking off
    assert "stage train" in summary["changes"]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id(first))
    assert flow_run.state.is_completed() and flow_run.parameters["project"] == str(project)
    tasks = task_runs(first)
    assert set(tasks) == {"check-changes", "run-pipeline", "read-metrics", "promote"}
    assert all(len(runs) == 1 and runs[0].state.is_completed() for runs in tasks.values())
    text = logs(first)
    assert "Running stage 'train'" in text and summary["message"] in text
    table = artifact("retrain-summary", first)
    assert f"| FID | {summary['fid']:.4f} |" in table and "| promoted | tracking off |" in table


def test_retrain_with_nothing_changed_runs_no_stage(retrained):
    _, second = retrained
    assert second.is_completed(), second.message
    summary = second.result()
    assert not summary["ran"] and summary["stages"] == [] and summary["changes"] == []
    assert summary["message"].startswith("retrain: nothing changed, no DVC stage ran; FID")
    assert summary["fid"] == retrained[0].result()["fid"]
    assert "run-pipeline" not in task_runs(second)
    assert "nothing changed, no DVC stage ran" in logs(second)


def test_tracking_off_logs_nothing(retrained, project):
    """The first retrain ran every stage (train, `sample --track`, evaluate, ...) with tracking off (SHRINK)."""
    assert retrained[0].is_completed(), retrained[0].message
    assert json.loads((project / "outputs/train/run.json").read_text()) == {"enabled": False}
    assert (project / "outputs/samples/samples.npz").is_file()
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()


def test_transient_failure_is_retried(retrained, project, tmp_path, monkeypatch):
    marker = tmp_path / "fail-once"
    inject(monkeypatch, "fail", marker)
    state = flows.retrain(project=str(project), overrides={"sample.steps": 5}, retries=2, **FAST, return_state=True)
    assert state.is_completed(), state.message
    assert not marker.exists()
    summary = state.result()
    assert summary["stages"] == ["sample", "evaluate"], "only what the override touches runs"
    assert summary["command"] == "dvc exp run -S sample.steps=5" and summary["experiment"]
    assert summary["changes"] == ["param sample.steps: 10 -> 5"]
    (attempt,) = task_runs(state)["run-pipeline"]
    assert attempt.state.is_completed() and attempt.run_count == 2
    assert "injected transient failure" in logs(state)
    assert read_params(project)["sample"]["steps"] == 5, "dvc exp run leaves the experiment in the workspace"


def test_permanent_failure_fails_the_flow_and_leaves_outputs_whole(retrained, project):
    """A learning rate that makes the loss diverge: the train stage fails on every attempt (its one-line error in
    the flow's log); params.yaml and the outputs stay as they were, and DVC has nothing new to record."""
    outputs, params_text = outputs_but_resume(project), (project / "params.yaml").read_text()
    overrides = {"train.lr": 1e20, "train.checkpoint_every": 1}
    state = flows.retrain(project=str(project), overrides=overrides, retries=1, **FAST, return_state=True)
    assert failed_attempts(state) == 2
    text = logs(state)
    stage_errors = re.findall(r"^error: loss is (?:nan|inf) at optimizer step \d+; training stopped", text, re.M)
    assert len(stage_errors) == 2, text
    assert "restored params.yaml as it was before the failed run" in text
    assert (project / "params.yaml").read_text() == params_text
    assert outputs_but_resume(project) == outputs, "no half outputs: the previous ones stay, no temp files"
    (project / "outputs/train/resume.ckpt").unlink()  # the failed run's last checkpoint (step 1)
    assert json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], project).stdout) == {}


def test_an_attempt_past_its_timeout_is_interrupted_and_leaves_outputs_whole(retrained, project):
    outputs, params_text = outputs_but_resume(project), (project / "params.yaml").read_text()
    changed = read_params(project)
    changed["train"]["seed"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    try:
        state = flows.retrain(project=str(project), retries=1, timeout_seconds=3, **FAST, return_state=True)
        status = json.loads(run([sys.executable, "-m", "dvc", "status", "--json"], project).stdout)
    finally:
        (project / "params.yaml").write_text(params_text)
    assert failed_attempts(state) == 2 and "exceeded timeout of 3" in logs(state)
    assert outputs_but_resume(project) == outputs, "no half outputs: the previous ones stay, no temp files"
    assert "train" in status, "DVC recorded nothing for the interrupted stage"


def test_experiment_grid_runs_dvc_experiments_and_reports_the_best(retrained, project, shrunk_params):
    """From a workspace it sets up itself: the first retrain's params with sample.steps = 5, reproduced (the
    stages' run cache restores what the first retrain made) and committed."""
    start = dotted.merge(shrunk_params, {"sample.steps": 5})
    (project / "params.yaml").write_text(yaml.safe_dump(start, sort_keys=False))
    (project / "outputs/train/resume.ckpt").unlink(missing_ok=True)
    run([sys.executable, "-m", "dvc", "repro"], project)
    commit(project, "pipeline outputs")  # experiments start from the last commit: dvc.lock must be in it
    workspace = workspace_state(project)
    state = flows.experiment_grid(grid={"sample.steps": [5, 10]}, project=str(project), **FAST, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert [r["overrides"] for r in result["runs"]] == [{"sample.steps": 5}, {"sample.steps": 10}]
    assert result["best"] == min(result["runs"], key=lambda r: r["fid"]) and not result["failed"]
    # seeded: each point reproduces the FID of the same steps in the workspace (5, set up above; 10, the first retrain)
    steps5 = json.loads((project / "outputs" / "metrics" / "evaluate.json").read_text())["fid"]
    assert [r["fid"] for r in result["runs"]] == pytest.approx([steps5, retrained[0].result()["fid"]])
    assert set(re.findall(r"Running stage '([^']+)'", logs(state))) == {"sample", "evaluate"}, "only what steps touch"
    assert workspace_state(project) == workspace, "experiments run in temp copies; the workspace is untouched"
    shown = run([sys.executable, "-m", "dvc", "exp", "show", "--json"], project).stdout
    assert all(r["experiment"] in shown for r in result["runs"])
    assert f"best FID {result['best']['fid']:.4f}" in artifact("experiment-grid-summary", state)


def test_promote_applies_the_champion_rule_on_a_real_registry(prefect_server, tmp_path):
    """The flow's promote step against a real MLflow server: it reads the records the stages write, the first
    version becomes champion, a worse one challenger, and the summary says so."""
    from mlflow.tracking import MlflowClient

    from ddpm import tracking
    from test_tracking import Server

    @flow
    def promote_only() -> dict:
        return flows.promote(tmp_path)

    name, server = "ddpm-promote", Server(tmp_path / "mlflow")
    try:
        client = MlflowClient(server.uri)
        experiment = client.create_experiment("promote")
        client.create_registered_model(name)
        decisions, runs = [], []
        for fid in (2.0, 3.0):
            run_id = client.create_run(experiment).info.run_id
            tags = {"fid": str(fid), "protocol": "classifier/1000"}
            version = client.create_model_version(name, f"runs:/{run_id}/model", run_id, tags=tags).version
            record = {"enabled": True, "tracking_uri": server.uri, "experiment_id": experiment, "run_id": run_id}
            registry = {"enabled": True, "model_name": name, "version": version, "alias": None, "promoted": None}
            for path, data in ((flows.RUN_RECORD, record), (flows.REGISTRY_RECORD, registry)):
                (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / path).write_text(json.dumps(data))
            decisions.append(promote_only())
            runs.append((run_id, version))
        champion = client.get_model_version_by_alias(name, "champion").version
        challenger = client.get_model_version_by_alias(name, "challenger").version
    finally:
        server.stop()
    (first_run, first), (_, second) = runs
    assert (champion, challenger) == (first, second)
    assert [d["version"] for d in decisions] == [first, second]
    assert decisions[0]["promoted"] is True and decisions[0]["reason"] == "no champion yet"
    assert decisions[1]["promoted"] is False and decisions[1]["alias"] == "challenger"
    assert decisions[1]["reason"] == "FID 3.0000 does not beat the champion's 2.0000"
    summary = flows.summarize([], None, {"evaluate": {"fid": 2.0, "kid": 0.1}}, decisions[0])
    assert summary["promoted"] is True
    assert summary["run_url"] == tracking.run_url(server.uri, experiment, first_run)
    assert summary["message"].endswith(f"; FID 2.0000; {name} v{first} -> champion")


def test_preempted_attempt_resumes_training_on_retry(retrained, project, tmp_path, monkeypatch):
    """The first attempt is interrupted after the train stage's first checkpoint; the retry resumes there."""
    marker = tmp_path / "preempt-once"
    inject(monkeypatch, "preempt", marker)
    overrides = {"train.max_steps": 60, "train.checkpoint_every": 10}
    state = flows.retrain(project=str(project), overrides=overrides, retries=1, **FAST, return_state=True)
    assert state.is_completed(), state.message
    assert not marker.exists()
    (attempt,) = task_runs(state)["run-pipeline"]
    assert attempt.run_count == 2
    text = logs(state)
    stopped = re.search(r"stopped by SIGTERM at step (\d+)", text)
    resumed = re.search(r"resuming from \S*resume.ckpt at step (\d+)", text)
    assert stopped and resumed, text[-3000:]
    assert 10 <= int(resumed.group(1)) <= int(stopped.group(1)) < 60
    assert json.loads((project / "outputs/metrics/train.json").read_text())["steps"] == 60
    assert not (project / "outputs/train/resume.ckpt").exists(), "a completed run removes its checkpoint"
