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


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_smoke_passes_each_override_to_dvc_as_one_argument(tmp_path):
    """`make smoke` is `dvc exp run` with the smoke configuration's -S flags; values with spaces (`[1, 2]`) must
    stay one argument each. A stand-in `dvc` first on PATH records the arguments it got."""
    bin_dir, out = tmp_path / "bin", tmp_path / "args.json"
    bin_dir.mkdir()
    stand_in = bin_dir / "dvc"
    stand_in.write_text(
        f"#!/bin/sh\nexec {sys.executable} -c "
        '\'import json, os, sys; json.dump(sys.argv[1:], open(os.environ["DVC_ARGS_OUT"], "w"))\' "$@"\n'
    )
    stand_in.chmod(0o755)
    env = {**os.environ, "DVC_ARGS_OUT": str(out), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = ["make", "-s", "-o", "install", "smoke", f"VENV={sys.prefix}", f"RUN=PATH={bin_dir}:$$PATH"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    smoke = overrides.read(ROOT / "configs" / "smoke.yaml")
    assert json.loads(out.read_text()) == ["exp", "run", *overrides.set_flags(smoke)]
