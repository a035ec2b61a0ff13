"""MLflow tracking of a pipeline execution: one run shared by the stages, artifacts, and the model registry.

The train stage opens the run and writes its id to a small file (``outputs/train/run.json``, a DVC output);
the sample, evaluate and sweep stages reopen that run, so re-running only ``evaluate`` updates the same run.
Runs go to ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded local store: ``mlflow.db``
(SQLite) and ``mlartifacts/`` in the project root.

The registry keeps one registered model per ``tracking.registered_model``; the evaluate stage adds the EMA
model of the run as a new version and moves the alias ``champion`` to it only when its FID beats the
current champion's under the same evaluation protocol; otherwise the version gets ``challenger``.
"""

from __future__ import annotations

import contextlib
import hashlib
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

from pydantic import Field
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only

from ddpm.config import Config

CHAMPION, CHALLENGER = "champion", "challenger"
# the evaluate result keys that define "the same protocol": FIDs are comparable only when these agree
PROTOCOL_KEYS = ("feature_network", "feature_weights_hash", "reference", "n_ref", "n_gen")
LOCAL_UI = "http://127.0.0.1:5000"  # where `make ui` serves the local store


class TrackingConfig(Config):
    """The ``tracking`` section: where MLflow runs go and what the registry calls the model."""

    enabled: bool = Field(True, description="log runs to MLflow; false = no tracking at all")
    uri: str | None = Field(
        None, description="tracking URI; null = $MLFLOW_TRACKING_URI, else the local store sqlite:///mlflow.db"
    )
    experiment: str = Field("ddpm-pipeline", min_length=1, description="MLflow experiment name")
    registered_model: str | None = Field(
        None, min_length=1, description="registry name of the EMA model; null = ddpm-<data.dataset>"
    )
    log_checkpoint: bool = Field(True, description="upload last.ckpt (resumable) beside the EMA model")
    wait_seconds: float = Field(
        300, ge=0, description="after training, wait this long for an unreachable server to send buffered metrics"
    )


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


def model_name(cfg: TrackingConfig, dataset: str) -> str:
    """The registered model's name: ``tracking.registered_model`` or ``ddpm-<dataset>``."""
    return cfg.registered_model or f"ddpm-{dataset}"


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
        import time

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


class BufferedMLFlowLogger(MLFlowLogger):
    """Lightning's ``MLFlowLogger`` that survives a tracking server outage during training.

    A metric batch the server does not take (connection refused, timeout) stays in a buffer, in order, and is
    sent with the next batch that gets through, so training never waits on the server and the run's curves
    have no gap once the server is back. ``flush(wait)`` sends what is left, retrying for up to ``wait``
    seconds, and raises a ``TrackingError`` naming the server and the number of unsent batches after that.
    Only rank 0 logs (Lightning's rank-zero guards).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: list[tuple[str, tuple]] = []
        self.warned = False

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.pending.append(("log_metrics", (dict(metrics), step)))
        self._send()

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        self.pending.append(("log_hyperparams", (params,)))
        self._send()

    @property
    def version(self) -> str | None:
        """The run id, without asking the server (checkpoints record it while the server may be down)."""
        return self._run_id if self._run_id is not None else super().version

    def _send(self) -> bool:
        """Send the buffer in order; False (and the rest kept) at the first failure."""
        with _fail_fast():
            while self.pending:
                name, args = self.pending[0]
                try:
                    getattr(MLFlowLogger, name)(self, *args)
                except Exception as e:  # the server is down: keep the batch, train on
                    if not self.warned:
                        print(f"tracking: {self._tracking_uri} unreachable ({_first_line(e)}); buffering metrics")
                        self.warned = True
                    return False
                self.pending.pop(0)
        if self.warned:
            print(f"tracking: {self._tracking_uri} reachable again; buffered metrics sent")
            self.warned = False
        return True

    def flush(self, wait: float) -> None:
        """Send the buffered metrics, retrying for up to ``wait`` seconds; TrackingError after that."""
        deadline = time.monotonic() + wait
        while not self._send():
            if time.monotonic() > deadline:
                raise TrackingError(
                    f"MLflow tracking server {self._tracking_uri} unreachable for {wait:.0f} s after training; "
                    f"{len(self.pending)} metric batch(es) unsent. The trained outputs are saved; "
                    "start the server and re-run, or set tracking.enabled: false"
                )
            time.sleep(min(5.0, max(0.5, wait / 20)))

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Mark the run terminated when everything is sent; otherwise leave it to the stage's ``flush``."""
        if self._send():
            with _fail_fast(), contextlib.suppress(Exception):
                super().finalize(status)


class _fail_fast:
    """Let MLflow's HTTP client fail at once (no retry back-off) while training is waiting on it."""

    KEYS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

    def __enter__(self) -> None:
        self.saved = {k: os.environ.get(k) for k in self.KEYS}
        os.environ.update(self.KEYS)

    def __exit__(self, *exc: Any) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def metric_key(name: str, sampler: str, steps: int) -> str:
    """``fid/ddim_50``: a metric name that carries the sampler and its steps."""
    return f"{name}/{sampler}_{steps}"


def protocol_of(result: Mapping[str, Any]) -> dict[str, str]:
    """The evaluation protocol of an evaluate result, and its short hash ``protocol``."""
    fields = {key: str(result[key]) for key in PROTOCOL_KEYS}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return {**fields, "protocol": digest}


def register(run: Run, name: str, result: Mapping[str, Any], artifact_path: str = "model") -> str:
    """Register the run's ``artifact_path`` as a new version of ``name``, tagged with FID and protocol.

    A run's evaluation under one protocol registers once: re-running evaluate with the same protocol and
    sampler updates that version's tags instead of adding a version.
    """
    from mlflow.exceptions import MlflowException

    tags = {
        "fid": repr(float(result["fid"])),
        "kid": repr(float(result["kid"])),
        "sampler": str(result.get("sampler")),
        "steps": str(result.get("steps")),
        **protocol_of(result),
    }
    try:
        run.client.get_registered_model(name)
    except MlflowException:
        run.client.create_registered_model(name, description="EMA denoisers of the ddpm-pipeline, by FID")
    for version in run.client.search_model_versions(f"name='{name}' and run_id='{run.run_id}'"):
        same = version.tags.get("protocol") == tags["protocol"] and version.tags.get("sampler") == tags["sampler"]
        if same and version.tags.get("steps") == tags["steps"]:
            for key, value in tags.items():
                run.client.set_model_version_tag(name, version.version, key, value)
            return str(version.version)
    source = f"{run.client.get_run(run.run_id).info.artifact_uri}/{artifact_path}"
    version = run.client.create_model_version(name, source, run_id=run.run_id, tags=tags)
    return str(version.version)


def promote(tracking_uri: str, model_name: str, version: str) -> dict[str, Any]:
    """Apply the champion rule to ``version`` (idempotent) and return the decision.

    ``champion`` moves to ``version`` only if there is no champion yet, or if the version's FID is lower
    than the champion's under the same protocol; otherwise ``challenger`` points to it.
    """
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    candidate = mlflow_client.get_model_version(model_name, str(version))
    fid = float(candidate.tags["fid"])
    try:
        champion = mlflow_client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        champion = None
    champion_fid = float(champion.tags["fid"]) if champion is not None else None
    if champion is None:
        promoted, reason = True, "no champion yet"
    elif str(champion.version) == str(version):
        promoted, reason = True, "already the champion"
    elif champion.tags.get("protocol") != candidate.tags.get("protocol"):
        promoted, reason = False, "evaluated under a different protocol than the champion"
    elif fid < champion_fid:
        promoted, reason = True, f"FID {fid:.4f} beats the champion's {champion_fid:.4f}"
    else:
        promoted, reason = False, f"FID {fid:.4f} does not beat the champion's {champion_fid:.4f}"
    alias = CHAMPION if promoted else CHALLENGER
    mlflow_client.set_registered_model_alias(model_name, alias, str(version))
    if promoted:
        try:  # the version that lost champion is no longer the one to compare against
            if mlflow_client.get_model_version_by_alias(model_name, CHALLENGER).version == str(version):
                mlflow_client.delete_registered_model_alias(model_name, CHALLENGER)
        except MlflowException:
            pass
    run = mlflow_client.get_run(candidate.run_id)
    return {
        "enabled": True,
        "model_name": model_name,
        "version": str(version),
        "alias": alias,
        "promoted": promoted,
        "reason": reason,
        "fid": fid,
        "champion_fid": champion_fid,
        "run_id": candidate.run_id,
        "run_url": run_url(tracking_uri, run.info.experiment_id, candidate.run_id),
    }


def download_model(uri: str, tracking_uri: str, dst: str | Path) -> Path:
    """Fetch an exported EMA model (``model.pt``) from ``models:/name@alias``, ``models:/name/3`` or ``runs:/id``.

    A ``runs:/<id>`` URI without a path means that run's ``model`` artifact folder.
    """
    import mlflow

    if uri.startswith("runs:/") and uri.count("/") == 1:
        uri = uri.rstrip("/") + "/model"
    check_reachable(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as e:  # MlflowException, OSError: name the URI and the store
        raise TrackingError(f"cannot fetch {uri} from {tracking_uri}: {str(e).splitlines()[0]}") from None
    found = [local] if local.is_file() else sorted(local.rglob("model.pt"))
    if not found:
        raise TrackingError(f"{uri} holds no model.pt")
    return found[0]


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
