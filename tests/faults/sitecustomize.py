"""Fault injection into pipeline stage processes, switched on by environment variables (tests/test_pipeline.py).

Python imports this module at startup when its folder is on ``PYTHONPATH``; it acts only in processes
that run a pipeline stage (``python -m pipeline.<stage>``), never in DVC itself:

- ``FAULT_KILL_AT=NAME:N`` SIGKILLs the stage at its N-th ``os.replace`` onto a file called NAME: the
  temp file of an atomic write is complete and synced, the rename has not happened (a kill mid-write).
- ``FAULT_HOLD=PATH`` creates ``PATH.started`` and waits, at most 5 minutes, until ``PATH.release`` exists.
"""

import os
import signal
import sys
import time


def _is_stage() -> bool:
    argv = getattr(sys, "orig_argv", [])
    return any(arg.startswith("pipeline.") for arg in argv[1:3])


def _kill_at(spec: str) -> None:
    name, _, n = spec.rpartition(":")
    replace, count = os.replace, [0]

    def dying_replace(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) == name:
            count[0] += 1
            if count[0] == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst, *args, **kwargs)

    os.replace = dying_replace


def _hold(path: str) -> None:
    open(path + ".started", "w").close()
    deadline = time.monotonic() + 300
    while not os.path.exists(path + ".release") and time.monotonic() < deadline:
        time.sleep(0.1)


if _is_stage():
    if os.environ.get("FAULT_KILL_AT"):
        _kill_at(os.environ["FAULT_KILL_AT"])
    if os.environ.get("FAULT_HOLD"):
        _hold(os.environ["FAULT_HOLD"])
