"""The worker's pull step without Prefect: workspace slots and their locks, names, and its one-line errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ddpm import worker


def test_two_flow_runs_never_share_a_workspace(tmp_path):
    here = worker.claim(tmp_path, "project-0123abcd")
    assert here == tmp_path / "project-0123abcd-0"
    # another process (another flow run on this worker) gets the next slot while this one holds slot 0
    script = textwrap.dedent(f"""
        from pathlib import Path
        from ddpm import worker
        print(worker.claim(Path({str(tmp_path)!r}), "project-0123abcd"))
    """)
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == str(tmp_path / "project-0123abcd-1")
    # that process has exited and released slot 1; slot 0 is still held here
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert again.stdout.strip() == str(tmp_path / "project-0123abcd-1")


def test_workspace_names_are_readable_and_distinct():
    a = worker.workspace_name("https://git.example/team/ddpm.git")
    b = worker.workspace_name("https://git.example/other/ddpm.git")
    assert a.startswith("ddpm-") and b.startswith("ddpm-") and a != b
    assert worker.workspace_name("/srv/git/ddpm pipeline/").startswith("ddpm_pipeline-")


@pytest.mark.parametrize("url", [None, "", "{{ $DDPM_GIT_URL }}"])
def test_no_repository_fails_in_one_line(monkeypatch, tmp_path, url):
    monkeypatch.setenv(worker.HOME, str(tmp_path))
    monkeypatch.delenv(worker.GIT_URL, raising=False)
    if url is not None:
        monkeypatch.setenv(worker.GIT_URL, url)
    with pytest.raises(worker.CheckoutError, match=r"^no git repository: set DDPM_GIT_URL"):
        worker.checkout()
    assert not (tmp_path / "workspaces").exists() or not any((tmp_path / "workspaces").iterdir())
