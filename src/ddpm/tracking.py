"""MLflow tracking of a pipeline execution: one run shared by the stages, its params, metrics and artifacts.

The train stage opens the run and writes its id to a small file (``outputs/train/run.json``, a DVC output);
the sample, evaluate and sweep stages reopen that run, so re-running only ``evaluate`` updates the same run.
Runs go to ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded local store: ``mlflow.db``
(SQLite) and ``mlartifacts/`` in the project root. The model registry is :mod:`ddpm.registry`; training
streams its metrics through :class:`ddpm.logger.BufferedMLFlowLogger`. MLflow is imported on first use.

The run follows MLflow 3's conventions, so the UI shows it as a model training run: the experiment carries
the ``mlflow.experimentKind`` tag of the *Machine learning* view, the run MLflow's ``mlflow.source.*`` system
tags (entry point, git commit), the data splits as dataset inputs (name, content digest, split), and the EMA
model as the run's *Logged model* (:func:`Run.log_model`), to which the evaluation metrics are linked.
"""

from __future__ import annotations

import getpass
import json
import os
import platform
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ddpm.config import TrackingConfig

LOCAL_UI = "http://127.0.0.1:5000"  # where `make ui` serves the local store
# MLflow 3's experiment kind (the UI's ExperimentKind): the classic model training view, not the GenAI one
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
LOGGED_MODEL = "model"  # the name of the run's Logged model (the exported EMA model)
MODEL_LOADER = "ddpm.mlflow_model"  # the pyfunc loader_module that the Logged model's MLmodel names
DIGEST_CHARS = 16  # a dataset digest: the first hex digits of the split's SHA-256 (MLflow keeps at most 36)


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


def check_server(uri: str) -> None:
    """Before any work: the tracking server answers (``/health``, which needs no login) and takes our
    credentials (one cheap authenticated call); otherwise one line naming the server and the user."""
    if is_local(uri):
        return
    check_reachable(uri)
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as e:  # MlflowException: 401, 403, or a server error that outlasted the client's retries
        raise refusal(e, uri) or TrackingError(f"MLflow tracking server {uri}: {str(e).splitlines()[0]}") from None


def refusal(error: Exception, uri: str, action: str = "use the tracking API") -> TrackingError | None:
    """The one-line error for a server that refused our credentials (401) or our permission (403), else None.

    It names the user (``$MLFLOW_TRACKING_USERNAME`` or MLflow's credentials file), never the password.
    """
    from mlflow.utils.credentials import read_mlflow_creds

    code = getattr(error, "error_code", None)
    user = read_mlflow_creds().username
    if code == "UNAUTHENTICATED":
        who = f"the credentials of user {user!r}" if user else "an unauthenticated request (no user set)"
        return TrackingError(
            f"MLflow tracking server {uri} refused {who} (HTTP 401); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD to an account of that server"
        )
    if code == "PERMISSION_DENIED":
        return TrackingError(
            f"MLflow user {user!r} lacks permission to {action} on {uri} (HTTP 403); ask the server's admin for "
            "it, or set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account that has it"
        )
    return None


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


def run_tags(dataset: str, data_hash: str, entry_point: str) -> dict[str, str]:
    """Tags that tie a run to its code (MLflow's source tags and ``git.commit``), DVC experiment, data and machine."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    tags = {
        **source_tags(entry_point),
        "dataset": dataset,
        "dataset.sha256": data_hash,
        "host": socket.gethostname(),
        "device": device_name(),
    }
    if MLFLOW_GIT_COMMIT in tags:
        tags["git.commit"] = tags[MLFLOW_GIT_COMMIT]
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    return tags


def source_tags(entry_point: str) -> dict[str, str]:
    """MLflow's system tags of a run's source, which the UI's *Source*, *Version* and *User* columns show:
    the entry point (``pipeline.train``), ``LOCAL``, the user, and the git commit, branch and remote (its
    credentials stripped) of the project."""
    from mlflow.entities import SourceType
    from mlflow.utils import git_utils, mlflow_tags
    from mlflow.utils.credentials import read_mlflow_creds

    root = str(project_root())
    tags = {
        mlflow_tags.MLFLOW_SOURCE_NAME: entry_point,
        mlflow_tags.MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL),
        mlflow_tags.MLFLOW_USER: read_mlflow_creds().username or getpass.getuser(),
        mlflow_tags.MLFLOW_GIT_COMMIT: git_utils.get_git_commit(root),
        mlflow_tags.MLFLOW_GIT_BRANCH: git_utils.get_git_branch(root),
        mlflow_tags.MLFLOW_GIT_REPO_URL: git_utils.get_git_repo_url(root),
    }
    return {key: value for key, value in tags.items() if value}


def dataset_input(name: str, context: str, images, labels, sha256: str, source: str | Path):
    """A run's MLflow dataset input: a split's arrays (their schema and size), its content digest, its file,
    and its context (``train``, ``test``) that the UI shows beside the name."""
    import mlflow.data
    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    # the local file source by type: MLflow registers that class under two schemes, and resolving a path
    # through its registry warns that the path "can be interpreted in multiple ways"
    local = next(kind for kind in get_registered_sources() if kind._get_source_type() == "local")
    dataset = mlflow.data.from_numpy(
        images, source=local(str(source)), targets=labels, name=name, digest=sha256[:DIGEST_CHARS]
    )
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def device_name() -> str:
    """``cuda: <GPU name> x<count>`` or ``cpu: <processor>``."""
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Where the run is shown: the server's UI, or the local UI that ``make ui`` starts, in its Machine
    learning view (the UI's workflow switch, which MLflow 3.x defaults to GenAI)."""
    base = LOCAL_UI if is_local(uri) else uri.rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def start_run(
    cfg: TrackingConfig,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    run_name: str | None = None,
    datasets: Iterable[Any] = (),
) -> dict[str, Any]:
    """Create the pipeline execution's run (experiment created if needed) with its params, tags and dataset
    inputs (:func:`dataset_input`); return the ``run.json`` record. A server that refuses our credentials or
    permission fails here, before any training, with one line."""
    uri = resolve_uri(cfg)
    check_server(uri)
    mlflow_client = client(uri)
    try:
        experiment_id = model_training_experiment(mlflow_client, cfg.experiment, uri)
        name = run_name or os.environ.get("DVC_EXP_NAME") or None
        run = mlflow_client.create_run(experiment_id, tags=dict(tags), run_name=name)
    except Exception as e:  # MlflowException: a user who may read but not write
        if (error := refusal(e, uri, f"create runs in experiment {cfg.experiment!r}")) is None:
            raise
        raise error from None
    log_params(mlflow_client, run.info.run_id, flatten(params))
    if datasets := list(datasets):
        mlflow_client.log_inputs(run.info.run_id, datasets=datasets)
    return {
        "enabled": True,
        "tracking_uri": uri,
        "experiment_id": experiment_id,
        "run_id": run.info.run_id,
        "run_url": run_url(uri, experiment_id, run.info.run_id),
    }


def model_training_experiment(mlflow_client, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if needed; one without an experiment kind gets MLflow 3's
    *model training* kind, so the UI opens it in the Machine learning view (runs table), not the GenAI one."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        location = (project_root() / "mlartifacts").as_uri() if is_local(uri) else None
        tags = {EXPERIMENT_KIND_TAG: MODEL_TRAINING}
        return mlflow_client.create_experiment(name, artifact_location=location, tags=tags)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment.experiment_id


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
    """A handle on an existing run for the later stages: metrics, tags, params, artifacts and its Logged model."""

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.record = dict(record)
        self.uri, self.run_id = record["tracking_uri"], record["run_id"]
        check_server(self.uri)
        self.client = client(self.uri)
        try:
            self.client.get_run(self.run_id)
        except Exception as e:  # MlflowException: the store does not know the run, or we may not read it
            raise refusal(e, self.uri, f"read run {self.run_id}") or TrackingError(
                f"MLflow run {self.run_id} not found at {self.uri} ({str(e).splitlines()[0]}); re-run the train stage"
            ) from None

    def log_metrics(
        self, metrics: Mapping[str, float], step: int = 0, model_id: str | None = None, dataset: Any = None
    ) -> None:
        """Log ``metrics`` at ``step``; with ``model_id`` (and the ``dataset`` they were measured on) they are
        also the Logged model's metrics, shown on its page."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        on = {"dataset_name": dataset.name, "dataset_digest": dataset.digest} if dataset is not None else {}
        items = [Metric(k, float(v), now, step, model_id=model_id, **on) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def log_model(
        self, model_file: str | Path, step: int, name: str = LOGGED_MODEL, params: Mapping[str, Any] | None = None
    ) -> str:
        """Log the exported EMA model as a Logged model of the run at training step ``step``; return its id.
        ``name`` and the model's ``params`` tell models of one run apart in the UI's model list.

        An MLflow ``python_function`` model whose loader is :mod:`ddpm.mlflow_model` and whose data is the file
        itself (read with ``weights_only=True``): nothing pickled, no dependency inference (the requirements are
        given). MLflow links the run's metrics of ``step`` to it.
        """
        import mlflow

        with fluent_api_at(self.uri), mlflow.start_run(run_id=self.run_id):  # a model goes into the active run
            info = mlflow.pyfunc.log_model(
                name=name,
                params={k: str(v) for k, v in (params or {}).items()} or None,
                loader_module=MODEL_LOADER,
                data_path=str(model_file),
                pip_requirements=model_requirements(),
                step=step,
            )
        return info.model_id

    def logged_model_id(self) -> str:
        """The id of the run's Logged model (the latest step's, if the run logged several)."""
        outputs = self.client.get_run(self.run_id).outputs
        models = sorted(outputs.model_outputs if outputs else [], key=lambda m: m.step)
        if not models:
            raise TrackingError(f"MLflow run {self.run_id} at {self.uri} has no logged model; re-run the train stage")
        return models[-1].model_id

    def dataset(self, context: str) -> Any:
        """The run's dataset input of ``context`` (``train``, ``test``): an ``mlflow.entities.Dataset``, or None."""
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = self.client.get_run(self.run_id).inputs
        for found in inputs.dataset_inputs if inputs else []:
            if any(t.key == MLFLOW_DATASET_CONTEXT and t.value == context for t in found.tags):
                return found.dataset
        return None

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


@contextmanager
def fluent_api_at(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``mlflow.start_run``, ``mlflow.artifacts``) pointed at ``uri`` for the block only.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` to the process environment, which every
    later child process (a DVC stage, a worker) would inherit; the previous value is put back afterwards.
    """
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets both the global and the variable


def model_requirements() -> list[str]:
    """The pip requirements of the Logged model: this project and the torch and numpy it runs on."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("ddpm-pipeline", "torch", "numpy")]


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
