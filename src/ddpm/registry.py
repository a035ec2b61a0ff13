"""The model registry: one registered model per ``tracking.registered_model``, and the champion rule.

The evaluate stage adds the EMA model of the pipeline's run as a new version and moves the alias ``champion``
to it only when its FID beats the current champion's under the same evaluation protocol; otherwise the version
gets ``challenger``. ``make sample MODEL=champion`` (and any ``models:/`` or ``runs:/`` URI) fetches a
registered model with :func:`download_model`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ddpm.config import TrackingConfig
from ddpm.tracking import Run, TrackingError, check_reachable, client, run_url

CHAMPION, CHALLENGER = "champion", "challenger"
# the evaluate result keys that define "the same protocol": FIDs are comparable only when these agree
PROTOCOL_KEYS = ("feature_network", "feature_weights_hash", "reference", "n_ref", "n_gen")


def model_name(cfg: TrackingConfig, dataset: str) -> str:
    """The registered model's name: ``tracking.registered_model`` or ``ddpm-<dataset>``."""
    return cfg.registered_model or f"ddpm-{dataset}"


def protocol_of(result: Mapping[str, Any]) -> dict[str, str]:
    """The evaluation protocol of an evaluate result, and its short hash ``protocol``."""
    fields = {key: str(result[key]) for key in PROTOCOL_KEYS}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return {**fields, "protocol": digest}


def register(run: Run, name: str, result: Mapping[str, Any], artifact_path: str = "model") -> str:
    """Register the run's ``artifact_path`` as a new version of ``name``, tagged with FID and protocol.

    A run's evaluation under one protocol registers once: re-running evaluate with the same protocol and
    sampler updates that version's tags instead of adding a version.
    """
    from mlflow.exceptions import MlflowException

    tags = {
        "fid": repr(float(result["fid"])),
        "kid": repr(float(result["kid"])),
        "sampler": str(result.get("sampler")),
        "steps": str(result.get("steps")),
        **protocol_of(result),
    }
    try:
        run.client.get_registered_model(name)
    except MlflowException:
        run.client.create_registered_model(name, description="EMA denoisers of the ddpm-pipeline, by FID")
    for version in run.client.search_model_versions(f"name='{name}' and run_id='{run.run_id}'"):
        same = version.tags.get("protocol") == tags["protocol"] and version.tags.get("sampler") == tags["sampler"]
        if same and version.tags.get("steps") == tags["steps"]:
            for key, value in tags.items():
                run.client.set_model_version_tag(name, version.version, key, value)
            return str(version.version)
    source = f"{run.client.get_run(run.run_id).info.artifact_uri}/{artifact_path}"
    version = run.client.create_model_version(name, source, run_id=run.run_id, tags=tags)
    return str(version.version)


def promote(tracking_uri: str, model_name: str, version: str) -> dict[str, Any]:
    """Apply the champion rule to ``version`` (idempotent) and return the decision.

    ``champion`` moves to ``version`` only if there is no champion yet, or if the version's FID is lower
    than the champion's under the same protocol; otherwise ``challenger`` points to it.
    """
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    candidate = mlflow_client.get_model_version(model_name, str(version))
    fid = float(candidate.tags["fid"])
    try:
        champion = mlflow_client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        champion = None
    champion_fid = float(champion.tags["fid"]) if champion is not None else None
    if champion is None:
        promoted, reason = True, "no champion yet"
    elif str(champion.version) == str(version):
        promoted, reason = True, "already the champion"
    elif champion.tags.get("protocol") != candidate.tags.get("protocol"):
        promoted, reason = False, "evaluated under a different protocol than the champion"
    elif fid < champion_fid:
        promoted, reason = True, f"FID {fid:.4f} beats the champion's {champion_fid:.4f}"
    else:
        promoted, reason = False, f"FID {fid:.4f} does not beat the champion's {champion_fid:.4f}"
    alias = CHAMPION if promoted else CHALLENGER
    mlflow_client.set_registered_model_alias(model_name, alias, str(version))
    if promoted:
        try:  # the version that lost champion is no longer the one to compare against
            if mlflow_client.get_model_version_by_alias(model_name, CHALLENGER).version == str(version):
                mlflow_client.delete_registered_model_alias(model_name, CHALLENGER)
        except MlflowException:
            pass
    run = mlflow_client.get_run(candidate.run_id)
    return {
        "enabled": True,
        "model_name": model_name,
        "version": str(version),
        "alias": alias,
        "promoted": promoted,
        "reason": reason,
        "fid": fid,
        "champion_fid": champion_fid,
        "run_id": candidate.run_id,
        "run_url": run_url(tracking_uri, run.info.experiment_id, candidate.run_id),
    }


def download_model(uri: str, tracking_uri: str, dst: str | Path) -> Path:
    """Fetch an exported EMA model (``model.pt``) from ``models:/name@alias``, ``models:/name/3`` or ``runs:/id``.

    A ``runs:/<id>`` URI without a path means that run's ``model`` artifact folder.
    """
    import mlflow

    if uri.startswith("runs:/") and uri.count("/") == 1:
        uri = uri.rstrip("/") + "/model"
    check_reachable(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as e:  # MlflowException, OSError: name the URI and the store
        raise TrackingError(f"cannot fetch {uri} from {tracking_uri}: {str(e).splitlines()[0]}") from None
    found = [local] if local.is_file() else sorted(local.rglob("model.pt"))
    if not found:
        raise TrackingError(f"{uri} holds no model.pt")
    return found[0]
