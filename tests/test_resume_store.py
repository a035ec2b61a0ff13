"""What a worker's run shares for its continuation (pipeline.remote, pipeline.flows.ResumeSync): the resume
checkpoint and the EMA snapshots written so far, on a real DVC folder remote; the S3 path runs in
tests/test_workers.py."""

import logging
from pathlib import Path

from pipeline import remote
from pipeline.flows import RESUME, SNAPSHOTS_PARTIAL, ResumeSync


def workspace(path: Path, store: Path) -> Path:
    """A project folder whose default DVC remote is the folder ``store``."""
    (path / ".dvc").mkdir(parents=True)
    (path / ".dvc" / "config").write_text(f"[core]\n    remote = shared\n['remote \"shared\"']\n    url = {store}\n")
    return path


def stored(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def test_a_continuation_gets_the_checkpoint_and_every_snapshot_and_the_finished_run_removes_them(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    first, other = workspace(tmp_path / "first", store), workspace(tmp_path / "other", store)
    sync = ResumeSync(first, "k1", logging.getLogger("test"))
    partial = first / SNAPSHOTS_PARTIAL
    partial.mkdir(parents=True)
    sync.sync()
    assert stored(store) == {}  # nothing written yet: nothing pushed

    for name in ("std0.05-step0000020.pt", "std0.1-step0000020.pt"):
        (partial / name).write_bytes(name.encode())
    (partial / ".std0.05-step0000040.pt.123.abcd.tmp").write_bytes(b"half")  # a snapshot being written
    (first / RESUME).write_bytes(b"checkpoint at 20")
    sync.sync()
    assert stored(store) == {
        "resume/k1.ckpt": b"checkpoint at 20",
        "resume/k1.ema/std0.05-step0000020.pt": b"std0.05-step0000020.pt",
        "resume/k1.ema/std0.1-step0000020.pt": b"std0.1-step0000020.pt",
    }

    # the next checkpoint: only the new and rewritten snapshots travel
    (partial / "std0.05-step0000040.pt").write_bytes(b"40")
    (partial / "std0.1-step0000020.pt").write_bytes(b"20, again")
    (first / RESUME).write_bytes(b"checkpoint at 40")
    assert remote.push_snapshots(first, partial, "k1", sync.snapshots) == [
        "std0.05-step0000040.pt",
        "std0.1-step0000020.pt",
    ]
    sync.sync()
    assert stored(store)["resume/k1.ckpt"] == b"checkpoint at 40"

    # another worker continues it
    assert remote.pull_resume(other, "k1", other / RESUME)
    assert (other / RESUME).read_bytes() == b"checkpoint at 40"
    names = remote.pull_snapshots(other, "k1", other / SNAPSHOTS_PARTIAL)
    assert names == ["std0.05-step0000020.pt", "std0.05-step0000040.pt", "std0.1-step0000020.pt"]
    assert {p.name: p.read_bytes() for p in (other / SNAPSHOTS_PARTIAL).iterdir()} == {
        p.name: p.read_bytes() for p in partial.glob("*.pt")
    }
    # another run's key finds nothing
    assert not remote.pull_resume(other, "k2", tmp_path / "nothing.ckpt")
    assert remote.pull_snapshots(other, "k2", tmp_path / "nothing") == []

    remote.drop_resume(other, "k1")
    assert stored(store) == {}
