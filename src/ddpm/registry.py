"""The model registry: one registered model per ``tracking.registered_model``, and the champion rule.

The evaluate stage registers the run's Logged model (the EMA model, :meth:`ddpm.tracking.Run.log_model`) as a
new version (source ``models:/<model_id>``) and moves the alias ``champion`` to it only when its FID beats the
current champion's under the same evaluation protocol; otherwise the version gets ``challenger``. Registering
is idempotent, also when the client's retries repeat a create whose answer a server restart lost.
``make sample MODEL=champion`` (and any ``models:/`` or ``runs:/`` URI) fetches a registered model's file with
:func:`download_model`, which refuses a model that the project's safe loader does not load.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ddpm.config import TrackingConfig
from ddpm.tracking import MODEL_LOADER, Run, TrackingError, check_server, client, fluent_api_at, run_url

CHAMPION, CHALLENGER = "champion", "challenger"
KEY_TAG = "registration_key"  # one version per (run, model, protocol, sampler, steps): the tag that finds it again
# the evaluate result keys that define "the same protocol": FIDs are comparable only when these agree (the classes
# drawn and their guidance scale included: a guided class-balanced draw and an unconditional one are not comparable)
PROTOCOL_KEYS = ("feature_network", "feature_weights_hash", "reference", "n_ref", "n_gen", "labels", "guidance")


def model_name(cfg: TrackingConfig, dataset: str) -> str:
    """The registered model's name: ``tracking.registered_model`` or ``ddpm-<dataset>``."""
    return cfg.registered_model or f"ddpm-{dataset}"


def protocol_of(result: Mapping[str, Any]) -> dict[str, str]:
    """The evaluation protocol of an evaluate result, and its short hash ``protocol``."""
    fields = {key: str(result.get(key)) for key in PROTOCOL_KEYS}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return {**fields, "protocol": digest}


def registration_key(run_id: str, model_id: str, tags: Mapping[str, str]) -> str:
    """The short hash of (run id, Logged model id, protocol, sampler, steps) that names the registration of one of
    a run's models (its own EMA, or one rebuilt by the ema stage) under a protocol."""
    fields = [run_id, model_id, tags["protocol"], tags["sampler"], tags["steps"]]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def register(run: Run, name: str, result: Mapping[str, Any], model_id: str) -> str:
    """Register the run's Logged model ``model_id`` as a version of ``name``, tagged with FID and protocol.

    A model's evaluation under one protocol, sampler and steps registers once (its :func:`registration_key`):
    re-running evaluate updates that version's tags, and versions that a repeated create left (a lost answer,
    retried) are deleted but the lowest, so the registry ends with exactly one.
    """
    tags = {
        "fid": repr(float(result["fid"])),
        "kid": repr(float(result["kid"])),
        "sampler": str(result.get("sampler")),
        "steps": str(result.get("steps")),
        **protocol_of(result),
    }
    tags[KEY_TAG] = registration_key(run.run_id, model_id, tags)
    ensure_registered_model(run.client, name)
    versions = keyed_versions(run.client, name, run.run_id, tags[KEY_TAG])
    if not versions:
        source = f"models:/{model_id}"
        # a local (SQLite) registry looks the source model up through MLflow's default client: point it here
        with fluent_api_at(run.uri):
            run.client.create_model_version(name, source, run_id=run.run_id, tags=tags, model_id=model_id)
        versions = keyed_versions(run.client, name, run.run_id, tags[KEY_TAG])
    kept, *repeated = versions
    for version in repeated:
        delete_version(run.client, name, version.version)
    for key, value in tags.items():
        if kept.tags.get(key) != value:
            run.client.set_model_version_tag(name, kept.version, key, value)
    link_versions(run.client, name, run.run_id, model_id)
    return str(kept.version)


def ensure_registered_model(mlflow_client, name: str) -> None:
    """Create registered model ``name`` unless it exists (a retried create may find it made)."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.get_registered_model(name)
    except MlflowException:
        try:
            mlflow_client.create_registered_model(name, description="EMA denoisers of the ddpm-pipeline, by FID")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


def keyed_versions(mlflow_client, name: str, run_id: str, key: str) -> list:
    """The run's versions of ``name`` that carry registration key ``key``, lowest first."""
    found = mlflow_client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    return sorted((v for v in found if v.tags.get(KEY_TAG) == key), key=lambda v: int(v.version))


def delete_version(mlflow_client, name: str, version: str) -> None:
    """Delete a version (gone already is fine: a retried delete)."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.delete_model_version(name, str(version))
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def link_versions(mlflow_client, name: str, run_id: str, model_id: str) -> None:
    """Record the versions of ``name`` made from Logged model ``model_id`` in its ``mlflow.modelVersions`` tag,
    as ``mlflow.register_model`` does: the model's page lists them under *Registered versions*."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    source = f"models:/{model_id}"
    made = mlflow_client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    ours = [
        {"name": name, "version": v.version} for v in sorted(made, key=lambda v: int(v.version)) if v.source == source
    ]
    recorded = json.loads(mlflow_client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    linked = [entry for entry in recorded if entry.get("name") != name] + ours
    if linked != recorded:
        mlflow_client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked)})


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
    """Fetch the exported EMA model (``model.pt``) of ``models:/name@alias``, ``models:/name/3``,
    ``models:/<model_id>`` or ``runs:/<id>`` (that run's Logged model ``model``); see :func:`model_file`."""
    import mlflow

    if uri.startswith("runs:/") and uri.count("/") == 1:
        uri = uri.rstrip("/") + "/model"
    check_server(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        with fluent_api_at(tracking_uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as e:  # MlflowException, OSError: name the URI and the store
        raise TrackingError(f"cannot fetch {uri} from {tracking_uri}: {str(e).splitlines()[0]}") from None
    return model_file(local, uri)


def model_file(local: Path, uri: str) -> Path:
    """The ``model.pt`` in a downloaded model: the data file of an MLflow model that :mod:`ddpm.mlflow_model`
    loads, or the ``model.pt`` of a plain folder. An MLflow model with another loader (a pickled
    ``python_model``, code) is refused before anything in it is read; ``model.pt`` itself is read later
    with ``weights_only=True`` (:func:`ddpm.export.load_model`)."""
    if local.is_file():
        return local
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function") or {}
        if flavor.get("loader_module") != MODEL_LOADER or {"python_model", "code"} & {
            k for k, v in flavor.items() if v
        }:
            loader = flavor.get("python_model") or flavor.get("loader_module") or "no python_function flavour"
            raise TrackingError(
                f"{uri} is not a model of this project (MLmodel: {loader}); refused, nothing in it was run"
            )
        path = (local / str(flavor.get("data") or "")).resolve()
        if not path.is_file() or not path.is_relative_to(local.resolve()):
            raise TrackingError(f"{uri}: its MLmodel names no model file inside the model ({flavor.get('data')!r})")
        return path
    found = sorted(local.rglob("model.pt"))
    if not found:
        raise TrackingError(f"{uri} holds no model.pt")
    return found[0]
