"""Crash-safe files: atomic writes, the exported sampling model, streamed ``.npz`` samples and PNG grids.

Every writer goes to a temporary file in the destination folder and renames it into place,
so an interrupted stage leaves the old file or the new one, never a truncated file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pickle
import re
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync and rename it to ``path``, on failure delete it.

    Temporary files that a killed writer of ``path`` left behind (their process is gone) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete the temporary files of ``atomic_path(path)`` whose writing process no longer exists."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | Path, header: list[str], rows: list[list[Any]]) -> None:
    """Write a small CSV table (a DVC plot), atomically."""
    lines = [",".join(header)] + [",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in r) for r in rows]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def save_payload(path: str | Path, payload: dict[str, Any]) -> None:
    """``torch.save`` a dict of plain values and tensors atomically (``load_weights_only`` reads it back)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


class UnsafeFileError(ValueError, pickle.UnpicklingError):
    """A file that ``torch.load(weights_only=True)`` refused: it pickles objects that could run code on load."""


def load_weights_only(path: str | Path, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; pickled code, a corrupt or a truncated file raise one line naming it.

    A pickle that would call anything but the tensor and container constructors raises
    :class:`UnsafeFileError` without running it.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise UnsafeFileError(
                f"{path}: refused to load this {what}: it pickles {found.group(1)}, which could run code; "
                "nothing in it was run (weights_only=True)"
            ) from None
        found = re.search(r"Unsupported operand \d+", str(e))
        reason = found.group(0) if found else str(e).splitlines()[0][:120]
        raise UnsafeFileError(
            f"{path}: refused to load this {what}: corrupt, or a pickle that weights_only=True cannot check "
            f"({reason}); nothing in it was run"
        ) from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read this {what} file: {e.strerror or e}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, IndexError) as e:
        detail = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable {what} file: corrupt or truncated ({detail})") from None


def load_state(module: torch.nn.Module, state_dict: Any, path: str | Path, what: str) -> None:
    """``module.load_state_dict(state_dict)`` (strict); a mismatch raises one line naming file and difference."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: the {what} weights are not a mapping of names to tensors")
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        first = details[0] if details else str(e).splitlines()[0]
        more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
        raise ValueError(f"{path}: the {what} weights do not match its network config: {first[:300]}{more}") from None


def load_payload(path: str | Path, what: str, required: set[str]) -> dict[str, Any]:
    """Load a dict saved with torch.save, without running pickled code; name the file and the problem on failure."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    payload = load_weights_only(path, what)
    if not isinstance(payload, dict):
        raise ValueError(f"{path} is not a {what}: it holds a {type(payload).__name__}, expected a dict")
    missing = required - payload.keys()
    if missing:
        raise ValueError(f"{path} is not a {what}: missing keys {sorted(missing)} (expected {sorted(required)})")
    return payload


class NpzWriter:
    """Stream a uint8 array ``arr_0`` [N, ...] into an ``.npz`` chunk by chunk (bounded memory), atomically.

    ``extra`` arrays (e.g. ``labels`` [N]) are stored beside it under their names.
    """

    def __init__(self, path: str | Path, shape: tuple[int, ...], extra: dict[str, np.ndarray] | None = None) -> None:
        self.path, self.shape, self.written = Path(path), tuple(shape), 0
        self.extra = dict(extra or {})
        self._atomic = atomic_path(self.path)
        self._zip: zipfile.ZipFile | None = None
        self._entry: IO[bytes] | None = None

    def __enter__(self) -> NpzWriter:
        tmp = self._atomic.__enter__()
        self._zip = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._entry = self._zip.open("arr_0.npy", "w", force_zip64=True)
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
            "fortran_order": False,
            "shape": self.shape,
        }
        np.lib.format.write_array_header_2_0(self._entry, header)
        return self

    def write(self, chunk: np.ndarray) -> None:
        """Append rows; their dtype and trailing shape must match."""
        if chunk.dtype != np.uint8 or chunk.shape[1:] != self.shape[1:]:
            raise ValueError(f"chunk {chunk.dtype} {chunk.shape} does not match uint8 [N, {self.shape[1:]}]")
        if self.written + len(chunk) > self.shape[0]:
            raise ValueError(f"more than the declared {self.shape[0]} rows")
        self._entry.write(np.ascontiguousarray(chunk).tobytes())
        self.written += len(chunk)

    def __exit__(self, *exc: Any) -> None:
        self._entry.close()
        if exc[0] is None:
            for name, array in self.extra.items():
                with self._zip.open(f"{name}.npy", "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, np.asarray(array), allow_pickle=False)
        self._zip.close()
        if exc[0] is None and self.written != self.shape[0]:
            exc = (ValueError, ValueError(f"wrote {self.written} of {self.shape[0]} rows"), None)
            self._atomic.__exit__(*exc)
            raise exc[1]
        self._atomic.__exit__(*exc)


def _npz_entry(path: str | Path, key: str) -> np.ndarray | None:
    """Entry ``key`` of a samples ``.npz`` (None when absent); the errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            return f[key] if key in f.files else None
    except Exception as e:
        raise ValueError(f"cannot read samples {path}: {type(e).__name__}: {e}") from None


def load_samples(path: str | Path) -> np.ndarray:
    """Load ``arr_0`` uint8 [N, H, W, C] from a samples ``.npz``; name the file and the mismatch on error."""
    arr = _npz_entry(path, "arr_0")
    if arr is None or arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        got = "nothing" if arr is None else f"{arr.dtype} {arr.shape}"
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, C] with C in (1, 3), got {got}")
    return arr


def load_labels(path: str | Path) -> np.ndarray | None:
    """The ``labels`` [N] (int64) a class-conditional draw stored beside ``arr_0``, or None for an unconditional one."""
    labels = _npz_entry(path, "labels")
    if labels is None:
        return None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: labels must be integers [N], got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def grid(images: np.ndarray, ncol: int, pad: int = 2) -> np.ndarray:
    """Tile uint8 [N, H, W, C] into one uint8 image with ``ncol`` columns and white padding."""
    n, h, w, c = images.shape
    rows = -(-n // ncol)
    tiles = np.full((rows * ncol, h + pad, w + pad, c), 255, dtype=np.uint8)
    tiles[:n, :h, :w] = images
    out = tiles.reshape(rows, ncol, h + pad, w + pad, c).transpose(0, 2, 1, 3, 4)
    out = out.reshape(rows * (h + pad), ncol * (w + pad), c)
    return np.pad(out, ((pad, 0), (pad, 0), (0, 0)), constant_values=255)


def save_png(path: str | Path, image: np.ndarray, scale: int = 1) -> None:
    """Save a uint8 [H, W, C] image as PNG (nearest-neighbour upscaled by ``scale``), atomically."""
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
