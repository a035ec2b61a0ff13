"""Prefect flows over the DVC pipeline: scheduled ``retrain`` with promotion, and an ``experiment-grid``.

Prefect owns time (schedules, retries with backoff, timeouts, work pools); DVC owns what runs. Every pipeline
execution is a ``dvc repro`` or ``dvc exp run`` subprocess (:mod:`pipeline.dvc_runner`), so ``dvc.lock`` stays
the record and unchanged stages are never recomputed; no task uses Prefect's result caching or persistence.

``retrain`` runs its ``overrides`` over an optional ``profile``, an overrides file of the project such as
``configs/gpu.yaml`` (the nightly deployment's). Its tasks, in order: ``check-changes`` (``dvc status`` and the
overrides against params.yaml), ``run-pipeline`` (only when something changed or ``force``), ``read-metrics``,
``promote`` (the MLflow champion rule, through ``ddpm.registry.promote`` when tracking is on) and a summary:
logged, returned and published as the markdown artifact ``retrain-summary``.

``experiment-grid`` runs every combination of a grid of params as a DVC experiment, then reads their metrics
(``experiment-metrics``) and reports the best FID as the markdown artifact ``experiment-grid-summary``. On one
machine each point runs in a temp copy of the workspace (``run-experiment``), one after the other; with
``deployment`` (e.g. ``sweep-point/sweep-point``) each point is a run of that deployment on its work pool, so
the pool's workers run them side by side, and the grid gathers their experiments from git and the DVC remote.

``sweep-point`` is the worker's side of that: one point as ``dvc exp run -S ...`` in the worker's workspace
(prefect.yaml's pull step fetched it), the experiment pushed (``dvc exp push origin``), and its result
published as the table artifact ``sweep-point``. ``retrain`` with ``publish`` runs and pushes the same way.

    python -m pipeline.flows retrain [--force] [--profile F] [-S train.lr=3e-4 ...]  # one run now
    python -m pipeline.flows experiment-grid -G 'sample.steps=[10, 25]' [-G ...]    # a grid of DVC experiments

Deployments (the schedule, ``prefect.yaml``) are in :mod:`pipeline.deployments`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import Field, ValidationInfo, field_validator

from ddpm import registry
from ddpm.config import Config, ConfigError
from pipeline import dvc_runner, params, remote
from pipeline import overrides as dotted
from pipeline.dvc_runner import PipelineError
from pipeline.paths import METRICS, REGISTRY_RECORD, RUN_RECORD, TRAIN

NO_RESULT_CACHE = {"cache_policy": NO_CACHE, "persist_result": False}
RESUME = TRAIN / "resume.ckpt"  # an interrupted training's checkpoint (ddpm.checkpoints.RESUME; not a DVC output)
SNAPSHOTS_PARTIAL = TRAIN / "ema.partial"  # the EMA snapshots of the training in progress (ddpm.fit.SNAPSHOTS_PARTIAL)


# ---------------------------------------------------------------- flow options


class RunOptions(Config):
    """Where the flow runs DVC, and how hard it tries."""

    project: str = Field(".", description="the DVC project (a git repository root) to run in")
    retries: int = Field(2, ge=0, description="retries of a failed pipeline run")
    retry_delay_seconds: float = Field(60.0, ge=0, description="delay before the first retry; doubles on each retry")
    timeout_seconds: float | None = Field(
        6 * 3600.0, gt=0, description="limit of one attempt; DVC is interrupted when it expires (null = none)"
    )

    @field_validator("project")
    @classmethod
    def _dvc_project(cls, v: str) -> str:
        missing = [name for name in ("dvc.yaml", params.PARAMS.name) if not (Path(v) / name).is_file()]
        if missing:
            raise ValueError(f"expected a DVC project folder; {', '.join(missing)} not found there")
        return v

    @property
    def root(self) -> Path:
        return Path(self.project).resolve()

    def retry_options(self) -> dict[str, Any]:
        """``Task.with_options`` arguments: retries with exponential backoff and the timeout."""
        delays = [self.retry_delay_seconds * 2**i for i in range(self.retries)]
        return {"retries": self.retries, "retry_delay_seconds": delays or 0, "timeout_seconds": self.timeout_seconds}


class RetrainOptions(RunOptions):
    """Parameters of the ``retrain`` flow."""

    force: bool = Field(False, description="run the pipeline even when nothing changed (dvc repro --force)")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="section.key: value overrides, run as `dvc exp run -S`"
    )
    profile: str | None = Field(
        None, description="an overrides file in the project (e.g. configs/gpu.yaml), applied under `overrides`"
    )
    publish: bool = Field(
        False, description="run as a DVC experiment and push it: git's origin and the DVC remote (what a worker does)"
    )

    @field_validator("profile")
    @classmethod
    def _profile_file(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None or "project" not in info.data:  # no profile, or the project's own error says why
            return v
        root = Path(info.data["project"]).resolve()
        path = (root / v).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"outside the project {root}; allowed: a path in it, e.g. configs/gpu.yaml")
        if not path.is_file():
            raise ValueError(
                f"no such file in the project {root}; allowed: an overrides file in it, e.g. configs/gpu.yaml"
            )
        try:
            dotted.read(path)
        except ConfigError as e:
            raise ValueError(str(e).removeprefix(f"{path}: ")) from None
        return v

    def profile_overrides(self) -> dict[str, Any]:
        """The profile's section.key: value overrides (none without a profile)."""
        return dotted.read(self.root / self.profile) if self.profile else {}

    def points(self) -> list[dict[str, Any]]:
        """The one set of overrides the flow runs: the profile's, with ``overrides`` over them."""
        return [{**self.profile_overrides(), **self.overrides}]


class PointOptions(RetrainOptions):
    """Parameters of the ``sweep_point`` flow: one grid point, run and pushed as a DVC experiment."""

    retries: int = Field(0, ge=0, description="retries of a failed experiment")
    publish: bool = Field(True, description="push the experiment: git's origin and the DVC remote")


class GridOptions(RunOptions):
    """Parameters of the ``experiment_grid`` flow."""

    retries: int = Field(1, ge=0, description="retries of a failed experiment")
    grid: dict[str, list[Any]] = Field(description="section.key: [values]; every combination is one experiment")
    deployment: str | None = Field(
        None, description="run each point as a run of this deployment (flow/deployment) on its work pool; null = here"
    )

    @field_validator("grid")
    @classmethod
    def _values(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not v:
            raise ValueError("expected at least one section.key: [values]")
        empty = [key for key, values in v.items() if not values]
        if empty:
            raise ValueError(f"no values for {empty}")
        return v

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values, in order."""
        return [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())]


def options(cls: type[RunOptions], name: str, values: dict[str, Any]) -> Any:
    """Validate flow parameters, including the overrides against the project's params.yaml (one-line errors).

    ``values`` are the flow's arguments (its ``locals()`` before anything else is assigned).
    """
    opts = cls.from_dict(dict(values), name)
    field = "grid" if isinstance(opts, GridOptions) else "overrides"
    dotted.check_keys(getattr(opts, field), f"{name}.{field}")
    raw = params.read_yaml(opts.root / params.PARAMS)
    if isinstance(opts, RetrainOptions) and opts.profile:  # a profile validates over params.yaml on its own
        try:
            params.validate(dotted.merge(raw, opts.profile_overrides()))
        except ConfigError as e:
            raise ConfigError(f"{name}.profile={opts.profile!r}: {e}") from None
    for point in opts.points():
        params.validate(dotted.merge(raw, point))
    return opts


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def markdown_table(rows: Iterable[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"]
    return "\n".join(lines + [f"| {key} | {'' if value is None else value} |" for key, value in rows])


# ---------------------------------------------------------------- retrain


@task(name="check-changes", **NO_RESULT_CACHE)
def check_changes(root: Path, overrides: dict[str, Any]) -> list[str]:
    """What would make DVC run: stages ``dvc status`` reports, and overrides that differ from params.yaml."""
    changes = dvc_runner.changes(root, overrides)
    get_run_logger().info("changes: %s", "; ".join(changes) if changes else "none")
    return changes


def resume_key(root: Path, overrides: dict[str, Any]) -> str:
    """The shared store's name for the resume checkpoint of a run: its commit and overrides."""
    commit = dvc_runner.git_commit(root)
    return hashlib.sha256(json.dumps({"commit": commit, "overrides": overrides}, sort_keys=True).encode()).hexdigest()[
        :20
    ]


class ResumeSync:
    """While a run trains, copy its resume checkpoint to the shared store each time the train stage writes one
    (every ``train.checkpoint_every`` steps, atomically), and each EMA snapshot it writes
    (``train.ema_snapshot_every``), so a run on any worker can continue it with the snapshots made so far."""

    def __init__(self, root: Path, key: str, logger, interval: float = 1.0) -> None:
        self.root, self.key, self.logger, self.interval = root, key, logger, interval
        self.path = root / RESUME
        self.stop = threading.Event()
        self.seen: tuple[int, int] | None = self.state()
        self.snapshots: dict[str, tuple[int, int]] = {}  # those pushed: name -> (mtime_ns, size)
        self.thread = threading.Thread(target=self.loop, name="resume-sync", daemon=True)

    def state(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def sync(self) -> None:
        # snapshots first: a continuation finds every snapshot up to the step of the checkpoint it fetches
        pushed = remote.push_snapshots(self.root, self.root / SNAPSHOTS_PARTIAL, self.key, self.snapshots)
        if pushed:
            self.logger.info("EMA snapshots pushed to the shared store (%s): %s", self.key, ", ".join(pushed))
        now = self.state()
        if now is not None and now != self.seen:
            remote.push_resume(self.root, self.path, self.key)
            self.seen = now
            self.logger.info("resume checkpoint pushed to the shared store (%s)", self.key)

    def loop(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.sync()
            except Exception as e:  # a store outage: keep training, try again at the next checkpoint
                self.logger.warning("resume checkpoint not pushed: %s", e)

    def __enter__(self) -> ResumeSync:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


@task(name="run-pipeline", **NO_RESULT_CACHE)
def run_pipeline(
    root: Path, overrides: dict[str, Any], force: bool, as_experiment: bool = False, share_resume: bool = False
) -> dict[str, Any]:
    """``dvc repro`` (``dvc exp run -S ...`` with overrides or ``as_experiment``); a failed attempt leaves
    params.yaml as it was.

    ``share_resume`` (a worker's run): the resume checkpoint and the EMA snapshots go to the shared store as
    training writes them, and a run that finds a checkpoint there for its commit and overrides continues from it
    with those snapshots (the train stage checks that it belongs to the same params and data; another run's is
    ignored, and so are its snapshots)."""
    logger = get_run_logger()
    if not share_resume:
        return dvc_runner.repro(root, overrides, force, logger, as_experiment)
    key = resume_key(root, overrides)
    if not (root / RESUME).exists() and remote.pull_resume(root, key, root / RESUME):
        logger.info("resume checkpoint fetched from the shared store (%s): training continues from it", key)
        snapshots = remote.pull_snapshots(root, key, root / SNAPSHOTS_PARTIAL)
        if snapshots:
            logger.info("%d EMA snapshots fetched from the shared store (%s)", len(snapshots), key)
    with ResumeSync(root, key, logger):
        result = dvc_runner.repro(root, overrides, force, logger, as_experiment)
    remote.drop_resume(root, key)
    return result


@task(name="push-experiment", **NO_RESULT_CACHE)
def push_experiment(root: Path, name: str) -> str:
    """``dvc exp push --run-cache origin NAME``: the experiment for every teammate (``dvc exp pull origin NAME``)."""
    return dvc_runner.push_experiment(root, name, get_run_logger())


@task(name="read-metrics", **NO_RESULT_CACHE)
def read_metrics(root: Path) -> dict[str, dict[str, Any]]:
    """The pipeline's metrics files (``outputs/metrics/<stage>.json``) by stage."""
    metrics = {path.stem: json.loads(path.read_text()) for path in sorted((root / METRICS).glob("*.json"))}
    if "evaluate" not in metrics:
        raise FileNotFoundError(f"{root / METRICS / 'evaluate.json'} not found: the pipeline has not run yet")
    return metrics


@task(name="promote", **NO_RESULT_CACHE)
def promote(root: Path) -> dict[str, Any]:
    """Apply the champion rule to the version the evaluate stage registered (idempotent); no-op without tracking."""
    run = read_json(root / RUN_RECORD) or {"enabled": False}
    record = read_json(root / REGISTRY_RECORD) or {"enabled": False}
    if not record["enabled"]:
        reason = "tracking off" if not run["enabled"] else f"no registry record in {REGISTRY_RECORD}"
        get_run_logger().info("promotion skipped: %s", reason)
        return {"promoted": None, "reason": reason, "run_url": run.get("run_url")}
    decision = registry.promote(run["tracking_uri"], record["model_name"], str(record["version"]))
    get_run_logger().info(
        "model %s v%s is %s (%s)", decision["model_name"], decision["version"], decision["alias"], decision["reason"]
    )
    return decision


def summarize(changes: list[str], run: dict[str, Any] | None, metrics: dict, decision: dict) -> dict[str, Any]:
    """The retrain summary: what ran, the FID, the promotion and the MLflow run URL."""
    evaluation = metrics["evaluate"]
    summary = {
        "changes": changes,
        "ran": run is not None,
        "command": run["command"] if run else None,
        "stages": run["stages"] if run else [],
        "experiment": run["experiment"] if run else None,
        "pushed": run.get("pushed") if run else None,
        "fid": evaluation["fid"],
        "kid": evaluation.get("kid"),
        "promoted": decision["promoted"],
        "alias": decision.get("alias"),
        "model": f"{decision['model_name']} v{decision['version']}" if decision.get("model_name") else None,
        "promotion": decision.get("reason"),
        "run_url": decision.get("run_url"),
    }
    what = (
        f"ran {', '.join(summary['stages']) or 'no stage (all up to date)'} ({summary['command']})"
        if run
        else "nothing changed, no DVC stage ran"
    )
    promotion = decision["reason"] if decision["promoted"] is None else f"{summary['model']} -> {summary['alias']}"
    summary["message"] = f"retrain: {what}; FID {summary['fid']:.4f}; {promotion}"
    return summary


@flow(name="retrain", validate_parameters=False, persist_result=False)
def retrain(
    project: str = ".",
    force: bool = False,
    overrides: dict[str, Any] | None = None,
    retries: int = 2,
    retry_delay_seconds: float = 60.0,
    timeout_seconds: float | None = 6 * 3600.0,
    publish: bool = False,
    profile: str | None = None,
) -> dict[str, Any]:
    """Retrain when data or params changed (or when forced) through DVC, then promote the better model.

    ``profile`` (a file of the project, e.g. configs/gpu.yaml) sets overrides first; ``overrides`` win over it."""
    opts = options(RetrainOptions, "retrain", {**locals(), "overrides": overrides or {}})
    logger = get_run_logger()
    logger.info("workspace %s", opts.root)
    if opts.profile:
        logger.info("profile %s under the overrides %s", opts.profile, opts.overrides)
    (settings,) = opts.points()
    changes = check_changes(opts.root, settings)
    run = None
    if changes or opts.force:
        run_one = run_pipeline.with_options(**opts.retry_options())
        run = run_one(opts.root, settings, opts.force, opts.publish, opts.publish)
        if opts.publish and run["experiment"]:
            run["pushed"] = push_experiment(opts.root, run["experiment"])
    metrics = read_metrics(opts.root)
    decision = promote(opts.root)
    summary = summarize(changes, run, metrics, decision)
    logger.info(summary["message"])
    if summary["run_url"]:
        logger.info("MLflow run: %s", summary["run_url"])
    rows = [
        ("profile", opts.profile),
        ("changes", "<br>".join(changes) or "none"),
        ("DVC", summary["command"] or "nothing to run"),
        ("stages run", ", ".join(summary["stages"]) or "none"),
        ("pushed", summary["pushed"] and f"{summary['pushed']} (`dvc exp pull origin {summary['experiment']}`)"),
        ("FID", f"{summary['fid']:.4f}"),
        ("KID", summary["kid"]),
        ("promoted", summary["promotion"] if summary["promoted"] is None else summary["promoted"]),
        ("model", summary["model"] and f"{summary['model']} ({summary['alias']}: {summary['promotion']})"),
        ("MLflow run", summary["run_url"]),
    ]
    create_markdown_artifact(
        markdown=f"## Retrain\n\n{markdown_table(rows)}\n", key="retrain-summary", description=summary["message"]
    )
    return summary


# ---------------------------------------------------------------- experiment grid


@task(name="run-experiment", **NO_RESULT_CACHE)
def run_experiment(root: Path, point: dict[str, Any]) -> str:
    """One grid point as a DVC experiment in a temp copy of the workspace; its experiment name."""
    return dvc_runner.experiment(root, point, get_run_logger())


@task(name="experiment-metrics", **NO_RESULT_CACHE)
def experiment_metrics(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """The evaluate metrics of the named experiments (``dvc exp show --json``)."""
    return dvc_runner.experiment_metrics(root, names, METRICS / "evaluate.json")


POINT_ARTIFACT = "sweep-point"  # the table artifact of a sweep-point run: its experiment and metrics


@flow(name="sweep-point", validate_parameters=False, persist_result=False)
def sweep_point(
    overrides: dict[str, Any],
    project: str = ".",
    publish: bool = True,
    retries: int = 0,
    retry_delay_seconds: float = 60.0,
    timeout_seconds: float | None = 6 * 3600.0,
    profile: str | None = None,
) -> dict[str, Any]:
    """One grid point on a worker: ``dvc exp run -S ...`` in its workspace, pushed, its metrics published.

    ``profile`` (a file of the project, e.g. configs/gpu.yaml) sets overrides first; the point's win over it."""
    opts = options(PointOptions, "sweep_point", locals())
    get_run_logger().info("workspace %s", opts.root)
    (settings,) = opts.points()
    run = run_pipeline.with_options(**opts.retry_options())(opts.root, settings, False, True, opts.publish)
    if not run["experiment"]:
        raise PipelineError(f"{run['command']} did not name its experiment")
    evaluation = read_metrics(opts.root)["evaluate"]
    pushed = push_experiment(opts.root, run["experiment"]) if opts.publish else None
    result = {
        "experiment": run["experiment"],
        "overrides": json.dumps(opts.overrides, sort_keys=True),
        "profile": opts.profile,
        "fid": evaluation["fid"],
        "kid": evaluation.get("kid"),
        "stages": ", ".join(run["stages"]),
        "pushed": pushed,
        "host": socket.gethostname(),
        "workspace": str(opts.root),
    }
    message = f"sweep point {opts.overrides}: {run['experiment']}, FID {evaluation['fid']:.4f}"
    get_run_logger().info("%s (%s)", message, opts.root)
    create_table_artifact(table=[result], key=POINT_ARTIFACT, description=message)
    return result


@task(name="fan-out", **NO_RESULT_CACHE)
def fan_out(deployment: str, points: list[dict[str, Any]], wait_seconds: float | None) -> list[dict[str, Any]]:
    """Each point as a run of ``deployment`` (its work pool's workers take them); wait for all of them.

    One entry per point, in order: ``{"overrides", "flow_run", "state", "experiment"}`` for a completed run
    (the experiment from its ``sweep-point`` artifact), ``{"overrides", "flow_run", "state", "error"}`` else.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    runs = [
        run_deployment(name=deployment, parameters={"overrides": point}, timeout=0, as_subflow=True) for point in points
    ]
    logger.info("submitted %d run(s) of %s: %s", len(runs), deployment, ", ".join(r.name for r in runs))
    deadline = None if wait_seconds is None else time.monotonic() + wait_seconds
    ids = [r.id for r in runs]
    with get_client(sync_client=True) as client:
        while True:
            found = {
                r.id: r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            }
            current = [found.get(i) or client.read_flow_run(i) for i in ids]
            if all(r.state and r.state.is_final() for r in current):
                break
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.5)
        entries = []
        for point, run in zip(points, current):
            entry = {"overrides": point, "flow_run": run.name, "state": run.state.name if run.state else "unknown"}
            if run.state and run.state.is_completed():
                (artifact,) = client.read_artifacts(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                    artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[POINT_ARTIFACT])),
                )
                table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
                entry.update(experiment=table[0]["experiment"], workspace=table[0]["workspace"], host=table[0]["host"])
                entry["flow_run_id"] = str(run.id)
            else:
                final = run.state and run.state.is_final()
                entry["error"] = (run.state.message if final else None) or f"not finished ({entry['state']})"
                logger.error("point %s (%s) failed: %s", point, run.name, entry["error"])
            entries.append(entry)
    return entries


@task(name="pull-experiments", **NO_RESULT_CACHE)
def pull_experiments(root: Path, names: list[str]) -> None:
    """``dvc exp pull origin NAMES``: the workers' experiments into this project (git refs and outputs)."""
    dvc_runner.pull_experiments(root, names)


@flow(name="experiment-grid", validate_parameters=False, persist_result=False)
def experiment_grid(
    grid: dict[str, list[Any]],
    project: str = ".",
    retries: int = 1,
    retry_delay_seconds: float = 60.0,
    timeout_seconds: float | None = 6 * 3600.0,
    deployment: str | None = None,
) -> dict[str, Any]:
    """Run every combination of ``grid`` as a DVC experiment (workspace untouched) and report the best FID.

    Without ``deployment`` the points run here one after the other; with it, as runs of that deployment on
    its work pool, side by side on its workers.
    """
    opts = options(GridOptions, "experiment_grid", locals())
    logger = get_run_logger()
    points = opts.points()
    where = f"on the workers of {opts.deployment}" if opts.deployment else "here"
    logger.info("experiment grid: %d experiment(s) over %s, %s", len(points), ", ".join(opts.grid), where)
    names: dict[str, dict[str, Any]] = {}
    where: dict[str, dict[str, Any]] = {}  # fanned out: the flow run, host and workspace of each experiment
    failed: list[dict[str, Any]] = []
    if opts.deployment:
        for entry in fan_out(opts.deployment, points, opts.timeout_seconds):
            if "experiment" in entry:
                names[entry["experiment"]] = entry["overrides"]
                where[entry["experiment"]] = {k: entry[k] for k in ("flow_run", "flow_run_id", "host", "workspace")}
            else:
                failed.append({"overrides": entry["overrides"], "error": entry["error"], "flow_run": entry["flow_run"]})
        if names:
            pull_experiments(opts.root, list(names))
    else:
        run_one = run_experiment.with_options(**opts.retry_options())
        for point in points:
            state = run_one(opts.root, point, return_state=True)
            if state.is_completed():
                names[state.result()] = point
            else:
                failed.append({"overrides": point, "error": state.message})
                logger.error("experiment %s failed: %s", point, state.message)
    if not names:
        errors = "; ".join(f"{f['overrides']}: {f['error']}" for f in failed)
        raise PipelineError(f"every experiment of the grid failed ({len(failed)}): {errors}")
    metrics = experiment_metrics(opts.root, list(names))
    runs = [
        {"experiment": name, "overrides": point, "fid": metrics[name]["fid"], "kid": metrics[name].get("kid")}
        | where.get(name, {})
        for name, point in names.items()
    ]
    best = min(runs, key=lambda r: r["fid"])
    header = ["experiment", *opts.grid, "FID", "KID"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(runs, key=lambda r: r["fid"]):
        cells = [r["experiment"], *(json.dumps(r["overrides"][k]) for k in opts.grid), f"{r['fid']:.4f}", r["kid"]]
        table.append("| " + " | ".join(str(c) for c in cells) + " |")
    for f in failed:
        cells = ["failed", *(json.dumps(f["overrides"][k]) for k in opts.grid), f["error"].replace("|", "/"), ""]
        table.append("| " + " | ".join(str(c) for c in cells) + " |")
    message = f"experiment grid: best FID {best['fid']:.4f} with {best['overrides']} ({best['experiment']})"
    if failed:
        message += f"; {len(failed)} failed: " + "; ".join(f"{f['overrides']}: {f['error']}" for f in failed)
    apply = f"apply it to the workspace with `dvc exp apply {best['experiment']}`"
    logger.info("%s; %s", message, apply)
    create_markdown_artifact(
        markdown="## Experiment grid\n\n" + "\n".join(table) + f"\n\n{message}; {apply}.\n",
        key="experiment-grid-summary",
        description=message[:500],
    )
    return {"best": best, "runs": runs, "failed": failed, "message": message}


# ---------------------------------------------------------------- CLI


def main(args: argparse.Namespace) -> None:
    if args.command == "retrain":
        retrain(project=args.project, force=args.force, overrides=dict(args.set), profile=args.profile)
    else:
        experiment_grid(grid=dict(args.grid), project=args.project, deployment=args.deployment)


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = cli.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("retrain", help="run the retrain flow once now")
    run_parser.add_argument("--force", action="store_true", help="run the pipeline even if nothing changed")
    run_parser.add_argument("-S", "--set", type=dotted.assignment, action="append", default=[], metavar="KEY=VALUE")
    run_parser.add_argument("--profile", help="an overrides file of the project (e.g. configs/gpu.yaml) under -S")
    grid_parser = commands.add_parser("experiment-grid", help="run a grid of DVC experiments, report the best FID")
    grid_parser.add_argument(
        "-G", "--grid", type=dotted.assignment, action="append", required=True, metavar="KEY=[V,..]"
    )
    grid_parser.add_argument(
        "--deployment", help="run each point as a run of this deployment (e.g. sweep-point/sweep-point) on its pool"
    )
    for sub in commands.choices.values():
        sub.add_argument("--project", default=".", help="the DVC project folder (default: here)")
    return cli


if __name__ == "__main__":
    params.run_stage(main, parser())
