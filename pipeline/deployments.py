"""The ``retrain`` deployment: served on params.yaml's ``schedule``, or declared in ``prefect.yaml`` for a work pool.

``prefect deploy`` cannot read params.yaml, so ``prefect.yaml`` repeats the deployment name, cron, time zone
and work pool of its ``schedule`` section; ``check`` refuses a ``prefect.yaml`` that disagrees, and one whose
deployments' parameters (a ``profile`` file, ``overrides``) the flows would refuse.

    python -m pipeline.deployments serve    # serve `retrain` on params.yaml's schedule (`make serve`)
    python -m pipeline.deployments check    # prefect.yaml agrees with params.yaml (`make deploy` runs it first)
    python -m pipeline.deployments zombies  # the automation that marks runs of lost workers Crashed (`make deploy`)

A flow run whose worker machine dies stops sending heartbeats (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, a job
variable in ``prefect.yaml``) but stays Running on the server; the ``zombies`` automation (Prefect's documented
recipe) marks it Crashed once no heartbeat came for ``--within`` seconds, which frees the deployment's
concurrency slot, so the next run (on any worker) starts and resumes from the shared checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

import yaml
from prefect.types.entrypoint import EntrypointType

from ddpm.config import ConfigError
from pipeline import flows, params
from pipeline.flows import retrain
from pipeline.schedule import ScheduleConfig

ENTRYPOINT = f"{retrain.fn.__module__}.{retrain.fn.__name__}"  # a module path: the worker imports it
PREFECT_YAML = Path("prefect.yaml")
# Two retrains must never run in one workspace (DVC's repo lock would fail the second one anyway).
CONCURRENCY_LIMIT = 1


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


# The flows of prefect.yaml's deployments: entrypoint -> the options that validate their parameters, and the flow's name
FLOW_OPTIONS = {
    ENTRYPOINT: (flows.RetrainOptions, "retrain"),
    f"{flows.sweep_point.fn.__module__}.{flows.sweep_point.fn.__name__}": (flows.PointOptions, "sweep_point"),
}


def check_parameters(project: Path, path: Path = PREFECT_YAML) -> None:
    """ConfigError unless every deployment's parameters in prefect.yaml pass its flow's validation in ``project``
    (the flow's own check before any work: its profile file, its overrides over params.yaml)."""
    doc = yaml.safe_load(path.read_text()) or {}
    for d in doc.get("deployments") or []:
        if d.get("entrypoint") not in FLOW_OPTIONS:
            continue
        cls, name = FLOW_OPTIONS[d["entrypoint"]]
        try:
            flows.options(cls, name, {**(d.get("parameters") or {}), "project": str(project)})
        except ConfigError as e:
            raise ConfigError(f"prefect.yaml deployment {d.get('name')!r}: {e}") from None


ZOMBIE_AUTOMATION = "ddpm: crash flow runs of lost workers"


def zombie_automation(within_seconds: float):
    """Prefect's automation that marks a flow run Crashed when its heartbeats stop (created or replaced)."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    automation = Automation(
        name=ZOMBIE_AUTOMATION,
        description="A flow run that sent no heartbeat for a while lost its worker: mark it Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },  # fmt: skip
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {within_seconds:g} s: the worker running this flow run was lost",
            )
        ],
    )
    with contextlib.suppress(ValueError):  # ValueError: none yet
        Automation.read(name=ZOMBIE_AUTOMATION).delete()
    return automation.create()


def main(args: argparse.Namespace) -> None:
    if args.command == "zombies":
        automation = zombie_automation(args.within)
        print(f"automation {automation.name!r}: a flow run without a heartbeat for {args.within:g} s is Crashed")
        return
    cfg = params.load(Path(args.project) / params.PARAMS).schedule
    if args.command == "check":
        mismatches = prefect_yaml_mismatches(cfg, Path(args.project) / PREFECT_YAML)
        if mismatches:
            raise ConfigError(f"prefect.yaml disagrees with params.yaml schedule: {'; '.join(mismatches)}")
        check_parameters(Path(args.project), Path(args.project) / PREFECT_YAML)
        print(f"prefect.yaml agrees with params.yaml: {cfg.deployment} {cfg.cron!r} {cfg.timezone} on {cfg.work_pool}")
        if not os.environ.get("DDPM_GIT_URL"):
            raise ConfigError("DDPM_GIT_URL is empty: this clone has no git remote `origin`; set DDPM_GIT_URL to the "
                              "repository the workers clone (make deploy DDPM_GIT_URL=...)")  # fmt: skip
    else:
        from prefect import serve

        serve(deployment(cfg))


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = cli.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve retrain on params.yaml's schedule (against $PREFECT_API_URL)")
    commands.add_parser("check", help="check that prefect.yaml agrees with params.yaml")
    zombies = commands.add_parser("zombies", help="create the automation that crashes flow runs of lost workers")
    zombies.add_argument("--within", type=float, default=120.0, help="seconds without a heartbeat (default 120)")
    for sub in commands.choices.values():
        sub.add_argument("--project", default=".", help="the DVC project folder (default: here)")
    return cli


if __name__ == "__main__":
    params.run_stage(main, parser())
