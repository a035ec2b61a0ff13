"""Fault injection: preemption and exact resume, disk full, nan/inf losses, malicious and corrupt files, bad params.

The training runs are ``tests/fault_train.py`` (40 steps of a tiny U-Net on 360 8x8 digits), in-process
or as real processes that get killed. The DVC-level faults (stages killed mid-write, two concurrent
``dvc repro``) are in ``test_pipeline.py``, which owns the real DVC project; the train stage's CLI under a
file-size limit and a diverging learning rate in ``test_train_cli.py``.
"""

from __future__ import annotations

import logging
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

import fault_train
from ddpm import checkpoints, data, ema, export, fit, io
from ddpm.config import ConfigError, TrainConfig
from ddpm.module import DiffusionModule

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().parent / "fault_train.py"


pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory) -> tuple[dict, Path]:
    """The uninterrupted run: its metrics and output folder."""
    out = tmp_path_factory.mktemp("reference")
    return fault_train.run(digits, out), out


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_run(a: Path, b: Path) -> None:
    """Two output folders hold bit-identical weights, EMA, optimizer, lr_scheduler, step and curves."""
    ca, cb = load(a / "last.ckpt"), load(b / "last.ckpt")
    assert (ca["global_step"], ca["epoch"]) == (cb["global_step"], cb["epoch"])
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for key in ca["state_dict"]:  # the net and its EMA copy
        assert torch.equal(ca["state_dict"][key], cb["state_dict"][key]), key
    sa, sb = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for name in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][name]), torch.as_tensor(sb[i][name])), (i, name)
    assert ca["lr_schedulers"] == cb["lr_schedulers"]
    ma, mb = load(a / "model.pt")["state_dict"], load(b / "model.pt")["state_dict"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert (a / "curves.csv").read_text() == (b / "curves.csv").read_text()
    snapshots = sorted(p.name for p in (a / "ema").iterdir())
    assert snapshots == sorted(p.name for p in (b / "ema").iterdir()) and len(snapshots) == 2 * 5  # 8, 16, ..., 40
    for name in snapshots:
        sa, sb = load(a / "ema" / name)["state_dict"], load(b / "ema" / name)["state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def same_metrics(a: dict, b: dict) -> bool:
    timing = {"seconds", "images_per_second"}
    return {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}


class SigtermAt(pl.Callback):
    """Send this process a SIGTERM at the end of optimizer step ``step`` (as a preempting scheduler would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


# --------------------------------------------------------------------------- preemption and exact resume


@pytest.mark.slow
@pytest.mark.parametrize("step", [13, 11])  # mid-epoch; the last batch of the first epoch (11 batches of 32)
def test_sigterm_checkpoints_then_a_rerun_resumes_bit_identically(digits, reference, tmp_path, caplog, step):
    ref_metrics, ref_out = reference
    with pytest.raises(SystemExit) as stopped:
        fault_train.run(digits, tmp_path, callbacks=(SigtermAt(step),))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert f"stopped by SIGTERM at step {step}" in str(stopped.value) and "run again to resume" in str(stopped.value)
    assert sorted(os.listdir(tmp_path)) == ["ema.partial", "resume.ckpt"], "no outputs, no temp files"
    partial = ema.snapshot_files(tmp_path / "ema.partial")  # the unfinished run's, kept for its resume
    assert [p.name for p in partial] == ["std0.05-step0000008.pt", "std0.1-step0000008.pt"]
    assert load(tmp_path / "resume.ckpt")["global_step"] == step

    first = fault_train.FirstStep()
    with caplog.at_level(logging.WARNING, logger="ddpm.fit"):
        metrics = fault_train.run(digits, tmp_path, callbacks=(first,))
    assert first.step == step and f"resuming from {tmp_path / 'resume.ckpt'} at step {step}" in caplog.text
    assert same_metrics(metrics, ref_metrics)
    assert_same_run(ref_out, tmp_path)
    assert not (tmp_path / "resume.ckpt").exists(), "a completed run removes its resume checkpoint"


@pytest.mark.slow
def test_sigkill_mid_run_or_mid_checkpoint_then_resume_is_bit_identical(digits, reference, tmp_path):
    """Real processes: one SIGKILLed from outside at an arbitrary step, one killed inside a checkpoint write."""
    outside, inside = tmp_path / "outside", tmp_path / "inside"
    cmd = [sys.executable, str(SCRIPT), str(digits)]
    with open(tmp_path / "outside.log", "w") as log_a, open(tmp_path / "inside.log", "w") as log_b:
        victim = subprocess.Popen([*cmd, str(outside), "--sleep", "0.15"], stdout=log_a, stderr=log_a)
        dying = subprocess.Popen([*cmd, str(inside), "--die-at-checkpoint", "3"], stdout=log_b, stderr=log_b)
    try:
        deadline = time.monotonic() + 240
        while not (outside / "resume.ckpt").exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(float(np.random.default_rng().uniform(0.0, 1.0)))  # an arbitrary step after a checkpoint
        victim.kill()
        assert dying.wait(timeout=240) == -signal.SIGKILL
    finally:
        victim.kill()
        dying.kill()
    assert victim.wait() == -signal.SIGKILL, "killed before it finished"
    assert not (outside / "last.ckpt").exists()
    # the process that died inside its third checkpoint write left the second one intact, plus its temp file
    assert load(inside / "resume.ckpt")["global_step"] == 10
    assert [p.name.startswith(".resume.ckpt.") and p.suffix == ".tmp" for p in inside.iterdir()].count(True) == 1

    for out in (outside, inside):
        resumed = fit.resume_checkpoint(
            out,
            data.load_npz(digits / "train.npz"),
            data.load_npz(digits / "test.npz"),
            fault_train.MODEL,
            fault_train.DIFFUSION,
            TrainConfig(**fault_train.TRAIN),
        )
        assert resumed is not None and 5 <= resumed.step < 40
        first = fault_train.FirstStep()
        fault_train.run(digits, out, callbacks=(first,))
        assert first.step == resumed.step
        assert_same_run(reference[1], out)
        swept = ["curves.csv", "ema", "last.ckpt", "model.pt"]
        assert sorted(p.name for p in out.iterdir()) == swept, "temp files swept"


@pytest.mark.slow
def test_a_resume_checkpoint_is_used_only_by_the_run_it_belongs_to(digits, tmp_path, caplog):
    with pytest.raises(SystemExit):
        fault_train.run(digits, tmp_path, callbacks=(SigtermAt(3),))
    train_set, test_set = data.load_npz(digits / "train.npz"), data.load_npz(digits / "test.npz")

    def resume(train_set=train_set, **changes):
        cfg = TrainConfig(**{**fault_train.TRAIN, **changes})
        return fit.resume_checkpoint(tmp_path, train_set, test_set, fault_train.MODEL, fault_train.DIFFUSION, cfg)

    found = resume()
    assert found.path == tmp_path / "resume.ckpt" and found.step == 3 and found.logger_version is None
    # settings that cannot change the weights keep it valid
    assert resume(checkpoint_every=7, nonfinite="skip", num_workers=1).step == 3
    # anything else makes it another run's
    assert resume(lr=1e-3) is None and resume(max_steps=41) is None and resume(seed=1) is None
    assert resume(train_set=train_set.subset(np.arange(len(train_set) - 1))) is None

    first = fault_train.FirstStep()
    with caplog.at_level(logging.WARNING, logger="ddpm.fit"):
        fault_train.run(digits, tmp_path, callbacks=(first,), lr=1e-3, max_steps=6)
    assert first.step == 0 and "ignoring" in caplog.text and "another run's" in caplog.text
    assert not (tmp_path / "resume.ckpt").exists()


# --------------------------------------------------------------------------- disk full


class FileSizeLimit(pl.Callback):
    """After the first checkpoint, let no file grow past half its size: the next write fails midway (EFBIG)."""

    def __init__(self, path: Path) -> None:
        self.path, self.saved, self.limits = path, None, resource.getrlimit(resource.RLIMIT_FSIZE)

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.saved is None and self.path.exists():
            self.saved = self.path.read_bytes()
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write() instead of a killed process
            resource.setrlimit(resource.RLIMIT_FSIZE, (len(self.saved) // 2, self.limits[1]))

    def lift(self) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, self.limits)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_fails_clearly_and_keeps_the_previous_checkpoint(digits, reference, tmp_path):
    limit = FileSizeLimit(tmp_path / "resume.ckpt")
    try:
        with pytest.raises(OSError, match=r"cannot write checkpoint .*resume\.ckpt: File too large; the previous"):
            fault_train.run(digits, tmp_path, callbacks=(limit,))
    finally:
        limit.lift()
    assert (tmp_path / "resume.ckpt").read_bytes() == limit.saved, "the step-5 checkpoint is untouched"
    assert sorted(os.listdir(tmp_path)) == ["ema.partial", "resume.ckpt"], "the partial temp file is gone"
    fault_train.run(digits, tmp_path)  # space again: resumes from step 5
    assert_same_run(reference[1], tmp_path)


# --------------------------------------------------------------------------- malicious, corrupt and mismatched files


class CreatesFile:
    """Unpickling this calls open(marker, "w"), creating the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def model_files(reference) -> dict[str, Path]:
    return {"model": reference[1] / "model.pt", "checkpoint": reference[1] / "last.ckpt"}


def loaders(tmp_path: Path, digits: Path):
    """Each loader of a weights file: name -> function of a path."""
    train_set, test_set = data.load_npz(digits / "train.npz"), data.load_npz(digits / "test.npz")
    cfg = TrainConfig(**fault_train.TRAIN)
    key = fit.fingerprint(train_set, test_set, fault_train.MODEL, fault_train.DIFFUSION, cfg)
    return {
        "model": export.load_model,
        "payload": lambda p: io.load_payload(p, "model", {"format"}),
        "checkpoint": DiffusionModule.from_checkpoint,
        "resume": lambda p: checkpoints.read_resume(p, key),
    }


def test_a_pickle_that_runs_code_is_refused_by_every_loader_and_runs_nothing(tmp_path, digits):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"format": export.MODEL_FORMAT, "state_dict": CreatesFile(marker), "hyper_parameters": {}}, evil)
    for name, load_fn in loaders(tmp_path, digits).items():
        with pytest.raises(
            io.UnsafeFileError, match=r"evil\.pt: refused to load this .*: it pickles io\.open, which could run code"
        ):
            load_fn(evil)
        assert not marker.exists(), name
    with pytest.raises(pickle.UnpicklingError):  # also what pickle-aware callers catch
        DiffusionModule.from_checkpoint(evil)
    torch.load(evil, weights_only=False)  # control: an unsafe load does run it
    assert marker.exists()


@pytest.mark.slow
def test_the_sample_cli_refuses_a_malicious_model_in_one_line(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"format": export.MODEL_FORMAT, "net": CreatesFile(marker)}, tmp_path / "evil.pt")
    cmd = [sys.executable, "-m", "pipeline.sample", "--model", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "s")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "evil.pt: refused to load this model" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "s").exists()


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["model", "payload", "checkpoint", "resume"])
def test_truncated_or_garbage_weights_files_get_one_error_naming_them(tmp_path, digits, model_files, loader):
    load_fn = loaders(tmp_path, digits)[loader]
    source = model_files["checkpoint" if loader in ("checkpoint", "resume") else "model"].read_bytes()
    for name, content in [("cut.pt", source[: len(source) // 2]), ("junk.pt", os.urandom(300)), ("empty.pt", b"")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(
            ValueError, match=rf"{name}: (not a readable .*file: corrupt or|refused .*: corrupt, or)"
        ) as e:
            load_fn(tmp_path / name)
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_weights_of_another_network_config_name_the_file_and_the_mismatch(tmp_path, model_files):
    payload = load(model_files["model"])
    payload["net"] = {**payload["net"], "channels": 32}  # the weights are of a 16-channel net
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(
        ValueError, match=r"other\.pt: the model weights do not match its network config: size mismatch"
    ):
        export.load_model(tmp_path / "other.pt")

    ckpt = load(model_files["checkpoint"])
    ckpt["hyper_parameters"]["net"]["channel_mult"] = [1, 2, 2]  # one more level than the weights have
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"other\.ckpt: the checkpoint weights do not match .*(Missing|Unexpected)"):
        DiffusionModule.from_checkpoint(tmp_path / "other.ckpt")

    ckpt["hyper_parameters"]["net"]["channels"] = -4
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(ConfigError, match=r"bad\.ckpt: net\.channels=-4: Input should be greater than 0"):
        DiffusionModule.from_checkpoint(tmp_path / "bad.ckpt")

    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "ours.ckpt")
    with pytest.raises(ValueError, match=r"ours\.ckpt: not a resume checkpoint .*delete it"):
        checkpoints.read_resume(tmp_path / "ours.ckpt", "0" * 64)


@pytest.mark.parametrize(
    ("array", "error"),
    [
        (np.zeros((4, 8, 8, 1), np.float32), "must be uint8 .* got float32"),
        (np.zeros((4, 8, 8), np.uint8), r"must be uint8 \[N, H, W, C\] .* got uint8 \(4, 8, 8\)"),
        (np.zeros((4, 8, 8, 2), np.uint8), r"C in \(1, 3\), got uint8 \(4, 8, 8, 2\)"),
        (np.array([{"a": 1}], dtype=object), "Object arrays cannot be loaded"),
    ],
)
def test_samples_npz_of_wrong_dtype_or_shape_name_the_file(tmp_path, array, error):
    np.savez(tmp_path / "samples.npz", arr_0=array)
    with pytest.raises(ValueError, match=rf"samples\.npz: .*{error}|{error}.*samples\.npz"):
        io.load_samples(tmp_path / "samples.npz")


def test_image_set_npz_of_wrong_dtype_shape_or_truncated_name_the_file(tmp_path):
    good = tmp_path / "good.npz"
    data.save_npz(good, data.ImageSet(np.zeros((3, 4, 4, 1), np.uint8), np.zeros(3, np.int64), ["a"]))
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:-60])
    cases = {
        "cut.npz": None,
        "dtype.npz": {"images": np.zeros((3, 4, 4, 1), np.float64), "labels": np.zeros(3, np.int64)},
        "shape.npz": {"images": np.zeros((3, 4, 4), np.uint8), "labels": np.zeros(3, np.int64)},
        "labels.npz": {"images": np.zeros((3, 4, 4, 1), np.uint8), "labels": np.zeros(2, np.int64)},
    }
    for name, arrays in cases.items():
        if arrays is not None:
            np.savez(tmp_path / name, classes=np.array(["a"]), **arrays)
        with pytest.raises(ValueError, match=rf"{name}: not a valid image-set npz") as e:
            data.load_npz(tmp_path / name)
        assert "\n" not in str(e.value)
