"""The ``schedule`` section of params.yaml: when and where the Prefect ``retrain`` deployment runs."""

from __future__ import annotations

from pydantic import Field

from ddpm.config import Config


class ScheduleConfig(Config):
    """Cron schedule, deployment name and work pool of scheduled retraining."""

    cron: str = Field("0 3 * * *", description="cron expression of the retrain deployment (default nightly 03:00)")
    timezone: str = Field("UTC", description="time zone of the cron schedule")
    deployment: str = Field("nightly-retrain", min_length=1, description="deployment name")
    work_pool: str = Field("gpu", min_length=1, description="Prefect work pool that runs the deployment")
