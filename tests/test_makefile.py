"""Makefile targets hand their arguments over intact: run with a stand-in for the tool they call."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline import overrides

ROOT = Path(__file__).resolve().parents[1]


def stand_in(path: Path, code: str) -> None:
    """An executable at ``path`` that runs ``code`` (Python) with the arguments it was given."""
    path.write_text(f"#!/bin/sh\nexec {sys.executable} -c '{code}' \"$@\"\n")
    path.chmod(0o755)


def make_smoke(bin_dir: Path, env: dict) -> subprocess.CompletedProcess:
    """`make smoke` with ``bin_dir`` first on the recipe's PATH (the venv's install step taken as done)."""
    env = {**os.environ, **env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = ["make", "-s", "-o", "install", "smoke", f"VENV={sys.prefix}", f"RUN=PATH={bin_dir}:$$PATH"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


RECORD_ARGS = 'import json, os, sys; json.dump(sys.argv[1:], open(os.environ["DVC_ARGS_OUT"], "w"))'


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_smoke_passes_each_override_to_dvc_as_one_argument(tmp_path):
    """`make smoke` is `dvc exp run` with the smoke configuration's -S flags; values with spaces (`[1, 2]`) must
    stay one argument each. A stand-in `dvc` first on PATH records the arguments it got."""
    bin_dir, out = tmp_path / "bin", tmp_path / "args.json"
    bin_dir.mkdir()
    stand_in(bin_dir / "dvc", RECORD_ARGS)
    done = make_smoke(bin_dir, {"DVC_ARGS_OUT": str(out)})
    assert done.returncode == 0, done.stderr
    smoke = overrides.read(ROOT / "configs" / "smoke.yaml")
    assert json.loads(out.read_text()) == ["exp", "run", *overrides.set_flags(smoke)]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_smoke_stops_when_the_overrides_cannot_be_read(tmp_path):
    """A failing `python -m pipeline.overrides` stops the target: dvc never runs the default pipeline instead."""
    bin_dir, out = tmp_path / "bin", tmp_path / "args.json"
    bin_dir.mkdir()
    stand_in(bin_dir / "dvc", RECORD_ARGS)
    stand_in(bin_dir / "python", 'import sys; sys.exit("error: configs/smoke.yaml: unreadable")')
    done = make_smoke(bin_dir, {"DVC_ARGS_OUT": str(out)})
    assert done.returncode != 0 and "configs/smoke.yaml: unreadable" in done.stderr
    assert not out.exists(), "dvc ran without the smoke overrides"
