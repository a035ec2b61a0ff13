"""The DVC pipeline end to end: a real `dvc repro` of the smoke configuration in a temp git repo."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from pipeline import guidance, overrides

from ddpm import data, export, io

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["params.yaml", "dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore", ".gitignore"]
PROJECT_DIRS = ["pipeline", "src", "configs", "data"]

pytestmark = pytest.mark.slow


def stage_env(**extra: str) -> dict[str, str]:
    """The tests' environment (conftest.py: no telemetry, OpenMP settings) with this interpreter first on PATH, as
    `dvc` and the stages it runs need, and ``extra``."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra}


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def copy_project(dest: Path, params_text: str) -> Path:
    """Copy the project's pipeline files into ``dest`` with ``params_text`` as params.yaml (the ``smoke_params``
    fixture: configs/smoke.yaml applied), make it a git repo with one commit."""
    for name in PROJECT_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (dest / "params.yaml").write_text(params_text)
    run(["git", "init", "-q"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "smoke"], dest)
    return dest


def clone_project(source: Path, dest: Path) -> Path:
    """A copy of the project ``source`` (git repo, params, outputs, dvc.lock, DVC cache) at ``dest``, without its
    MLflow store (mlflow.db, mlartifacts/) and DVC's temp folder; the stages see the same up-to-date pipeline.

    A train stage run in the copy opens its run in the copy's own store; until then outputs/train/run.json
    names the run in ``source``'s store (absolute path), which sample and evaluate reopen and log into.
    """

    def skip(folder: str, names: list[str]) -> set[str]:
        if Path(folder) == source:
            return {"mlflow.db", "mlartifacts"} & set(names)
        return {"tmp"} & set(names) if Path(folder) == source / ".dvc" else set()

    shutil.copytree(source, dest, symlinks=True, ignore=skip)
    return dest


def ran_stages(result: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", result.stdout))


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def repro(smoke_repro, tmp_path_factory):
    """A copy of the smoke project after its first `dvc repro` (conftest.py), and that repro's result."""
    project, first = smoke_repro
    return clone_project(project, tmp_path_factory.mktemp("repro") / "project"), first


def test_repro_writes_every_output(repro):
    project, first = repro
    sweep = {"sweep@euler-5", "sweep@dpmpp_2m-5", "sweep_report"}
    assert ran_stages(first) == {"prepare", "featurizer", "train", "ema", "sample", "evaluate", "guidance"} | sweep
    out = project / "outputs"
    train, test = data.load_npz(out / "data" / "train.npz"), data.load_npz(out / "data" / "test.npz")
    assert train.images.shape[1:] == (8, 8, 1) and len(train) + len(test) == 1797
    samples = io.load_samples(out / "samples" / "samples.npz")
    assert samples.shape == (200, 8, 8, 1) and samples.dtype == np.uint8
    # params.yaml's recipe: an EDM model, drawn with Heun and churn (smoke: 10 steps, 19 network calls)
    config = export.load_model(out / "model" / "model.pt").config
    assert (config.preconditioning, config.P_mean, config.S_churn) == ("edm", -0.4, 40.0)
    meta = json.loads((out / "samples" / "meta.json").read_text())
    assert (meta["sampler"], meta["steps"], meta["nfe"]) == ("heun", 10, 19), meta
    for png in ("grid.png", "trajectory.png"):
        assert (out / "samples" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "train" / "last.ckpt").is_file() and (out / "train" / "model.pt").is_file()
    curves = (out / "train" / "curves.csv").read_text().splitlines()
    assert curves[0] == "step,loss,lr" and len(curves) > 3
    train_metrics = json.loads((out / "metrics" / "train.json").read_text())
    assert {"train_loss", "val_loss", "val_loss_ema", "images_per_second"} <= train_metrics.keys()
    evaluation = json.loads((out / "metrics" / "evaluate.json").read_text())
    assert {"fid", "kid", "n_gen", "n_ref"} <= evaluation.keys()
    assert evaluation["n_gen"] == 200 and evaluation["fid"] > 0
    # regression pin: observed 0.961 (3 epochs on the 8x8 digits); 0.5 only says it learned
    assert json.loads((out / "metrics" / "featurizer.json").read_text())["test_accuracy"] > 0.5
    assert (project / "dvc.lock").is_file()
    table = (out / "sweep_report" / "fid_vs_nfe.csv").read_text().splitlines()
    assert table[0] == "sampler,steps,nfe,fid,kid,seconds" and len(table) == 3
    assert "Best FID" in (out / "sweep_report" / "table.md").read_text()
    # an unconditional model has no guidance trade-off: the stage says so and its plot has no rows
    assert "The model is unconditional" in (out / "guidance" / "table.md").read_text()
    assert (out / "guidance" / "fid_vs_guidance.csv").read_text().splitlines() == [",".join(guidance.HEADER)]
    assert 0 < evaluation["confidence"] <= 1 and "label_accuracy" not in evaluation


def test_second_repro_runs_nothing(repro):
    project, _ = repro
    again = run(["dvc", "repro"], project)
    assert ran_stages(again) == set(), again.stdout


def test_changing_sample_steps_reruns_only_sample_and_evaluate(repro):
    project, _ = repro
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sample"]["steps"] = 5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run(["dvc", "repro"], project)
    assert ran_stages(result) == {"sample", "evaluate"}, result.stdout


def test_the_ema_length_is_chosen_after_training_without_training_again(smoke_repro, tmp_path):
    """The train stage keeps EMA snapshots (train.ema_snapshot_stds); `dvc exp run -S ema.std=...` rebuilds the
    EMA of that length from them and draws, scores and registers that model, without training again."""
    project = clone_project(smoke_repro[0], tmp_path / "project")
    out = project / "outputs"
    names = sorted(p.name for p in (out / "train" / "ema").iterdir())
    assert names == [f"std{s}-step{t:07d}.pt" for s in ("0.05", "0.1") for t in (20, 40, 60)]
    # ema.std null: the later stages draw from the training run's own EMA, the run's first Logged model
    record = json.loads((out / "train" / "run.json").read_text())
    own = json.loads((out / "model" / "ema.json").read_text())
    assert (out / "model" / "model.pt").read_bytes() == (out / "train" / "model.pt").read_bytes()
    assert own["std"] is None and own["model_id"] == record["model_id"]

    exp = run(["dvc", "exp", "run", "-S", "ema.std=0.08"], project)
    sweep = {"sweep@euler-5", "sweep@dpmpp_2m-5", "sweep_report"}
    assert ran_stages(exp) == {"ema", "sample", "evaluate", "guidance"} | sweep, exp.stdout
    made = json.loads((out / "model" / "ema.json").read_text())
    assert (made["std"], made["step"], len(made["snapshots"])) == (0.08, 60, 6) and made["profile_error"] < 0.05
    assert "ema: EMA sigma_rel 0.08 at step 60 from 6 snapshots (sigma_rel 0.05, 0.1)" in exp.stdout
    rebuilt, trained = (torch.load(out / m / "model.pt", weights_only=True)["state_dict"] for m in ("model", "train"))
    assert any(not torch.equal(rebuilt[k], trained[k]) for k in rebuilt)
    # MLflow: the rebuilt model is the run's second Logged model, the one evaluate scored and registered
    client = MlflowClient(record["tracking_uri"])
    models = {m.model_id for m in client.get_run(record["run_id"]).outputs.model_outputs}
    assert models == {record["model_id"], made["model_id"]} and made["model_id"] != record["model_id"]
    logged = client.get_logged_model(made["model_id"])  # told apart from the run's own in the UI's model list
    assert logged.name == "model-ema-0_08" and logged.params["ema.std"] == "0.08", (logged.name, logged.params)
    decision = json.loads((out / "evaluate" / "registry.json").read_text())
    version = client.get_model_version(decision["model_name"], decision["version"])
    assert version.source == f"models:/{made['model_id']}"
    assert client.get_run(record["run_id"]).data.params["ema.std"] == "0.08"


def test_the_ddpm_profile_runs_every_stage_as_an_experiment(smoke_repro, tmp_path):
    """configs/ddpm.yaml on the smoke configuration, as its header says to run it: a DDPM epsilon model with an
    exponential EMA, drawn with DPM-Solver++(2M), scored, and swept over DDIM and the EDM family's samplers."""
    project = clone_project(smoke_repro[0], tmp_path / "project")
    profile = overrides.read(ROOT / "configs" / "ddpm.yaml")
    exp = run(["dvc", "exp", "run", *overrides.set_flags(profile)], project)
    sweep = {f"sweep@{r}" for r in ("ddim-10", "ddim-25", "dpmpp_2m-10", "heun-10")} | {"sweep_report"}
    assert {"train", "ema", "sample", "evaluate"} | sweep <= ran_stages(exp), exp.stdout
    out = project / "outputs"
    config = export.load_model(out / "model" / "model.pt").config
    assert (config.preconditioning, config.prediction, config.S_churn) == ("ddpm", "epsilon", 0.0)
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["ema_std"] is None
    meta = json.loads((out / "samples" / "meta.json").read_text())
    assert (meta["sampler"], meta["steps"], meta["nfe"]) == ("dpmpp_2m", 15, 15), meta
    scores = json.loads((out / "metrics" / "evaluate.json").read_text())
    assert np.isfinite(scores["fid"]) and 0 < scores["confidence"] <= 1, scores
    table = (out / "sweep_report" / "table.md").read_text()
    assert all(name in table for name in ("ddim", "dpmpp_2m", "heun")), table


def test_files_under_data_are_a_dependency_of_prepare(smoke_repro, tmp_path):
    """data/ is a DVC dependency of prepare: a new file there reruns it, and only what its outputs change."""
    project = clone_project(smoke_repro[0], tmp_path / "project")
    (project / "data" / "notes.txt").write_text("not read by the digits data set\n")
    assert re.search(r"modified:\s+data\n", run(["dvc", "status", "prepare"], project).stdout)
    result = run(["dvc", "repro"], project)
    assert ran_stages(result) == {"prepare"}, result.stdout  # outputs/data came out the same: nothing else ran

    images = project / "data" / "images"
    rng = np.random.default_rng(0)
    for i in range(12):
        (images / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(images / f"class{i % 2}" / f"{i}.png")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(dataset="image_folder", root="data/images", image_size=8, channels=1)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def prepared() -> int:
        run(["dvc", "repro", "--single-item", "prepare"], project)
        info = json.loads((project / "outputs" / "data" / "info.json").read_text())
        return info["n_train"] + info["n_test"]

    assert prepared() == 12
    assert "Data and pipelines are up to date" in run(["dvc", "status", "prepare"], project).stdout
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(images / "class0" / "new.png")
    assert re.search(r"modified:\s+data\n", run(["dvc", "status", "prepare"], project).stdout)
    assert prepared() == 13


def test_invalid_params_fail_before_any_work_and_touch_nothing(repro):
    project, _ = repro
    before = digest(project / "outputs")
    params_text = (project / "params.yaml").read_text()
    params = yaml.safe_load(params_text)
    params["train"]["lr"] = -1
    params["data"]["seed"] = 7  # makes `prepare` the first stage to run
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = run(["dvc", "repro"], project, check=False)
    finally:
        (project / "params.yaml").write_text(params_text)
    assert result.returncode != 0
    assert "error: train.lr=-1: Input should be greater than 0" in result.stderr
    assert digest(project / "outputs") == before


def test_sample_cli_redraws_with_overrides_without_retraining(repro):
    project, _ = repro
    out = project / "redraw"
    run(
        [
            sys.executable,
            "-m",
            "pipeline.sample",
            "--steps",
            "4",
            "--n",
            "12",
            "--seed",
            "3",
            "--out",
            str(out),
            "--quiet",
        ],
        project,
    )
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["n"], meta["steps"], meta["seed"]) == (12, 4, 3)
    assert io.load_samples(out / "samples.npz").shape == (12, 8, 8, 1)
    bad = run(
        [sys.executable, "-m", "pipeline.sample", "--sampler", "heun", "--eta", "0.5", "--out", str(out)],
        project,
        check=False,
    )
    assert bad.returncode == 2 and "eta=0.5 applies to the ddim sampler only" in bad.stderr
    # the default model is an EDM one: DDIM's timesteps do not exist there, and the error lists what does
    bad = run([sys.executable, "-m", "pipeline.sample", "--sampler", "ddim", "--out", str(out)], project, check=False)
    assert bad.returncode == 2 and "sampler='ddim' needs preconditioning='ddpm'" in bad.stderr, bad.stderr


def test_killed_stage_leaves_outputs_that_dvc_still_accepts(repro):
    project, _ = repro
    samples = project / "outputs" / "samples"
    before = digest(samples)
    cmd = [sys.executable, "-m", "pipeline.sample", "--n", "200000", "--batch-size", "100", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=project, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120

    def writing() -> bool:  # mid-stream: its temp file holds bytes (a loaded machine may take seconds to the first)
        return any(p.stat().st_size > 0 for p in samples.glob(".samples.npz.*.tmp") if p.exists())

    while not writing() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    temp_files = list(samples.glob(".samples.npz.*.tmp"))
    alive = proc.poll() is None
    proc.kill()
    _, stderr = proc.communicate()
    assert alive and proc.returncode == -signal.SIGKILL, f"the stage was not running when killed: {stderr[-2000:]}"
    assert len(temp_files) == 1 and temp_files[0].stat().st_size > 0, "killed mid-write of its samples"
    after = {k: v for k, v in digest(samples).items() if not k.endswith(".tmp")}
    assert after == before, "the previous outputs are intact"
    status = run(["dvc", "status"], project)
    assert "sample" not in status.stdout, status.stdout


FAULTS = ROOT / "tests" / "faults"  # sitecustomize.py: kills or holds a stage process on request


def repro_with_faults(project: Path, **faults: str) -> subprocess.Popen:
    """Start ``dvc repro evaluate`` whose stage processes get ``faults`` (see tests/faults/sitecustomize.py)."""
    env = stage_env(PYTHONPATH=str(FAULTS), **faults)
    cmd = ["dvc", "repro", "evaluate"]
    return subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outputs_digest(folder: Path) -> dict[str, str]:
    """``digest`` of the outputs, without the temp files of interrupted atomic writes (DVC ignores them)."""
    return {k: v for k, v in digest(folder).items() if not k.endswith(".tmp")}


def stale_stages(project: Path) -> set[str]:
    return set(json.loads(run(["dvc", "status", "--json"], project).stdout))


def test_killed_stages_resume_or_rerun_and_a_second_repro_gets_the_lock_error(repro, tmp_path):
    """train, sample and evaluate each SIGKILLed under `dvc repro` mid-write; then two concurrent repros.

    After each kill the stage's outputs are the old, complete files and DVC lists the stage as not
    done; the re-run of train resumes from its checkpoint and continues the killed MLflow run (the
    project's embedded store); a killed write's temp file is swept by the next run of its stage.
    """
    project, _ = repro
    out = project / "outputs"
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"].update(seed=1, checkpoint_every=10)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    train_outs = ["last.ckpt", "model.pt", "curves.csv", "run.json"]  # run.json: written when training completes
    old_train = {name: (out / "train" / name).read_bytes() for name in train_outs}
    old_samples, old_evaluate = outputs_digest(out / "samples"), (out / "metrics" / "evaluate.json").read_bytes()

    killed = repro_with_faults(project, FAULT_KILL_AT="resume.ckpt:2")  # while writing the step-20 checkpoint
    assert killed.wait(timeout=600) != 0, killed.communicate()
    assert {name: (out / "train" / name).read_bytes() for name in train_outs} == old_train
    resume = torch.load(out / "train" / "resume.ckpt", weights_only=True)
    assert resume["global_step"] == 10
    assert "train" in stale_stages(project)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")  # tracking.uri: null, no $MLFLOW_TRACKING_URI
    experiment = client.get_experiment_by_name(raw["tracking"]["experiment"]).experiment_id
    [killed_run] = [r.info.run_id for r in client.search_runs([experiment])]

    killed = repro_with_faults(project, FAULT_KILL_AT="samples.npz:1")  # samples.npz written, not yet renamed
    stdout, stderr = killed.communicate(timeout=600)
    assert killed.returncode != 0 and "resuming from outputs/train/resume.ckpt at step 10" in stderr, stderr
    assert not (out / "train" / "resume.ckpt").exists() and json.loads((out / "metrics" / "train.json").read_text())
    assert f"tracking: continuing run {killed_run} from step 10" in stdout, stdout
    assert json.loads((out / "train" / "run.json").read_text())["run_id"] == killed_run
    runs = client.search_runs([experiment])
    assert [r.info.run_id for r in runs] == [killed_run] and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["resumed_from_step"] == "10"
    steps = {m.step for m in client.get_metric_history(killed_run, "train/loss")}
    assert max(steps) >= 50 and min(steps) <= 10, "one curve: before the kill and after the resume"
    assert outputs_digest(out / "samples") == old_samples
    assert list((out / "samples").glob(".samples.npz.*.tmp")), "the killed write's complete temp file"
    stale = stale_stages(project)
    assert {"sample", "evaluate"} <= stale and "train" not in stale

    killed = repro_with_faults(project, FAULT_KILL_AT="evaluate.json:1")
    assert killed.wait(timeout=600) != 0, killed.communicate()
    assert (out / "metrics" / "evaluate.json").read_bytes() == old_evaluate
    assert io.load_samples(out / "samples" / "samples.npz").shape == (200, 8, 8, 1)
    assert not list((out / "samples").glob(".*.tmp")), "swept by the sample stage's re-run"
    stale = stale_stages(project)
    assert "evaluate" in stale and not {"train", "sample"} & stale

    hold = tmp_path / "hold"
    first = repro_with_faults(project, FAULT_HOLD=str(hold))
    try:
        deadline = time.monotonic() + 300
        while not hold.with_name("hold.started").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        second = run(["dvc", "repro", "evaluate"], project, check=False)
    finally:
        hold.with_name("hold.release").touch()
    # DVC's lock on the outputs in use: one line naming the running `dvc repro`; nothing is touched
    assert second.returncode != 0 and "is busy, it is being blocked by" in second.stderr, second.stderr
    assert f"(PID {first.pid}): " in second.stderr and "dvc repro evaluate" in second.stderr
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert not {"train", "sample", "evaluate"} & stale_stages(project)
    assert json.loads((out / "metrics" / "evaluate.json").read_text())["n_gen"] == 200
    assert not list(out.rglob(".*.tmp")), "no temp file left anywhere"
