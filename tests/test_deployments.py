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
        client.create_work_pool(WorkPoolCreate(name=cfg.work_pool, type="process"))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
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
    assert deployment.parameters["overrides"]["train.accelerator"] == "gpu"
    assert deployment.entrypoint == deployments.ENTRYPOINT
    (pull,) = deployment.pull_steps
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == str(project.resolve())
