"""The stages' side of MLflow tracking: open the run in ``train``, reopen it in the later stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddpm import tracking
from pipeline import params, paths

OFF = {"enabled": False}


def reopen(p: params.Params, record_path: Path = paths.RUN_RECORD) -> tracking.Run | None:
    """The run the train stage opened, or None when tracking is off (now or when the model was trained)."""
    if not p.tracking.enabled:
        return None
    record = tracking.read_run(record_path)
    if not record["enabled"]:
        print(f"tracking: the model was trained with tracking off ({record_path}); nothing logged")
        return None
    return tracking.Run(record)


def sections(raw: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The named params.yaml sections (empty ones included, so defaults are visible as such)."""
    return {name: raw.get(name) or {} for name in names}
