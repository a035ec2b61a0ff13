"""ddpm.datasets: every loader on small files in the official formats, written here, and the seeded split."""

from __future__ import annotations

import gzip
import io
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from ddpm import datasets
from ddpm.config import DataConfig
from ddpm.data import ImageSet
from test_data import toy_set

# --- mnist5k and digits: the two datasets shipped inside installed packages ---------------------------------


@pytest.fixture(scope="module")
def mnist5k() -> ImageSet:
    return datasets.load(DataConfig())


def test_mnist5k_is_5000_real_digits(mnist5k):
    x, y = mnist5k.images, mnist5k.labels
    assert x.shape == (5000, 28, 28, 1) and x.dtype == np.uint8
    assert y.dtype == np.int64 and np.bincount(y).tolist() == [500] * 10
    assert mnist5k.classes == [str(d) for d in range(10)]
    assert 25 < x.mean() < 45  # regression pin: observed 33.5
    assert (x == 0).mean() > 0.7  # regression pin: observed 0.81 (a black background)
    assert x[:, 0].max() == 0 and x[:, :, 0].max() < x.max()  # the top row is always empty; digits are centred
    ink = [x[y == d].mean() for d in range(10)]
    assert int(np.argmin(ink)) == 1 and int(np.argmax(ink)) == 0  # a "1" has the least ink, a "0" the most


def test_mnist5k_resized_to_rgb(mnist5k):
    x = datasets.load(DataConfig(image_size=32, channels=3)).images
    assert x.shape == (5000, 32, 32, 3)
    assert np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])  # grey replicated
    assert abs(float(x.mean()) - float(mnist5k.images.mean())) < 3


def test_digits_scaled_to_uint8():
    data = datasets.load(DataConfig(dataset="digits"))
    assert data.images.shape == (1797, 8, 8, 1) and data.images.dtype == np.uint8
    assert data.images.min() == 0 and data.images.max() == 255
    assert set(data.labels.tolist()) == set(range(10))


# --- mnist: IDX files ----------------------------------------------------------------------------------------


def _write_idx(path, array: np.ndarray, magic: int) -> None:
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def _write_mnist(folder, suffix: str = "", n_train: int = 5, n_test: int = 3):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n_train + n_test, 4, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n_train + n_test, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for split, sl in (("train", slice(0, n_train)), ("t10k", slice(n_train, None))):
        _write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", x[sl], 2051)
        _write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", y[sl], 2049)
    return x, y


@pytest.mark.parametrize(("suffix", "subfolder"), [("", ""), (".gz", ""), (".gz", "MNIST/raw")])
def test_mnist_idx_files_load_exactly(tmp_path, suffix, subfolder):
    x, y = _write_mnist(tmp_path / subfolder, suffix)
    data = datasets.load(DataConfig(dataset="mnist", root=str(tmp_path)))
    assert np.array_equal(data.images, x[..., None]) and np.array_equal(data.labels, y)
    assert data.labels.dtype == np.int64 and data.classes == [str(d) for d in range(10)]


def test_mnist_wrong_magic_or_size_names_the_file(tmp_path):
    _write_mnist(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    _write_idx(bad, np.zeros(3), 2051)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: not an IDX file.*magic number 2051, expected 2049"):
        datasets.load(DataConfig(dataset="mnist", root=str(tmp_path)))
    bad.write_bytes(bad.read_bytes()[:-1].replace(struct.pack(">I", 2051), struct.pack(">I", 2049)))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: IDX dims \(3,\) need 3 data bytes, found 2"):
        datasets.load(DataConfig(dataset="mnist", root=str(tmp_path)))


def test_mnist_missing_files_say_which_and_where(tmp_path):
    _write_mnist(tmp_path)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).unlink()
    with pytest.raises(FileNotFoundError) as info:
        datasets.load(DataConfig(dataset="mnist", root=str(tmp_path)))
    message = str(info.value)
    assert (
        f"missing in folder {str(tmp_path)!r}: t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each plain or .gz)"
        in (message)
    )
    assert "train-images" not in message and "nothing is downloaded" in message
    absent = tmp_path / "absent"
    with pytest.raises(
        FileNotFoundError, match=f"folder '{absent}' does not exist; put these files in it: train-images"
    ):
        datasets.load(DataConfig(dataset="mnist", root=str(absent)))


# --- cifar10: python pickles -------------------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Writes as CIFAR's Python 2 cPickle did: str and bytes as byte strings, numpy under ``numpy.core``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_string(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        short = len(raw) < 256
        self.write(
            (pickle.SHORT_BINSTRING + bytes([len(raw)]) if short else pickle.BINSTRING + struct.pack("<i", len(raw)))
            + raw
        )
        self.memoize(obj)

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = _save_string
    dispatch[type] = save_global


def _dump_py2(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


PICKLE_WRITERS = {
    "python2": _dump_py2,
    "protocol2": lambda obj: pickle.dumps(obj, protocol=2),
    "protocol5": lambda obj: pickle.dumps(obj, protocol=5),
}
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_cifar(folder, dumps=_dump_py2, per_batch: int = 2):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 256, (6 * per_batch, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, 6 * per_batch).tolist()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        sl = slice(i * per_batch, (i + 1) * per_batch)
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels[sl],
            b"data": rows[sl],
            b"filenames": [b"x.png"] * per_batch,
        }
        (folder / name).write_bytes(dumps(batch))
    meta = {b"num_cases_per_batch": 10000, b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(dumps(meta))
    return rows, labels


@pytest.mark.parametrize("writer", list(PICKLE_WRITERS))
def test_cifar10_batches_load_exactly_channel_last(tmp_path, writer):
    rows, labels = _write_cifar(tmp_path / "cifar-10-batches-py", PICKLE_WRITERS[writer])
    data = datasets.load(DataConfig(dataset="cifar10", root=str(tmp_path)))
    assert data.images.shape == (12, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.labels.tolist() == labels and data.classes == CIFAR_CLASSES
    # row layout: 1024 red values, then 1024 green, then 1024 blue, each plane row-major
    r, c = 5, 7
    assert data.images[3, r, c].tolist() == [rows[3, k * 1024 + r * 32 + c] for k in range(3)]
    assert np.array_equal(data.images[-1, ..., 2].ravel(), rows[-1, 2048:])


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cifar10_pickle_that_runs_code_is_refused(tmp_path):
    _write_cifar(tmp_path)
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof))).close()
    assert proof.exists()  # the payload does run under a plain pickle.load
    marker = tmp_path / "marker"
    crafted = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Payload(marker)]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(crafted, protocol=2))
    with pytest.raises(ValueError, match=r"test_batch: cannot load this pickle safely \(refused to load global"):
        datasets.load(DataConfig(dataset="cifar10", root=str(tmp_path)))
    assert not marker.exists()


def test_cifar10_bad_layout_or_missing_meta(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(_dump_py2({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"data_batch_3: 'data' must be a uint8 array \[N, 3072\], got uint8 array"):
        datasets.load(DataConfig(dataset="cifar10", root=str(tmp_path)))
    (tmp_path / "batches.meta").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing in folder '.*': batches.meta; put them there"):
        datasets.load(DataConfig(dataset="cifar10", root=str(tmp_path)))


# --- image_folder ----------------------------------------------------------------------------------------------


def _solid(mode: str, size: tuple[int, int], color) -> Image.Image:
    return Image.new(mode, size, color)


def test_image_folder_sizes_channels_labels(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs" / "puppies").mkdir(parents=True)
    (tmp_path / ".cache").mkdir()
    stripes = np.zeros((8, 24, 3), np.uint8)
    stripes[:, :8, 0] = stripes[:, 8:16, 1] = stripes[:, 16:, 2] = 255  # red | green | blue, wide
    Image.fromarray(stripes).save(tmp_path / "cats" / "a.png")
    _solid("L", (16, 16), 200).save(tmp_path / "cats" / "b.JPG", quality=100)
    _solid("RGBA", (10, 30), (10, 20, 30, 0)).save(tmp_path / "dogs" / "c.png")
    _solid("P", (9, 9), 3).save(tmp_path / "dogs" / "puppies" / "d.png")
    Image.fromarray(np.full((12, 12), 0x8000, np.uint16)).save(tmp_path / "dogs" / "e.png")  # 16-bit grey
    _solid("L", (8, 8), 0).save(tmp_path / ".cache" / "hidden.png")
    (tmp_path / "cats" / "notes.txt").write_text("not an image")

    rgb = datasets.load(DataConfig(dataset="image_folder", root=str(tmp_path), image_size=8))
    assert rgb.images.shape == (5, 8, 8, 3) and rgb.images.dtype == np.uint8
    assert rgb.classes == ["cats", "dogs"] and rgb.labels.tolist() == [0, 0, 1, 1, 1]
    assert (rgb.images[0] == [0, 255, 0]).all()  # center crop of the wide image keeps the green third
    assert np.abs(rgb.images[1].astype(int) - 200).max() <= 2  # grey JPEG replicated to RGB
    assert (rgb.images[2] == [10, 20, 30]).all()  # alpha dropped, 10x30 resized and cropped
    assert (rgb.images[3] == 128).all()  # 16-bit 0x8000 keeps its 8 high bits
    assert (rgb.images[4] == Image.new("P", (1, 1), 3).convert("RGB").getpixel((0, 0))).all()  # palette colour 3

    grey = datasets.load(DataConfig(dataset="image_folder", root=str(tmp_path), image_size=4, channels=1))
    assert grey.images.shape == (5, 4, 4, 1) and grey.labels.tolist() == [0, 0, 1, 1, 1]


def test_image_folder_files_in_root_form_class_zero(tmp_path):
    root = tmp_path / "faces"
    (root / "extra").mkdir(parents=True)
    for i in range(2):
        _solid("RGB", (6, 6), (i, i, i)).save(root / f"{i}.png")
    _solid("RGB", (6, 6), (9, 9, 9)).save(root / "extra" / "z.jpeg")
    data = datasets.load(DataConfig(dataset="image_folder", root=str(root), image_size=6))
    assert data.classes == ["faces", "extra"] and data.labels.tolist() == [0, 0, 1]


def test_image_folder_corrupt_empty_or_missing(tmp_path):
    (tmp_path / "a").mkdir()
    _solid("RGB", (4, 4), 0).save(tmp_path / "a" / "ok.png")
    (tmp_path / "a" / "broken.png").write_bytes(np.random.default_rng(0).bytes(64))
    cfg = DataConfig(dataset="image_folder", root=str(tmp_path), image_size=4)
    with pytest.raises(ValueError, match=r"broken\.png: cannot read this image"):
        datasets.load(cfg)
    png = (tmp_path / "a" / "ok.png").read_bytes()
    (tmp_path / "a" / "broken.png").write_bytes(png[: len(png) // 2])  # truncated
    with pytest.raises(ValueError, match=r"broken\.png: cannot read this image"):
        datasets.load(cfg)

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=rf"no images in folder '{empty}'.*\.png, \.jpg, \.jpeg"):
        datasets.load(DataConfig(dataset="image_folder", root=str(empty), image_size=4))
    with pytest.raises(FileNotFoundError, match=rf"folder '{tmp_path / 'nope'}' does not exist"):
        datasets.load(DataConfig(dataset="image_folder", root=str(tmp_path / "nope"), image_size=4))


# --- split --------------------------------------------------------------------------------------------------


def test_split_is_seeded_disjoint_and_sized():
    data = toy_set(100)
    train, test = datasets.split(data, 0.2, seed=0)
    again_train, again_test = datasets.split(data, 0.2, seed=0)
    ids = lambda s: s.images[:, 0, 0, 0].tolist()  # noqa: E731
    assert (len(train), len(test)) == (80, 20)
    assert ids(train) == ids(again_train) and ids(test) == ids(again_test)
    assert set(ids(train)).isdisjoint(ids(test)) and set(ids(train)) | set(ids(test)) == set(range(100))
    assert np.array_equal(train.labels, np.array(ids(train)) % 3) and train.classes == data.classes
    assert ids(datasets.split(data, 0.2, seed=1)[1]) != ids(test)

    small_train, small_test = datasets.split(data, 0.1, seed=0, limit=30)
    assert (len(small_train), len(small_test)) == (27, 3)
    assert len(datasets.split(data, 0.5, seed=0, limit=1000)[0]) == 50
    assert len(datasets.split(toy_set(2), 0.01, seed=0)[1]) == 1  # never an empty side
    with pytest.raises(ValueError, match="need at least 2"):
        datasets.split(data, 0.1, seed=0, limit=1)
    with pytest.raises(ValueError, match="test_fraction=1.5"):
        datasets.split(data, 1.5, seed=0)


def test_mnist_keeps_file_size_unless_asked(tmp_path):
    x, _ = _write_mnist(tmp_path)  # 4x3 images: kept as they are without image_size
    assert datasets.load(DataConfig(dataset="mnist", root=str(tmp_path), channels=3)).images.shape == (8, 4, 3, 3)
    assert datasets.load(DataConfig(dataset="mnist", root=str(tmp_path), image_size=6)).images.shape == (8, 6, 6, 1)
