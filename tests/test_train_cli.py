"""The train stage's CLI (``python -m pipeline.train``) in a process of its own, failing for real: a file-size limit
(``RLIMIT_FSIZE``: a write past it fails with EFBIG, as one on a full disk fails with ENOSPC) and a learning rate that
diverges. Each run fails with one ``error:`` line and exit status 2, and leaves the previous outputs as they were:
no half file, no temp file.
"""

from __future__ import annotations

import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_pipeline import ROOT, digest, stage_env

pytestmark = pytest.mark.slow

CHECKPOINT_BYTES = 3_000_000  # about the size of the smoke model's resume checkpoint (weights, EMA, AdamW state)


def train(root: Path, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """``python -m pipeline.train`` in ``root``; with ``max_file_bytes``, no file it writes may grow past that."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write(), as on a full disk, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    cmd = [sys.executable, "-m", "pipeline.train"]
    preexec = None if max_file_bytes is None else limit
    return subprocess.run(
        cmd, cwd=root, env=stage_env(), capture_output=True, text=True, timeout=600, preexec_fn=preexec
    )


def set_train(root: Path, **changes) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(changes)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def trained(smoke_params, digits, tmp_path_factory) -> Path:
    """A stage folder (pipeline/, params.yaml on the smoke configuration with 6 steps and tracking off, the 8x8
    digits as outputs/data) after one completed train stage: the previous outputs of the tests' runs."""
    root = tmp_path_factory.mktemp("train_cli")
    shutil.copytree(ROOT / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load(smoke_params)
    params["tracking"]["enabled"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    set_train(root, max_steps=6, warmup_steps=2, checkpoint_every=3, val_every=6, log_every=2)
    shutil.copytree(digits, root / "outputs" / "data")
    done = train(root)  # also builds the native kernels, where they build, before any run under a limit
    assert done.returncode == 0, done.stderr
    assert (root / "outputs" / "train" / "last.ckpt").stat().st_size > CHECKPOINT_BYTES // 2
    return root


def project(trained: Path, dest: Path, **train_changes) -> Path:
    """A copy of the trained stage folder with ``train_changes`` in its params (another run: nothing to resume)."""
    root = shutil.copytree(trained, dest / "project")
    set_train(root, **train_changes)
    return root


def error_line(result: subprocess.CompletedProcess) -> str:
    """The run's one-line error (the last line on stderr, after Lightning's notices), checked to be the only one."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and [line for line in lines if line.startswith("error: ")] == lines[-1:]
    return lines[-1]


def test_a_write_past_the_file_size_limit_fails_in_one_line_and_leaves_the_previous_outputs(trained, tmp_path):
    root = project(trained, tmp_path, seed=1)
    before = digest(root / "outputs")
    result = train(root, max_file_bytes=CHECKPOINT_BYTES // 3)  # the first resume checkpoint cannot be written
    line = error_line(result)
    assert re.fullmatch(
        r"error: (\[Errno 27\] )?cannot write checkpoint outputs/train/resume\.ckpt: File too large; "
        r"the previous resume\.ckpt, if any, is intact",
        line,
    ), line
    assert digest(root / "outputs") == before, "the previous outputs unchanged, no new or temp file"


def test_a_diverging_learning_rate_fails_in_one_line_and_keeps_only_the_last_checkpoint(trained, tmp_path):
    root = project(trained, tmp_path, lr=1e20, checkpoint_every=1)
    before = digest(root / "outputs")
    line = error_line(train(root))
    found = re.fullmatch(
        r"error: loss is (nan|inf) at optimizer step (\d+); training stopped; outputs/train/resume\.ckpt \(step (\d+)\)"
        r" is kept, the last checkpoint before it; lower train\.lr, or set train\.nonfinite: skip .*",
        line,
    )
    assert found, line
    bad_step, kept_step = int(found.group(2)), int(found.group(3))
    assert torch.load(root / "outputs/train/resume.ckpt", weights_only=False)["global_step"] == kept_step < bad_step
    after = digest(root / "outputs")
    assert {k: v for k, v in after.items() if k != "train/resume.ckpt"} == before, "nothing else written"
