"""DVC with one fault injected, for the flow tests (``tests/test_flows.py`` runs the flows' DVC through it).

Usage: ``python tests/fault_dvc.py {fail,preempt} MARKER DVC_ARGS...``

While the file ``MARKER`` exists, the next pipeline run (``dvc repro`` or ``dvc exp run``) deletes it and
``fail``: exits with an error before DVC starts (a transient failure), or ``preempt``: runs DVC and
interrupts it (SIGINT to its process group, as Ctrl-C or a stopping worker does) as soon as the train stage
has written its first resume checkpoint, so the stage checkpoints and stops and the run fails. Any other
command, and every command once the marker is gone, is plain ``python -m dvc DVC_ARGS...``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CHECKPOINT = Path("outputs/train/resume.ckpt")  # relative to the DVC project, where DVC runs


def main(fault: str, marker: Path, args: list[str]) -> int:
    dvc = [sys.executable, "-m", "dvc", *args]
    if not marker.is_file() or not (args[:1] == ["repro"] or args[:2] == ["exp", "run"]):
        os.execv(sys.executable, dvc)
    if fault == "fail":
        marker.unlink()
        print(f"ERROR: injected transient failure ({marker} existed)", file=sys.stderr)
        return 1
    proc = subprocess.Popen(dvc)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # after the start: DVC keeps the default action
    while proc.poll() is None:
        if CHECKPOINT.is_file():
            marker.unlink()
            os.killpg(os.getpgrp(), signal.SIGINT)
            break
        time.sleep(0.05)
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:]))
