"""ddpm.registry: the registered model's name and the evaluation protocol that makes FIDs comparable; against a
real `mlflow server`, registration that stays one version through repeated creates and a server restart, and
fetching a registered model that loads through the project's safe loader only.

The registry driven by the pipeline (the champion rule over three trainings, `make sample MODEL=champion`) is
in test_tracking.py.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ddpm import data, export, generate, registry, tracking
from ddpm.config import DDPMConfig, TrackingConfig, UNetConfig
from ddpm.nets import UNet
from test_tracking import Server

RESULT = {"feature_network": "classifier", "feature_weights_hash": "ab12", "reference": "test", "n_ref": 180}
RESULT = {**RESULT, "n_gen": 200, "fid": 3.5, "kid": 0.01, "sampler": "ddim", "steps": 10}


def test_model_name_defaults_to_the_dataset():
    assert registry.model_name(TrackingConfig(), "digits") == "ddpm-digits"
    assert registry.model_name(TrackingConfig(registered_model="mine"), "digits") == "mine"


def test_protocol_is_the_protocol_keys_and_their_hash():
    protocol = registry.protocol_of(RESULT)
    assert set(protocol) == {*registry.PROTOCOL_KEYS, "protocol"} and len(protocol["protocol"]) == 16
    other_run = {**RESULT, "fid": 9.0, "sampler": "heun", "steps": 25}  # scores and samplers are not the protocol
    assert registry.protocol_of(other_run) == protocol
    assert registry.protocol_of({**RESULT, "n_gen": 100})["protocol"] != protocol["protocol"]
    # the classes drawn and the guidance scale are part of it: a guided balanced draw is another protocol
    guided = registry.protocol_of({**RESULT, "labels": "balanced", "guidance": 2.0})
    assert guided["protocol"] != protocol["protocol"] and (guided["labels"], guided["guidance"]) == ("balanced", "2.0")
    assert registry.protocol_of({**RESULT, "labels": "balanced", "guidance": 4.0})["protocol"] != guided["protocol"]


def test_the_registration_key_is_the_run_model_protocol_sampler_and_steps():
    tags = {"protocol": registry.protocol_of(RESULT)["protocol"], "sampler": "ddim", "steps": "10"}
    key = registry.registration_key("run1", "m-1", tags)
    assert len(key) == 16 and key == registry.registration_key("run1", "m-1", dict(tags))
    assert key != registry.registration_key("run2", "m-1", tags)
    assert key != registry.registration_key("run1", "m-2", tags)  # another EMA of the run (the ema stage's)
    assert key != registry.registration_key("run1", "m-1", {**tags, "steps": "25"})


class Evil:
    """A pickle that writes ``marker`` when loaded by a plain unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real tracking server for this module."""
    server = Server(tmp_path_factory.mktemp("registry_server"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """An exported tiny model (8x8, 1 channel)."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(channels=16, channel_mult=(1, 2), attn_resolutions=(4,), num_heads=2, norm_groups=8,
                          image_size=8, in_channels=1))  # fmt: skip
    path = tmp_path_factory.mktemp("model") / "model.pt"
    export.save_model(path, net, DDPMConfig(image_size=8, channels=1, T=100, steps=10))
    return path


def logged_run(uri: str, model_file: Path) -> tuple[tracking.Run, str]:
    """A new run of experiment ``registry`` with the model as its Logged model: (the run, the model id)."""
    record = tracking.start_run(TrackingConfig(uri=uri, experiment="registry"), {"train": {"max_steps": 5}}, {})
    run = tracking.Run(record)
    return run, run.log_model(model_file, step=5)


def versions_of(client: MlflowClient, name: str) -> list[str]:
    return sorted((v.version for v in client.search_model_versions(f"name='{name}'")), key=int)


@pytest.mark.slow
def test_a_repeated_create_leaves_one_version_and_the_alias_applied_once(server, model_file):
    """A create_model_version whose answer was lost and that the client repeated leaves a second version with
    the same registration key: registering again keeps the lowest, deletes the other, and the champion rule
    applied again changes nothing."""
    name, client = "ddpm-repeated", MlflowClient(server.uri)
    run, model_id = logged_run(server.uri, model_file)
    first = registry.register(run, name, RESULT, model_id)
    assert registry.promote(server.uri, name, first)["alias"] == "champion"
    kept = client.get_model_version(name, first)
    assert kept.source == f"models:/{model_id}" and kept.tags[registry.KEY_TAG]
    repeated = client.create_model_version(name, kept.source, run_id=run.run_id, tags=kept.tags, model_id=model_id)
    assert versions_of(client, name) == [first, repeated.version]

    assert registry.register(run, name, {**RESULT, "fid": 3.25}, model_id) == first
    decision = registry.promote(server.uri, name, first)
    assert versions_of(client, name) == [first]
    assert decision["alias"] == "champion" and decision["reason"] == "already the champion"
    assert client.get_registered_model(name).aliases == {"champion": first}
    assert client.get_model_version(name, first).tags["fid"] == "3.25", "a re-run's scores update the version"
    linked = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert [(v["name"], str(v["version"])) for v in linked] == [(name, first)]
    other = registry.register(run, name, {**RESULT, "sampler": "heun"}, model_id)
    assert versions_of(client, name) == [first, other], "another sampler is another registration"


@pytest.mark.slow
def test_registration_through_a_server_restart_makes_one_version(server, model_file):
    """The server is down when evaluate registers and comes back on the same port and store: the client's
    retries carry the registration through, and the registry ends with exactly one new version, champion."""
    name, client = "ddpm-restart", MlflowClient(server.uri)
    run, model_id = logged_run(server.uri, model_file)
    before = versions_of(client, name) if client.search_registered_models(f"name='{name}'") else []
    outcome: dict = {}

    def evaluate_registers() -> None:
        try:
            version = registry.register(run, name, RESULT, model_id)
            outcome["decision"] = registry.promote(server.uri, name, version)
        except Exception as e:  # reported below
            outcome["error"] = e

    server.stop()
    thread = threading.Thread(target=evaluate_registers)
    thread.start()
    time.sleep(3)
    assert thread.is_alive(), "the registration waits for the server"
    server.start()
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in outcome, outcome
    new = [v for v in versions_of(client, name) if v not in before]
    assert new == [outcome["decision"]["version"]]
    assert client.get_registered_model(name).aliases == {"champion": new[0]}


@pytest.mark.slow
def test_a_registered_version_loads_through_the_safe_loader_and_as_pyfunc(server, model_file, tmp_path):
    name, before = "ddpm-load", os.environ.get("MLFLOW_TRACKING_URI")
    run, model_id = logged_run(server.uri, model_file)
    version = registry.register(run, name, RESULT, model_id)
    registry.promote(server.uri, name, version)
    path = registry.download_model(f"models:/{name}@champion", server.uri, tmp_path / "champion")
    assert path.name == "model.pt" and path.parent.name == "data"
    model = export.load_model(path)
    by_run = registry.download_model(f"runs:/{run.run_id}", server.uri, tmp_path / "run")
    assert by_run.read_bytes() == path.read_bytes() == model_file.read_bytes()
    assert os.environ.get("MLFLOW_TRACKING_URI") == before, "no tracking URI left for child processes"
    with tracking.fluent_api_at(server.uri):
        loaded = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    images = loaded.predict({"n": 3, "seed": 7, "sampler": "ddim"})
    expected = generate.sample(model.net, generate.plan(model.config, "ddim"), 3, seed=7)
    assert images.dtype == np.uint8 and images.shape == (3, 8, 8, 1)
    assert np.array_equal(images, data.from_tensor(expected))


def crafted_version(client: MlflowClient, name: str, files: dict[str, bytes], folder: Path) -> str:
    """A version of ``name`` whose files are ``files`` (relative path -> bytes), as anyone with write access to
    the registry could make it."""
    for relative, content in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(content)
    experiment = client.get_experiment_by_name("registry").experiment_id
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(folder), "crafted")
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    source = f"{run.info.artifact_uri}/crafted"
    return client.create_model_version(name, source, run_id=run.info.run_id).version


@pytest.mark.slow
def test_a_crafted_pickle_in_a_model_version_is_refused_and_runs_nothing(server, model_file, tmp_path):
    """Two crafted versions: our MLmodel with a model.pt that pickles code, and an MLmodel that names a pickled
    python_model. Fetching and loading refuses both; neither writes its marker."""
    client = MlflowClient(server.uri)
    logged_run(server.uri, model_file)  # the experiment
    ours = (registry.MODEL_LOADER, "data/model.pt")
    mlmodel = "flavors:\n  python_function:\n    loader_module: {}\n    data: {}\n".format(*ours)
    armed = tmp_path / "armed"
    torch.save({"format": "ddpm-model/1", "net": Evil(armed)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)  # a plain load runs the payload: the file is armed
    assert armed.exists()

    marker = tmp_path / "pwned"
    torch.save({"format": "ddpm-model/1", "net": Evil(marker)}, tmp_path / "evil.pt")
    files = {"MLmodel": mlmodel.encode(), "data/model.pt": (tmp_path / "evil.pt").read_bytes()}
    version = crafted_version(client, "crafted-weights", files, tmp_path / "weights")
    path = registry.download_model(f"models:/crafted-weights/{version}", server.uri, tmp_path / "dl1")
    with pytest.raises(ValueError, match="refused to load this model: it pickles (builtins.)?exec"):
        export.load_model(path)

    pyfunc = "flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.model\n"
    pyfunc += "    python_model: python_model.pkl\n"
    files = {"MLmodel": pyfunc.encode(), "python_model.pkl": pickle.dumps(Evil(marker)), "data/model.pt": b""}
    version = crafted_version(client, "crafted-pyfunc", files, tmp_path / "pyfunc")
    with pytest.raises(tracking.TrackingError, match=r"not a model of this project \(MLmodel: python_model.pkl\)"):
        registry.download_model(f"models:/crafted-pyfunc/{version}", server.uri, tmp_path / "dl2")
    assert not marker.exists(), "nothing in a crafted version was run"
