"""The skip policy under CI=true and the kernels' summary line (``tests/ci_skips.py``), on test files of their own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ci_skips
from conftest import needs_native

TESTS = Path(__file__).resolve().parent

SAMPLE = textwrap.dedent(
    f"""
    import pytest

    def test_runs():
        pass

    def test_needs_a_package():
        pytest.importorskip("no_such_package_of_the_install")

    @pytest.fixture
    def data():
        pytest.skip("the data set is not installed")

    def test_needs_data(data):
        pass

    @pytest.mark.skipif(True, reason={ci_skips.NOT_LINUX!r})
    def test_needs_linux():
        pass

    @pytest.mark.xfail(reason="a known bug")
    def test_known_bug():
        assert False
    """
)


def pytest_run(folder: Path, code: str, ci: str | None, *args: str) -> subprocess.CompletedProcess:
    """pytest with only the ci_skips plugin on a file holding ``code``, with CI set to ``ci`` (or unset)."""
    (folder / "test_sample.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(TESTS)}
    if ci is not None:
        env["CI"] = ci
    cmd = [sys.executable, "-m", "pytest", "-p", "ci_skips", "-p", "no:cacheprovider", "-q", "-rfEs", *args]
    cmd.append("test_sample.py")
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def test_off_ci_a_skip_is_a_skip(tmp_path):
    done = pytest_run(tmp_path, SAMPLE, None)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 3 skipped, 1 xfailed" in done.stdout


def test_on_ci_a_skip_fails_the_run_unless_its_reason_is_allowed(tmp_path):
    done = pytest_run(tmp_path, SAMPLE, "true")
    assert done.returncode == 1, done.stdout
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed, 1 error" in done.stdout  # the fixture's skip is an error
    assert "skipped under CI=true: could not import 'no_such_package_of_the_install'" in done.stdout
    assert "skipped under CI=true: the data set is not installed" in done.stdout
    assert re.search(rf"SKIPPED \[1\] test_sample.py:\d+: {ci_skips.NOT_LINUX}\n", done.stdout), done.stdout


@needs_native
@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "xdist"])
def test_a_run_that_used_the_kernels_names_their_instruction_set_path(tmp_path, workers):
    code = "from ddpm import kernels\n\ndef test_kernels():\n    assert kernels.extension() is not None\n"
    done = pytest_run(tmp_path, code, None, *workers)
    assert done.returncode == 0, done.stdout
    [line] = [line for line in done.stdout.splitlines() if line.startswith("native kernels: ")]
    assert re.match(r"native kernels: (avx512|avx2|portable) vector path \(", line), line
    assert "native kernels" not in pytest_run(tmp_path, "def test_nothing():\n    pass\n", None).stdout
