"""The ``tracking`` section: where MLflow runs go and what the model registry calls the model."""

from __future__ import annotations

from pydantic import Field

from ddpm.config.base import Config


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
