"""The ``schedule`` section of params.yaml: when and where the Prefect ``retrain`` deployment runs."""

from __future__ import annotations

import re
import zoneinfo

from pydantic import Field, field_validator

from ddpm.config import Config

# five cron fields of digits, names, * , - / ? L W # (Prefect checks the values when it builds the deployment)
CRON_FIELD = re.compile(r"^[0-9A-Za-z*,/\-?#]+$")


class ScheduleConfig(Config):
    """Cron schedule, deployment name and work pool of scheduled retraining."""

    cron: str = Field("0 3 * * *", description="cron expression of the retrain deployment (default nightly 03:00)")
    timezone: str = Field("UTC", description="IANA time zone of the cron schedule")
    deployment: str = Field("nightly-retrain", min_length=1, description="deployment name")
    work_pool: str = Field("gpu", min_length=1, description="Prefect work pool that runs the deployment")

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        fields = v.split()
        if len(fields) != 5 or not all(CRON_FIELD.match(f) for f in fields):
            raise ValueError("expected a cron expression of 5 fields, e.g. '0 3 * * *'")
        return v

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError("expected an IANA time zone such as 'UTC' or 'Europe/Paris'") from None
        return v
