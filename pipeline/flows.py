"""Prefect orchestration of the DVC pipeline: scheduled ``retrain`` with promotion, and a ``sweep`` of experiments.

Prefect owns time (schedules, retries with backoff, timeouts, work pools); DVC owns what runs. Every pipeline
execution is a ``dvc repro`` or ``dvc exp run`` subprocess, so ``dvc.lock`` stays the record and unchanged
stages are never recomputed; no task uses Prefect's result caching or persistence on top of that.

``retrain`` tasks, in order: ``check-changes`` (``dvc status`` and the overrides against params.yaml),
``run-pipeline`` (only when something changed or ``force``), ``read-metrics``, ``promote`` (the MLflow
champion rule, through ``ddpm.tracking.promote`` when tracking is on) and a summary: logged, returned and
published as the markdown artifact ``retrain-summary``.

Test hooks: when ``$DDPM_FLOW_FAIL_ONCE`` names an existing file, the next ``run-pipeline`` or
``sweep-point`` attempt deletes the file and fails before starting DVC (an injected transient failure).
When ``$DDPM_FLOW_PREEMPT_ONCE`` names an existing file, the next ``run-pipeline`` attempt deletes it and
interrupts DVC as soon as the train stage has written its first resume checkpoint (an injected preemption:
the stage checkpoints and stops, the attempt fails, and the retry resumes training).

    python -m pipeline.flows retrain [--force] [-S train.lr=3e-4 ...]   # one run now
    python -m pipeline.flows sweep -G 'sample.steps=[10, 25]' [-G ...]   # a grid of DVC experiments
    python -m pipeline.flows serve    # serve `retrain` on params.yaml's schedule (`make serve`)
    python -m pipeline.flows check    # prefect.yaml agrees with params.yaml (`make deploy` runs it first)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.types.entrypoint import EntrypointType
from pydantic import Field, field_validator

from ddpm import tracking
from ddpm.config import Config, ConfigError
from pipeline import overrides as dotted
from pipeline import params
from pipeline.schedule import ScheduleConfig
from pipeline.tracking import REGISTRY_RECORD, RUN_RECORD

ENTRYPOINT = "pipeline.flows.retrain"  # a module path: the worker imports it from the project root
PREFECT_YAML = Path("prefect.yaml")
# Two retrains must never run in one workspace (DVC's repo lock would fail the second one anyway).
CONCURRENCY_LIMIT = 1
METRICS = params.OUT / "metrics"
FAIL_ONCE = "DDPM_FLOW_FAIL_ONCE"
PREEMPT_ONCE = "DDPM_FLOW_PREEMPT_ONCE"
GRACE_SECONDS = 30  # after SIGINT, how long DVC and its stage get to exit before SIGKILL
NO_RESULT_CACHE = {"cache_policy": NO_CACHE, "persist_result": False}


class PipelineError(RuntimeError):
    """A DVC command failed; the message ends with its last error line."""


class TransientFailure(RuntimeError):
    """The failure injected by the ``$DDPM_FLOW_FAIL_ONCE`` test hook."""


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


class SweepOptions(RunOptions):
    """Parameters of the ``sweep`` flow."""

    retries: int = Field(1, ge=0, description="retries of a failed experiment")
    grid: dict[str, list[Any]] = Field(description="section.key: [values]; every combination is one experiment")

    @field_validator("grid")
    @classmethod
    def _values(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not v:
            raise ValueError("expected at least one section.key: [values]")
        empty = [key for key, values in v.items() if not values]
        if empty:
            raise ValueError(f"no values for {empty}")
        return v


def options(cls: type[RunOptions], name: str, values: dict[str, Any]) -> RunOptions:
    """Validate flow parameters, including the overrides against the project's params.yaml (one-line errors).

    ``values`` are the flow's arguments (its ``locals()`` before anything else is assigned).
    """
    opts = cls.from_dict(dict(values), name)
    field = "grid" if isinstance(opts, SweepOptions) else "overrides"
    bad = [key for key in getattr(opts, field) if key.count(".") != 1]
    if bad:
        raise ConfigError(f"{name}.{field}: keys must look like section.key, got {bad}")
    raw = params.read_yaml(opts.root / params.PARAMS)
    for point in grid_points(opts.grid) if isinstance(opts, SweepOptions) else [opts.overrides]:
        params.validate(dotted.merge(raw, point))
    return opts


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in order."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


# ---------------------------------------------------------------- running DVC


def dvc_env() -> dict[str, str]:
    """The environment of DVC and its stages: this interpreter first on PATH, no telemetry, bounded OpenMP spinning.

    Unless the caller chose an OpenMP wait policy, idle OpenMP threads spin for GOMP_SPINCOUNT=30000 turns
    (~0.3 ms) before they sleep: long enough to bridge the gaps between one step's operators (CPU training ran
    1.09-1.18x faster than with threads that sleep at once), short enough not to hold a shared machine's cores.
    """
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key, value in {
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }.items():
        env.setdefault(key, value)
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = "30000"
    return env


def dvc(root: Path, *args: str) -> str:
    """Run a short DVC command; its stdout, or PipelineError with its last error line."""
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=dvc_env(), capture_output=True, text=True
    )
    if result.returncode != 0:
        raise PipelineError(f"dvc {' '.join(args)} failed ({result.returncode}): {last_line(result.stderr)}")
    return result.stdout


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def stream(
    root: Path, args: list[str], log: Callable[[str], None], watch: Callable[[subprocess.Popen], None] | None = None
) -> list[str]:
    """Run a long DVC command, logging its output line by line; interrupt it if this thread is interrupted.

    DVC runs in its own process group. A Prefect timeout (or any exception here) sends it SIGINT, so DVC
    releases its locks and the stage's atomic writes delete their temp files, then SIGKILL after a grace
    period; temp files a killed stage left behind are removed. Raises PipelineError when DVC fails.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        env=dvc_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=default_sigint,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=pump, args=(proc.stdout, lines), daemon=True).start()
    if watch is not None:
        threading.Thread(target=watch, args=(proc,), daemon=True).start()
    output = []
    try:
        while (line := next_line(lines)) is not None:
            if line.strip():
                output.append(line.rstrip())
                log(line.rstrip())
        proc.wait()
    except BaseException:
        interrupt(proc, root)
        raise
    if proc.returncode != 0:
        errors = [line for line in output if line.startswith(("ERROR", "error"))] or output or ["no output"]
        raise PipelineError(f"dvc {' '.join(args)} failed ({proc.returncode}): {' / '.join(errors[-2:])}")
    return output


def default_sigint() -> None:
    """In the DVC child: SIGINT back to its default. A process that starts with SIGINT ignored (as Prefect's
    runner may leave it) passes that on to DVC and the stage, and an interrupt would then be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def pump(stdout: Iterable[str], lines: queue.Queue[str | None]) -> None:
    """Copy a process's output into a queue, then None."""
    for line in stdout:
        lines.put(line)
    lines.put(None)


def next_line(lines: queue.Queue[str | None]) -> str | None:
    """The next output line; wakes up every second so that a timeout can interrupt the wait."""
    while True:
        try:
            return lines.get(timeout=1.0)
        except queue.Empty:
            continue


def interrupt(proc: subprocess.Popen, root: Path) -> None:
    """Stop DVC and its stage: SIGINT, then SIGKILL after the grace period; remove leftover temp files."""
    for sig, wait in ((signal.SIGINT, GRACE_SECONDS), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    for tmp in (root / params.OUT).rglob(".*.tmp"):  # atomic-write temp files of a killed stage
        tmp.unlink(missing_ok=True)


def stages_run(output: Iterable[str]) -> list[str]:
    """The stages DVC executed, in order (not those it skipped as unchanged)."""
    return re.findall(r"Running stage '([^']+)'", "\n".join(output))


def inject_failure() -> None:
    """The ``$DDPM_FLOW_FAIL_ONCE`` test hook: fail once if the named file exists (and delete it)."""
    marker = os.environ.get(FAIL_ONCE)
    if marker and Path(marker).is_file():
        Path(marker).unlink()
        raise TransientFailure(f"injected transient failure (test hook ${FAIL_ONCE}={marker})")


def preemption(root: Path) -> Callable[[subprocess.Popen], None] | None:
    """The ``$DDPM_FLOW_PREEMPT_ONCE`` test hook: a watcher that interrupts DVC after the first resume checkpoint."""
    marker = os.environ.get(PREEMPT_ONCE)
    if not marker or not Path(marker).is_file():
        return None
    checkpoint = root / params.OUT / "train" / "resume.ckpt"

    def watch(proc: subprocess.Popen) -> None:
        while proc.poll() is None:
            if checkpoint.is_file():
                Path(marker).unlink(missing_ok=True)
                os.killpg(proc.pid, signal.SIGINT)  # the train stage checkpoints this step and exits
                return
            time.sleep(0.05)

    return watch


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------- retrain


@task(name="check-changes", **NO_RESULT_CACHE)
def check_changes(root: Path, overrides: dict[str, Any]) -> list[str]:
    """What would make DVC run: stages ``dvc status`` reports, and overrides that differ from params.yaml."""
    status = json.loads(dvc(root, "status", "--json") or "{}")
    changes = [f"stage {name}" for name in status]
    raw = params.read_yaml(root / params.PARAMS)
    for key, value in overrides.items():
        section, name = key.split(".")
        current = (raw.get(section) or {}).get(name)
        if current != value:
            changes.append(f"param {key}: {current!r} -> {value!r}")
    get_run_logger().info("changes: %s", "; ".join(changes) if changes else "none")
    return changes


@task(name="run-pipeline", **NO_RESULT_CACHE)
def run_pipeline(root: Path, overrides: dict[str, Any], force: bool) -> dict[str, Any]:
    """``dvc repro`` (``dvc exp run -S ...`` with overrides); a failed attempt leaves params.yaml as it was."""
    logger = get_run_logger()
    inject_failure()
    args = ["exp", "run", *dotted.set_flags(overrides)] if overrides else ["repro"]
    args += ["--force"] if force else []
    params_file = root / params.PARAMS
    before = params_file.read_bytes()
    logger.info("$ dvc %s", " ".join(args))
    try:
        output = stream(root, args, logger.info, watch=preemption(root))
    except BaseException:
        if params_file.read_bytes() != before:  # `dvc exp run -S` wrote the overrides before failing
            params_file.write_bytes(before)
            logger.warning("restored params.yaml as it was before the failed run")
        raise
    experiment = re.search(r"Ran experiment\(s\): (\S+)", "\n".join(output))
    return {
        "command": "dvc " + " ".join(args),
        "stages": stages_run(output),
        "experiment": experiment.group(1) if experiment else None,
    }


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
    decision = tracking.promote(run["tracking_uri"], record["model_name"], str(record["version"]))
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


def markdown_table(rows: Iterable[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"]
    return "\n".join(lines + [f"| {key} | {'' if value is None else value} |" for key, value in rows])


@flow(name="retrain", validate_parameters=False, persist_result=False)
def retrain(
    project: str = ".",
    force: bool = False,
    overrides: dict[str, Any] | None = None,
    retries: int = 2,
    retry_delay_seconds: float = 60.0,
    timeout_seconds: float | None = 6 * 3600.0,
) -> dict[str, Any]:
    """Retrain when data or params changed (or when forced) through DVC, then promote the better model."""
    opts = options(RetrainOptions, "retrain", {**locals(), "overrides": overrides or {}})
    logger = get_run_logger()
    changes = check_changes(opts.root, opts.overrides)
    run = None
    if changes or opts.force:
        run = run_pipeline.with_options(**opts.retry_options())(opts.root, opts.overrides, opts.force)
    metrics = read_metrics(opts.root)
    decision = promote(opts.root)
    summary = summarize(changes, run, metrics, decision)
    logger.info(summary["message"])
    if summary["run_url"]:
        logger.info("MLflow run: %s", summary["run_url"])
    rows = [
        ("changes", "<br>".join(changes) or "none"),
        ("DVC", summary["command"] or "nothing to run"),
        ("stages run", ", ".join(summary["stages"]) or "none"),
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


# ---------------------------------------------------------------- sweep


@task(name="sweep-point", **NO_RESULT_CACHE)
def run_experiment(root: Path, point: dict[str, Any]) -> str:
    """One grid point as a DVC experiment in a temp copy of the workspace; its experiment name."""
    logger = get_run_logger()
    inject_failure()
    args = ["exp", "run", "--temp", *dotted.set_flags(point)]
    logger.info("$ dvc %s", " ".join(args))
    output = stream(root, args, logger.info)
    name = re.search(r"Ran experiment\(s\): (\S+)", "\n".join(output))
    if name is None:
        raise PipelineError(f"dvc {' '.join(args)} did not name its experiment")
    return name.group(1)


@task(name="experiment-metrics", **NO_RESULT_CACHE)
def experiment_metrics(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """The evaluate metrics of the named experiments (``dvc exp show --json``)."""
    key = (METRICS / "evaluate.json").as_posix()
    found: dict[str, dict[str, Any]] = {}

    def walk(node: dict[str, Any]) -> None:
        metrics = ((node.get("data") or {}).get("metrics") or {}).get(key, {}).get("data")
        if node.get("name") in names and metrics and node["name"] not in found:
            found[node["name"]] = metrics
        for experiment in node.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                walk(rev)

    for baseline in json.loads(dvc(root, "exp", "show", "--json", "--no-pager")):
        walk(baseline)
    missing = sorted(set(names) - found.keys())
    if missing:
        raise PipelineError(f"dvc exp show has no evaluate metrics for {missing}")
    return found


@flow(name="sweep", validate_parameters=False, persist_result=False)
def sweep(
    grid: dict[str, list[Any]],
    project: str = ".",
    retries: int = 1,
    retry_delay_seconds: float = 60.0,
    timeout_seconds: float | None = 6 * 3600.0,
) -> dict[str, Any]:
    """Run every combination of ``grid`` as a DVC experiment (workspace untouched) and report the best FID."""
    opts = options(SweepOptions, "sweep", locals())
    logger = get_run_logger()
    points = grid_points(opts.grid)
    logger.info("sweep: %d experiment(s) over %s", len(points), ", ".join(opts.grid))
    run_one = run_experiment.with_options(**opts.retry_options())
    names, failed = {}, []
    for point in points:
        state = run_one(opts.root, point, return_state=True)
        if state.is_completed():
            names[state.result()] = point
        else:
            failed.append(point)
            logger.error("experiment %s failed: %s", point, state.message)
    if not names:
        raise PipelineError(f"every experiment of the sweep failed ({len(failed)})")
    metrics = experiment_metrics(opts.root, list(names))
    runs = [
        {"experiment": name, "overrides": point, "fid": metrics[name]["fid"], "kid": metrics[name].get("kid")}
        for name, point in names.items()
    ]
    best = min(runs, key=lambda r: r["fid"])
    header = ["experiment", *opts.grid, "FID", "KID"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(runs, key=lambda r: r["fid"]):
        cells = [r["experiment"], *(json.dumps(r["overrides"][k]) for k in opts.grid), f"{r['fid']:.4f}", r["kid"]]
        table.append("| " + " | ".join(str(c) for c in cells) + " |")
    message = f"sweep: best FID {best['fid']:.4f} with {best['overrides']} ({best['experiment']})"
    apply = f"apply it to the workspace with `dvc exp apply {best['experiment']}`"
    logger.info("%s; %s", message, apply)
    create_markdown_artifact(
        markdown="## Sweep\n\n" + "\n".join(table) + f"\n\n{message}; {apply}.\n",
        key="sweep-summary",
        description=message,
    )
    return {"best": best, "runs": runs, "failed": failed, "message": message}


# ---------------------------------------------------------------- deployments


def deployment(cfg: ScheduleConfig, **kwargs: Any):
    """The ``retrain`` deployment on ``cfg``'s cron schedule, at most one run at a time."""
    from prefect.schedules import Cron

    try:
        schedule = Cron(cfg.cron, timezone=cfg.timezone)
    except ValueError as e:
        raise ConfigError(f"schedule.cron={cfg.cron!r}: {e}") from None
    return retrain.to_deployment(
        name=cfg.deployment,
        entrypoint_type=EntrypointType.MODULE_PATH,
        schedules=[schedule],
        concurrency_limit=CONCURRENCY_LIMIT,
        description="Nightly retraining through DVC; promotes the model when its FID beats the champion's.",
        tags=["ddpm"],
        **kwargs,
    )


def prefect_yaml_mismatches(cfg: ScheduleConfig, path: Path = PREFECT_YAML) -> list[str]:
    """Where prefect.yaml's retrain deployment disagrees with params.yaml's ``schedule`` section."""
    doc = yaml.safe_load(path.read_text()) or {}
    found = [d for d in doc.get("deployments") or [] if d.get("name") == cfg.deployment]
    if not found:
        return [f"no deployment named {cfg.deployment!r} (schedule.deployment)"]
    d = found[0]
    schedules = d.get("schedules") or []
    expected = {
        "entrypoint": (d.get("entrypoint"), ENTRYPOINT),
        "work_pool.name": ((d.get("work_pool") or {}).get("name"), cfg.work_pool),
        "schedules[0].cron": (schedules[0].get("cron") if schedules else None, cfg.cron),
        "schedules[0].timezone": (schedules[0].get("timezone") if schedules else None, cfg.timezone),
        "concurrency_limit": (d.get("concurrency_limit"), CONCURRENCY_LIMIT),
    }
    return [f"{key}={got!r}, expected {want!r}" for key, (got, want) in expected.items() if got != want]


# ---------------------------------------------------------------- CLI


def assignment(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value (as ``dvc exp run -S``)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, yaml.safe_load(value)


def main(args: argparse.Namespace) -> None:
    if args.command == "retrain":
        retrain(project=args.project, force=args.force, overrides=dict(args.set))
    elif args.command == "sweep":
        sweep(grid=dict(args.grid), project=args.project)
    else:
        cfg = params.load(Path(args.project) / params.PARAMS).schedule
        if args.command == "check":
            mismatches = prefect_yaml_mismatches(cfg, Path(args.project) / PREFECT_YAML)
            if mismatches:
                raise ConfigError(f"prefect.yaml disagrees with params.yaml schedule: {'; '.join(mismatches)}")
            print(
                f"prefect.yaml agrees with params.yaml: {cfg.deployment} {cfg.cron!r} {cfg.timezone} on {cfg.work_pool}"
            )
        else:
            from prefect import serve

            serve(deployment(cfg))


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = cli.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("retrain", help="run the retrain flow once now")
    run_parser.add_argument("--force", action="store_true", help="run the pipeline even if nothing changed")
    run_parser.add_argument("-S", "--set", type=assignment, action="append", default=[], metavar="KEY=VALUE")
    sweep_parser = commands.add_parser("sweep", help="run a grid of DVC experiments, report the best FID")
    sweep_parser.add_argument("-G", "--grid", type=assignment, action="append", required=True, metavar="KEY=[V,..]")
    commands.add_parser("serve", help="serve retrain on params.yaml's schedule (against $PREFECT_API_URL)")
    commands.add_parser("check", help="check that prefect.yaml agrees with params.yaml")
    for sub in commands.choices.values():
        sub.add_argument("--project", default=".", help="the DVC project folder (default: here)")
    return cli


if __name__ == "__main__":
    # Run the CLI from the importable module, not __main__: a served flow's entrypoint is its module path.
    from pipeline import flows

    params.run_stage(flows.main, flows.parser())
