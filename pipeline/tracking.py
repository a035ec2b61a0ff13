"""The stages' side of MLflow tracking: open the run in ``train``, reopen it in the later stages."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpm import tracking
from pipeline import params, paths

if TYPE_CHECKING:
    from ddpm.data import ImageSet

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


def dataset_inputs(dataset: str, splits: dict[str, ImageSet], hashes: dict[str, str]) -> list:
    """The splits as the run's MLflow dataset inputs: ``<dataset>-<split>``, context the split, digest the
    split's content hash, source its file under ``outputs/data``."""
    return [
        tracking.dataset_input(
            f"{dataset}-{name}", name, split.images, split.labels, hashes[name], paths.split(name).resolve()
        )
        for name, split in splits.items()
    ]
