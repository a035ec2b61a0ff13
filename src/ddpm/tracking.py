"""MLflow tracking of a pipeline execution: one run shared by the stages, its params, metrics and artifacts.

The train stage opens the run and writes its id to a small file (``outputs/train/run.json``, a DVC output);
the sample, evaluate and sweep stages reopen that run, so re-running only ``evaluate`` updates the same run.
Runs go to ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded local store: ``mlflow.db``
(SQLite) and ``mlartifacts/`` in the project root. The model registry is :mod:`ddpm.registry`; training
streams its metrics through :class:`ddpm.logger.BufferedMLFlowLogger`. MLflow is imported on first use.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ddpm.config import TrackingConfig

LOCAL_UI = "http://127.0.0.1:5000"  # where `make ui` serves the local store


class TrackingError(ValueError):
    """The configured tracking store cannot be used (unreachable server, unknown run)."""


def project_root() -> Path:
    """The DVC project root: ``$DVC_ROOT`` inside ``dvc exp run`` executors (which may run in a temp copy)."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def resolve_uri(cfg: TrackingConfig) -> str:
    """The tracking URI: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the local SQLite store."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def is_local(uri: str) -> bool:
    """True for the embedded store (SQLite file or a folder), False for a tracking server."""
    return not uri.startswith(("http://", "https://", "databricks"))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with one clear line when a tracking server does not answer its ``/health`` endpoint."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = str(getattr(e, "reason", e))
    raise TrackingError(
        f"MLflow tracking server {uri} is not reachable ({reason}); start it, point MLFLOW_TRACKING_URI "
        "or tracking.uri at a running server, or set tracking.enabled: false"
    )


def client(uri: str):
    """An ``MlflowClient`` for ``uri`` (imported lazily: MLflow is slow to import)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def flatten(sections: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": "0.001"}`` (lists stay one value)."""
    flat: dict[str, str] = {}
    for key, value in sections.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | bool) or value is None else str(value)
    return flat


def run_tags(dataset: str, data_hash: str) -> dict[str, str]:
    """Tags that tie a run to its code, DVC experiment, data and machine."""
    tags = {
        "dataset": dataset,
        "dataset.sha256": data_hash,
        "host": socket.gethostname(),
        "device": device_name(),
    }
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=project_root()
        )
        if commit.returncode == 0:
            tags["git.commit"] = commit.stdout.strip()
    except OSError:
        pass
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    return tags


def device_name() -> str:
    """``cuda: <GPU name> x<count>`` or ``cpu: <processor>``."""
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Where the run is shown: the server's UI, or the local UI that ``make ui`` starts."""
    base = LOCAL_UI if is_local(uri) else uri.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def start_run(
    cfg: TrackingConfig, params: Mapping[str, Any], tags: Mapping[str, str], run_name: str | None = None
) -> dict[str, Any]:
    """Create the pipeline execution's run (experiment created if needed); return the ``run.json`` record."""
    uri = resolve_uri(cfg)
    check_reachable(uri)
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(cfg.experiment)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        location = (project_root() / "mlartifacts").as_uri() if is_local(uri) else None
        experiment_id = mlflow_client.create_experiment(cfg.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    name = run_name or os.environ.get("DVC_EXP_NAME") or None
    run = mlflow_client.create_run(experiment_id, tags=dict(tags), run_name=name)
    log_params(mlflow_client, run.info.run_id, flatten(params))
    return {
        "enabled": True,
        "tracking_uri": uri,
        "experiment_id": experiment_id,
        "run_id": run.info.run_id,
        "run_url": run_url(uri, experiment_id, run.info.run_id),
    }


def log_params(mlflow_client, run_id: str, params: Mapping[str, str]) -> None:
    """Log params in batches of 100 (MLflow's limit); values are cut to MLflow's 6000 characters."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[i : i + 100])


def read_run(path: str | Path) -> dict[str, Any]:
    """The ``run.json`` record written by the train stage (``{"enabled": false}`` when tracking is off)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tracking record not found: {path} (run the train stage first)")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or "enabled" not in record:
        raise ValueError(f"{path}: not a tracking record (needs 'enabled')")
    if record["enabled"] and not {"tracking_uri", "run_id", "experiment_id"} <= record.keys():
        raise ValueError(f"{path}: tracking record lacks tracking_uri, experiment_id or run_id")
    return record


class Run:
    """A handle on an existing run for the later stages: metrics, tags, params and artifacts."""

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.record = dict(record)
        self.uri, self.run_id = record["tracking_uri"], record["run_id"]
        check_reachable(self.uri)
        self.client = client(self.uri)
        try:
            self.client.get_run(self.run_id)
        except Exception as e:  # MlflowException: the store does not know the run
            raise TrackingError(
                f"MLflow run {self.run_id} not found at {self.uri} ({str(e).splitlines()[0]}); re-run the train stage"
            ) from None

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_new_params(self, params: Mapping[str, str]) -> None:
        """Log params the run does not have yet; a changed value (a re-run stage) goes to a ``latest.`` tag."""
        have = self.client.get_run(self.run_id).data.params
        new = {k: v for k, v in params.items() if k not in have}
        changed = {f"latest.{k}": v for k, v in params.items() if k in have and have[k] != v}
        if new:
            log_params(self.client, self.run_id, new)
        if changed:
            self.set_tags(changed)

    def log_artifacts(self, files: Iterable[str | Path], artifact_path: str) -> None:
        for f in files:
            if Path(f).is_file():
                self.client.log_artifact(self.run_id, str(f), artifact_path)


def metric_key(name: str, sampler: str, steps: int) -> str:
    """``fid/ddim_50``: a metric name that carries the sampler and its steps."""
    return f"{name}/{sampler}_{steps}"


def loss_plot(curves_csv: str | Path, png: str | Path) -> None:
    """Draw the loss (log scale) and lr curves of ``curves.csv`` into a PNG for the run's artifacts."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(curves_csv, newline="") as f:
        rows = [(int(r["step"]), float(r["loss"]), float(r["lr"])) for r in csv.DictReader(f)]
    steps, loss, lr = zip(*rows) if rows else ((), (), ())
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(9, 3.2), constrained_layout=True)
    ax_loss.plot(steps, loss)
    ax_loss.set(xlabel="step", ylabel="train loss", yscale="log", title="loss")
    ax_lr.plot(steps, lr, color="tab:orange")
    ax_lr.set(xlabel="step", ylabel="lr", title="lr_scheduler")
    fig.savefig(png, dpi=100)
    plt.close(fig)
