"""Image sets: uint8 images [N, H, W, C] with int64 labels, their ``.npz`` files, and the nets' tensors.

The prepare stage writes each split with :func:`save_npz` (datasets come from :mod:`ddpm.datasets`); the
later stages read them with :func:`load_npz`. :func:`to_tensor` and :func:`from_tensor` convert to and from
the float [N, C, H, W] images in [-1, 1] that the nets take and the samplers return.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ddpm.io import atomic_path


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images uint8 [N, H, W, C] (C = 1 or 3), labels int64 [N] indexing ``classes``."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 array [N, H, W, C], got {describe_array(images)}")
        if images.shape[3] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels (last axis), got shape {images.shape}")
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be an int64 array [{len(images)}], got {describe_array(labels)}")
        if labels.size and not 0 <= labels.min() <= labels.max() < len(self.classes):
            n = len(self.classes)
            raise ValueError(f"labels must lie in [0, {n}) ({n} class names), got {labels.min()}..{labels.max()}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray) -> ImageSet:
        """The images and labels at ``index``, same class names."""
        return ImageSet(self.images[index], self.labels[index], list(self.classes))


def describe_array(a: object) -> str:
    """``uint8 array of shape (2, 3)``, or the type name of anything but an array (for error messages)."""
    return f"{a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__


def save_npz(path: str | os.PathLike[str], data: ImageSet) -> None:
    """Write ``images``, ``labels`` and ``classes`` to ``path`` atomically (temp file in its folder, then rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=data.images, labels=data.labels, classes=np.array(data.classes, dtype=np.str_))


def load_npz(path: str | os.PathLike[str]) -> ImageSet:
    """Read a file written by :func:`save_npz`, checking keys, dtypes and shapes; errors name the file."""
    try:
        return _read_npz(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{path}: not a valid image-set npz: {e}") from None


def _read_npz(path: str | os.PathLike[str]) -> ImageSet:
    f = np.load(path, allow_pickle=False)
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"expected an .npz archive, got a single {describe_array(f)}")
    with f:
        missing = {"images", "labels", "classes"} - set(f.files)
        if missing:
            raise ValueError(f"missing arrays {sorted(missing)} (has {sorted(f.files)})")
        images, labels, classes = f["images"], f["labels"], f["classes"]
    if labels.dtype.kind not in "iu" or classes.dtype.kind != "U" or classes.ndim != 1:
        raise ValueError(f"labels must be integers and classes strings, got {labels.dtype} and {classes.dtype}")
    return ImageSet(images, labels.astype(np.int64), classes.tolist())


def content_hash(data: ImageSet) -> str:
    """SHA-256 hex digest of the shapes, images bytes and labels bytes (int64 little-endian), for tracking."""
    h = hashlib.sha256(f"{data.images.shape}{data.labels.shape}".encode())
    h.update(np.ascontiguousarray(data.images).tobytes())
    h.update(np.ascontiguousarray(data.labels, dtype="<i8").tobytes())
    return h.hexdigest()


def to_tensor(images: np.ndarray | Tensor) -> Tensor:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] in [-1, 1] (x / 127.5 - 1)."""
    if isinstance(images, Tensor):
        x = images
    else:
        images = np.asarray(images)
        x = torch.from_numpy(images if images.flags.writeable else images.copy())
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"expected uint8 images [N, H, W, C], got {x.dtype} of shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def from_tensor(x: Tensor) -> np.ndarray:
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C], clamped and rounded."""
    if x.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
    u8 = x.detach().float().add(1.0).mul(127.5).clamp(0, 255).round().to(torch.uint8)
    return u8.permute(0, 2, 3, 1).contiguous().cpu().numpy()
