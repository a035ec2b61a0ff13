"""ddpm.data: image sets, their npz files (atomic, checked), content hashes and tensors; the data section's config."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ddpm import data as D
from ddpm.config import ConfigError, DataConfig
from ddpm.data import ImageSet


def toy_set(n: int = 100) -> ImageSet:
    """``n`` 2x2 grey images whose pixels all equal the image's index (so subsets are traceable)."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 2, 2, 1)).copy()
    return ImageSet(images, np.arange(n, dtype=np.int64) % 3, ["a", "b", "c"])


# --- npz, hashes and tensors ----------------------------------------------------------------------------------


def test_npz_round_trip_is_atomic(tmp_path, monkeypatch):
    data = toy_set(10)
    path = tmp_path / "out" / "train.npz"
    D.save_npz(path, data)
    back = D.load_npz(path)
    assert np.array_equal(back.images, data.images) and np.array_equal(back.labels, data.labels)
    assert back.classes == data.classes and D.content_hash(back) == D.content_hash(data)
    assert os.listdir(path.parent) == ["train.npz"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not a private temp file

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        D.save_npz(path, toy_set(3))
    assert os.listdir(path.parent) == ["train.npz"] and len(D.load_npz(path)) == 10  # old file intact


def test_load_npz_rejects_bad_files_naming_them(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 4, 4, 1), np.float32), labels=np.zeros(2, np.int64), classes=np.array(["a"]))
    with pytest.raises(ValueError, match=r"bad\.npz: not a valid image-set npz: images must be a uint8 array"):
        D.load_npz(bad)
    np.savez(bad, images=np.zeros((2, 4, 4, 1), np.uint8))
    with pytest.raises(ValueError, match=r"bad\.npz: .*missing arrays \['classes', 'labels'\]"):
        D.load_npz(bad)
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"single\.npy: .*expected an \.npz archive"):
        D.load_npz(tmp_path / "single.npy")
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"bad\.npz: not a valid image-set npz"):
        D.load_npz(bad)
    with pytest.raises(FileNotFoundError):
        D.load_npz(tmp_path / "absent.npz")


def test_content_hash_tracks_pixels_and_labels():
    data = toy_set(10)
    h = D.content_hash(data)
    assert len(h) == 64 and h == D.content_hash(toy_set(10))
    pixel = data.images.copy()
    pixel[3, 1, 1, 0] += 1
    assert D.content_hash(ImageSet(pixel, data.labels, data.classes)) != h
    assert D.content_hash(ImageSet(data.images, data.labels[::-1].copy(), data.classes)) != h


def test_tensor_round_trip_is_exact_for_uint8():
    u8 = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1).repeat(3, axis=3)
    u8[..., 1] = 255 - u8[..., 1]
    x = D.to_tensor(u8)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    assert np.array_equal(D.from_tensor(x), u8)
    assert torch.equal(D.to_tensor(torch.from_numpy(u8)), x)
    u8.flags.writeable = False
    assert torch.equal(D.to_tensor(u8), x)  # read-only arrays (np.frombuffer) are fine too
    assert D.from_tensor(torch.tensor([[[[-3.0, 0.0, 2.0]]]])).ravel().tolist() == [0, 128, 255]  # clamp and round
    with pytest.raises(ValueError, match="expected uint8 images"):
        D.to_tensor(u8.astype(np.float32))


def test_image_set_checks_its_arrays():
    with pytest.raises(ValueError, match="images must be a uint8 array"):
        ImageSet(np.zeros((2, 4, 4)), np.zeros(2, np.int64), ["a"])
    with pytest.raises(ValueError, match="1 or 3 channels"):
        ImageSet(np.zeros((2, 4, 4, 2), np.uint8), np.zeros(2, np.int64), ["a"])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        ImageSet(np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 1]), ["a"])


# --- DataConfig -------------------------------------------------------------------------------------------------


def test_data_config_defaults_and_round_trip():
    cfg = DataConfig()
    assert (cfg.dataset, cfg.root, cfg.image_size, cfg.channels, cfg.test_fraction, cfg.seed, cfg.limit) == (
        "mnist5k",
        None,
        None,
        None,
        0.1,
        0,
        None,
    )
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    folder = DataConfig(dataset="image_folder", root="imgs", image_size=64, channels=1)
    assert DataConfig.from_dict(folder.to_dict(), "data") == folder


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"dataset": "svhn"},
            "dataset='svhn': Input should be 'mnist5k', 'digits', 'mnist', 'cifar10' or 'image_folder'",
        ),
        ({"channels": 2}, "channels=2: Input should be 1 or 3"),
        ({"test_fraction": 0.0}, "test_fraction=0.0: Input should be greater than 0"),
        ({"test_fraction": 1.0}, "test_fraction=1.0: Input should be less than 1"),
        ({"image_size": 0}, "image_size=0: Input should be greater than or equal to 1"),
        ({"limit": 1}, "limit=1: Input should be greater than or equal to 2"),
        ({"seed": -1}, "seed=-1: Input should be greater than or equal to 0"),
        ({"dataset": "mnist"}, "root=None: dataset='mnist' needs root"),
        ({"dataset": "cifar10"}, "root=None: dataset='cifar10' needs root"),
        ({"dataset": "image_folder", "root": "x"}, "image_size=None: dataset='image_folder' needs image_size"),
        ({"dataset": "image_folder", "image_size": 8}, "root=None: dataset='image_folder' needs root"),
        ({"dataset": "digits", "root": "x"}, "root='x': dataset='digits' reads no folder; allowed: null"),
        ({"datset": "digits"}, "datset: unknown key; allowed keys: dataset, root"),
    ],
)
def test_data_config_errors_are_one_line(data, message):
    with pytest.raises(ConfigError) as info:
        DataConfig.from_dict(data, "data")
    assert message in str(info.value) and str(info.value).startswith("data")
    assert "\n" not in str(info.value)
