import errno
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddpm import export, io


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with io.atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert oct(target.stat().st_mode & 0o777) != oct(0o600), "a normal file, not mkstemp's private mode"


def test_npz_writer_streams_chunks_readable_by_numpy(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 4, 4, 1), dtype=np.uint8)
    with io.NpzWriter(tmp_path / "s.npz", images.shape) as w:
        for i in range(0, 10, 3):
            w.write(images[i : i + 3])
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["arr_0"], images)
    np.testing.assert_array_equal(io.load_samples(tmp_path / "s.npz"), images)


def test_npz_writer_leaves_nothing_when_interrupted_or_short(tmp_path):
    with pytest.raises(KeyboardInterrupt), io.NpzWriter(tmp_path / "s.npz", (4, 2, 2, 1)) as w:
        w.write(np.zeros((2, 2, 2, 1), np.uint8))
        raise KeyboardInterrupt
    with pytest.raises(ValueError, match="wrote 2 of 4 rows"), io.NpzWriter(tmp_path / "s.npz", (4, 2, 2, 1)) as w:
        w.write(np.zeros((2, 2, 2, 1), np.uint8))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="does not match"), io.NpzWriter(tmp_path / "s.npz", (4, 2, 2, 1)) as w:
        w.write(np.zeros((2, 3, 2, 1), np.uint8))


def test_load_samples_names_the_file_and_the_mismatch(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((2, 4, 4, 1), np.float32))
    with pytest.raises(ValueError, match=r"bad.npz: arr_0 must be uint8"):
        io.load_samples(bad)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read samples .*junk.npz"):
        io.load_samples(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        io.load_samples(tmp_path / "missing.npz")


def test_saved_model_loads_weights_only_and_refuses_code(tmp_path):
    path = tmp_path / "model.pt"
    io.save_payload(
        path, {"format": export.MODEL_FORMAT, "net": {"a": 1}, "config": {"b": 2}, "state_dict": {"w": torch.ones(2)}}
    )
    payload = io.load_payload(path, "model", {"format", "net", "config", "state_dict"})
    assert payload["net"] == {"a": 1} and torch.equal(payload["state_dict"]["w"], torch.ones(2))

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"format": export.MODEL_FORMAT, "net": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(io.UnsafeFileError, match=r"evil\.pt: refused to load this model: it pickles io\.open"):
        io.load_payload(tmp_path / "evil.pt", "model", {"format"})
    assert not marker.exists()
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cut\.pt: not a readable model file: corrupt or truncated"):
        io.load_payload(tmp_path / "cut.pt", "model", {"format"})
    torch.save({"format": export.MODEL_FORMAT}, tmp_path / "keys.pt")
    with pytest.raises(ValueError, match=r"keys\.pt is not a model: missing keys \['net'\]"):
        io.load_payload(tmp_path / "keys.pt", "model", {"format", "net"})


def test_load_state_names_the_file_and_the_first_difference(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 1)).state_dict()
    with pytest.raises(
        ValueError,
        match=r"w\.pt: the model weights do not match its network config: size mismatch "
        r"for 0\.weight: .* \(and 2 more\)",
    ):
        io.load_state(net, state, tmp_path / "w.pt", "model")
    with pytest.raises(ValueError, match=r"w\.pt: the model weights are not a mapping of names to tensors"):
        io.load_state(net, {"0.weight": [1.0]}, tmp_path / "w.pt", "model")


def test_a_full_disk_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    io.save_payload(path, {"net": {"a": 1}, "state_dict": {"w": torch.ones(2)}})
    old = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(old[: len(old) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        io.save_payload(path, {"net": {"a": 2}, "state_dict": {"w": torch.zeros(2)}})
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_temp_files_of_dead_writers_are_swept_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.json.{int(dead.stdout)}.0123abcd.tmp"
    alive = tmp_path / f".out.json.{os.getppid()}.0123abcd.tmp"  # a running writer's file stays
    other = tmp_path / f".other.json.{int(dead.stdout)}.0123abcd.tmp"
    for p in (stale, alive, other):
        p.write_text("half")
    io.write_json(tmp_path / "out.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, "out.json"])


def test_grid_tiles_images_row_major():
    images = np.stack([np.full((2, 2, 1), v, np.uint8) for v in (10, 20, 30)])
    g = io.grid(images, ncol=2, pad=1)
    assert g.shape == (1 + 2 * 3, 1 + 2 * 3, 1)
    assert g[1, 1, 0] == 10 and g[1, 4, 0] == 20 and g[4, 1, 0] == 30 and g[4, 4, 0] == 255
