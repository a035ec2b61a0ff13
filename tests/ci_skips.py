"""Skips under CI (a pytest plugin, loaded by conftest.py): with ``CI=true`` a skipped test fails the run, unless
its reason is in :data:`ALLOWED`, the skips that the project's own install cannot enable.

Elsewhere a test skips where its optional part is missing (no C++ compiler for the native kernels, a package of
an extra not installed); on CI that would hide a machine that never ran them, so there it is an error naming the
reason. ``CI`` is what CI services set (``true``); ``.ci/run`` sets it too. Every run also ends with the line
naming the native kernels' instruction-set path (AVX-512, AVX2 or portable), when a test used them.
"""

from __future__ import annotations

import os
import sys

import pytest

NOT_LINUX = "the native kernels are built on Linux only"
NO_PROCFS = "needs Linux procfs"
NO_BF16_CPU = "this CPU has no oneDNN bf16 path (it needs AVX-512 or AVX-NE-CONVERT)"

ALLOWED = {
    NOT_LINUX: "the platform: the kernels' build (torch.utils.cpp_extension with GCC's flags) targets Linux",
    NO_PROCFS: "the platform: the test reads a process's resident memory from /proc/self/status",
    NO_BF16_CPU: "the machine: oneDNN runs bf16 convolutions with post-ops on AVX-512 or AVX-NE-CONVERT CPUs only",
}


def on_ci() -> bool:
    """Whether this run is CI's (``CI=true``, or ``1``)."""
    return os.environ.get("CI", "").lower() in ("true", "1")


def skip_reason(report: pytest.TestReport) -> str:
    """The reason a skip report gives (pytest writes it as ``Skipped: <reason>``)."""
    text = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return text.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not (on_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = skip_reason(report)
    if reason not in ALLOWED:
        report.outcome = "failed"
        report.longrepr = (
            f"skipped under CI=true: {reason}\n"
            "The project's install should enable this test; only the reasons in tests/ci_skips.py ALLOWED may skip "
            "on CI (docs/development.md)."
        )


def kernels_line() -> str | None:
    """The native kernels' line of this process, where a test used them."""
    build = sys.modules.get("ddpm.kernels.build")
    return build.summary() if build is not None else None


_WORKER_LINES: set[str] = set()


def pytest_sessionfinish(session) -> None:
    """On a pytest-xdist worker: hand the kernels' line to the controller, which writes the summary."""
    line = kernels_line()
    if hasattr(session.config, "workeroutput") and line is not None:
        session.config.workeroutput["native_kernels"] = line


def pytest_testnodedown(node, error) -> None:
    line = getattr(node, "workeroutput", {}).get("native_kernels")
    if line:
        _WORKER_LINES.add(line)


def pytest_terminal_summary(terminalreporter) -> None:
    """The native kernels' instruction-set path (or why they were not built), where a test used them."""
    lines = _WORKER_LINES | ({kernels_line()} - {None})
    for line in sorted(lines):
        terminalreporter.write_line(line)
