"""The scheduled deployment (``pipeline.deployments``) against a real Prefect server, and ``prefect.yaml`` deployed
with the real ``prefect deploy`` from a temp git repo copy of the project."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline import deployments, params
from pipeline.schedule import ScheduleConfig
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.settings import PREFECT_API_URL

from ddpm.config import ConfigError
from test_pipeline import ROOT, copy_project

pytestmark = pytest.mark.slow


def test_served_deployment_has_the_schedule_and_concurrency_limit_1(prefect_server):
    cfg = params.load(ROOT / "params.yaml").schedule
    deployment_id = deployments.deployment(cfg).apply()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (cfg.cron, cfg.timezone)
    assert deployment.name == cfg.deployment and deployment.global_concurrency_limit.limit == 1
    assert deployment.entrypoint == deployments.ENTRYPOINT
    with pytest.raises(ConfigError, match=r"^schedule.cron='99 3 \* \* \*': Invalid cron string"):
        deployments.deployment(ScheduleConfig(cron="99 3 * * *"))
    with pytest.raises(ConfigError, match=r"^schedule.cron='0 3 \* \*': expected a cron expression of 5 fields"):
        ScheduleConfig.from_dict({"cron": "0 3 * *"}, "schedule")
    with pytest.raises(ConfigError, match=r"^schedule.timezone='Mars/Olympus': expected an IANA time zone"):
        ScheduleConfig.from_dict({"timezone": "Mars/Olympus"}, "schedule")


def test_prefect_yaml_agrees_with_params_and_deploys_to_the_pool(prefect_server, smoke_params, tmp_path):
    project = copy_project(tmp_path, smoke_params)
    cfg = params.load(ROOT / "params.yaml").schedule
    assert deployments.prefect_yaml_mismatches(cfg, ROOT / "prefect.yaml") == []
    other = cfg.model_copy(update={"cron": "0 4 * * *", "work_pool": "cpu"})
    assert deployments.prefect_yaml_mismatches(other, ROOT / "prefect.yaml") == [
        "work_pool.name='gpu', expected 'cpu'",
        "schedules[0].cron='0 3 * * *', expected '0 4 * * *'",
    ]
    (project / "prefect.yaml").write_text((ROOT / "prefect.yaml").read_text())
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=cfg.work_pool, type="process"), overwrite=True)
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "DDPM_GIT_URL": "https://git.example/team/ddpm.git",
    }
    env.pop("DDPM_GIT_BRANCH", None)
    deploy = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"retrain/{cfg.deployment}")
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (cfg.cron, cfg.timezone)
    assert deployment.global_concurrency_limit.limit == 1 and deployment.work_pool_name == cfg.work_pool
    assert deployment.job_variables["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert deployment.parameters["profile"] == "configs/gpu.yaml" and deployment.parameters["overrides"] == {}
    assert deployment.entrypoint == deployments.ENTRYPOINT
    # the worker fetches the project: the pull step of the installed package, the repository as a job variable
    assert deployment.pull_steps == [{"ddpm.worker.checkout": {"id": "checkout"}}]
    assert deployment.job_variables["env"]["DDPM_GIT_URL"] == "https://git.example/team/ddpm.git"
    assert deployment.job_variables["env"]["DDPM_GIT_BRANCH"] == ""  # unset when deployed: the checkout takes main
    assert deployment.parameters["publish"] is True
    with get_client(sync_client=True) as client:
        point = client.read_deployment_by_name("sweep-point/sweep-point")
    assert point.entrypoint == "pipeline.flows.sweep_point" and point.work_pool_name == cfg.work_pool
    assert point.pull_steps == deployment.pull_steps


def test_deploy_check_needs_the_repository_the_workers_clone():
    """`make deploy` first runs the check: prefect.yaml agrees with params.yaml and DDPM_GIT_URL names a repository."""
    env = {k: v for k, v in os.environ.items() if k != "DDPM_GIT_URL"}
    cmd = [sys.executable, "-m", "pipeline.deployments", "check"]
    missing = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("error: DDPM_GIT_URL is empty")
    given = subprocess.run(cmd, cwd=ROOT, env={**env, "DDPM_GIT_URL": "https://git.example/ddpm.git"},
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert given.returncode == 0, given.stderr
    assert given.stdout.startswith("prefect.yaml agrees with params.yaml: nightly-retrain")


def test_the_zombie_automation_is_created_once(prefect_server):
    """`make deploy` installs Prefect's automation that marks a flow run Crashed once its heartbeats stop."""
    from prefect.automations import Automation

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    cmd = [sys.executable, "-m", "pipeline.deployments", "zombies", "--within", "45"]
    for _ in range(2):  # a second deploy replaces it
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    with get_client(sync_client=True) as client:
        found = [a for a in client.read_automations() if a.name == deployments.ZOMBIE_AUTOMATION]
    assert len(found) == 1
    (automation,) = found
    assert automation.trigger.within.total_seconds() == 45 and automation.trigger.posture == "Proactive"
    assert automation.trigger.after == {"prefect.flow-run.heartbeat"}
    (action,) = automation.actions
    assert action.type == "change-flow-run-state" and action.state == "CRASHED"
    assert Automation.read(name=deployments.ZOMBIE_AUTOMATION).id == automation.id
