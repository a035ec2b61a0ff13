"""The team stack for the tests: started once per session with the code of ``make stack-up``, on free ports.

Registered as a pytest plugin (conftest.py's ``pytest_plugins``) so every test module shares one stack. Where a
server program is missing the tests skip, except under ``CI=true``, where they fail: CI installs them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from pipeline import servers, stack


@dataclass
class TeamStack:
    stack: stack.Stack
    env: dict[str, str]  # the client environment `make stack-env` prints
    creds: dict[str, str]

    @property
    def root(self) -> Path:
        return self.stack.root

    def server(self, name: str):
        return next(s for s in self.stack.servers(self.creds) if s.name == name)

    def restart(self, name: str) -> None:
        """Stop one server and start it again on the same port and data (``up`` starts what is not running)."""
        self.server(name).stop()
        self.stack.up(say=lambda line: None)

    def cli(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """``python -m pipeline.stack ARGS --root <this stack>``, as ``make stack-*`` runs it."""
        cmd = [sys.executable, "-m", "pipeline.stack", *args, "--root", str(self.root)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env or os.environ.copy(), cwd=cwd, timeout=600)

    def secrets(self) -> list[str]:
        return [v for k, v in self.creds.items() if "PASSWORD" in k or "SECRET" in k]


def missing_program() -> str | None:
    try:
        stack.check_programs()
    except servers.StackError as e:
        return str(e)
    return None


@pytest.fixture(scope="session")
def team_stack():
    missing = missing_program()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"team stack: {missing}")
        pytest.skip(f"team stack: {missing}")
    # under /tmp, traversable by the postgres user (pytest's own temp folders are private to their owner)
    base = Path(tempfile.mkdtemp(prefix="ddpm-stack-"))
    base.chmod(0o711)
    ports = {name: stack.free_port() for name in stack.DEFAULT_PORTS}
    the_stack = stack.Stack(base / "stack", ports=ports)
    try:
        env = the_stack.up(say=lambda line: None)
        yield TeamStack(the_stack, env, the_stack.credentials())
    finally:
        the_stack.down(say=lambda line: None)
        shutil.rmtree(base, ignore_errors=True)
