"""Building and loading the native kernels of ``csrc/`` (:func:`extension`), and ``main`` (``make install``).

The sources are compiled with :mod:`torch.utils.cpp_extension` the first time a kernel is needed (about 40 s with
a C++ compiler; :func:`main` builds them ahead, as ``make install`` does) into ``$DDPM_KERNELS_DIR`` (by default
``~/.cache/ddpm-pipeline/kernels``), once per torch installation, CPU kind and revision of the sources. Where they
cannot be built, :func:`extension` warns once and returns None, and PyTorch's ops run instead.
Which kernels run is :func:`enabled`'s: ``DDPM_NATIVE_KERNELS`` unset (or ``auto``) uses those measured faster
than PyTorch's ops on the path they compiled with (:data:`DEFAULT_KERNELS`): all three on the AVX-512 path; the
GroupNorm and Winograd kernels on the AVX2 path, where the attention kernel took about twice PyTorch's time; none
on the portable path, all that other CPUs get. ``1`` uses them all whatever their path (the tests of the portable
path), ``0`` none.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

SOURCES = tuple(
    Path(__file__).with_name("csrc") / name for name in ("group_norm_silu.cpp", "attention.cpp", "winograd.cpp")
)
ENV = "DDPM_NATIVE_KERNELS"
KERNELS = ("group_norm", "attention", "winograd")
DEFAULT_KERNELS: dict[str, tuple[str, ...]] = {"avx512": KERNELS, "avx2": ("group_norm", "winograd")}
"""The kernels that run by default on each instruction-set path (``vector_isa``). On a 2-core AVX2 EPYC, the
default net's fp32 training step against PyTorch's ops: these two kernels 1.79x, all three 1.62x (in turns, medians
of 5; benchmarks/native.md)."""
STALE_LOCK_SECONDS = 600  # a build lock older than this was left by a build that was killed

_extension: ModuleType | None = None
_error: str | None = None


def _cpu_tag() -> str:
    """A short hash of the CPU model and its instruction-set flags: the kernel is built for the host CPU."""
    text = platform.machine() + platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                text += line
            if line.strip() == "":
                break
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def build_directory(name: str) -> Path:
    """Where the kernel ``name`` is built: one folder per torch installation (its version and location).

    The module links against that libtorch, and the build commands name its headers' path as this process reaches
    it: two environments sharing one folder would each see the other's commands and rebuild it on every switch,
    and so would one environment reached through two paths (a checkout's ``.venv`` that links to another's), so
    the path is taken as it is, symbolic links and all.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = Path(os.environ.get("DDPM_KERNELS_DIR") or cache / "ddpm-pipeline" / "kernels")
    where = hashlib.sha256(os.path.dirname(os.path.abspath(torch.__file__)).encode()).hexdigest()[:8]
    folder = root / f"torch-{torch.__version__}-{where}" / name
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"  # torch's build lock: another process waits for it to go, forever if it was orphaned
    with contextlib.suppress(OSError):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()
    return folder


@contextlib.contextmanager
def _one_ninja() -> Iterator[None]:
    """The ``ninja`` package's build tool first on PATH while torch's builder runs (it calls ``ninja``).

    Always the same one: ninja versions keep their build logs in different formats, so a ninja that finds
    another version's log (a system ninja in one process, the package's in another) rebuilds everything.
    Without the package, whatever ``ninja`` is on PATH runs.
    """
    try:
        import ninja
    except ImportError:
        yield
        return
    path = os.environ.get("PATH")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + (path or "")
    try:
        yield
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path


def enabled(kernel: str | None = None) -> bool:
    """Whether the native ``kernel`` (one of :data:`KERNELS`; None: any of them) may be used: with
    ``DDPM_NATIVE_KERNELS`` ``1`` always, ``0`` never, unset or ``auto`` where :data:`DEFAULT_KERNELS` lists it for
    the path they compiled with (this builds them on the first call)."""
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"unknown native kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
    setting = os.environ.get(ENV, "auto")
    if setting == "0":
        return False
    if setting == "1":
        return True
    ext = extension()
    on = DEFAULT_KERNELS.get(ext.vector_isa, ()) if ext is not None else ()
    return bool(on) if kernel is None else kernel in on


def extension() -> ModuleType | None:
    """The compiled kernel module, built on first call; None (after one warning) where it cannot be built."""
    global _extension, _error
    if _extension is not None or _error is not None:
        return _extension
    try:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
        from torch.utils import cpp_extension

        flags = ["-O3", "-fno-trapping-math", "-fopenmp"]
        if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
            flags.append("-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native")
        codes = {path.name: path.read_bytes() for path in SOURCES}
        digest = hashlib.sha256(b"".join(hashlib.sha256(c).digest() for c in codes.values())).hexdigest()[:8]
        name = f"ddpm_kernels_{_cpu_tag()}_{digest}"
        folder = build_directory(name)
        # Built from copies inside its folder: every checkout of the same sources shares one build (ninja would
        # rebuild for each source path), and other revisions of the sources build beside it.
        sources = []
        for file, code in codes.items():
            source = folder / file
            if not source.exists() or source.read_bytes() != code:
                tmp = source.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_bytes(code)
                os.replace(tmp, source)
            sources.append(str(source))
        with _one_ninja():
            _extension = cpp_extension.load(
                name=name,
                sources=sources,
                build_directory=str(folder),
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
    except Exception as err:  # no compiler, no Python headers, an unsupported platform
        _error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        warnings.warn(
            f"ddpm: the native kernels could not be built ({_error}); using PyTorch's GroupNorm, SiLU and attention "
            f"(set {ENV}=0 to skip the attempt)",
            RuntimeWarning,
            stacklevel=2,
        )
    return _extension


def summary(file: bool = True) -> str | None:
    """One line on this process's kernels: the instruction-set path they run (``avx512``, ``avx2`` or ``portable``,
    chosen when they were compiled for this CPU) and, with ``file``, their file; or why they were not built; None
    before any was asked for.
    """
    if _extension is not None:
        setting = os.environ.get(ENV, "auto")
        off = [k for k in KERNELS if not enabled(k)]
        used = (
            f"; not used ({ENV}={setting}): PyTorch's ops run"
            if len(off) == len(KERNELS)
            else f"; PyTorch's ops run for: {', '.join(off)} ({ENV}={setting})"
            if off
            else ""
        )
        where = f" ({_extension.__file__})" if file else ""
        return f"native kernels: {_extension.vector_isa} vector path{where}{used}"
    if _error is not None:
        return f"native kernels: not built ({_error}); PyTorch's ops run"
    return None


def main() -> None:
    """Build the kernels now and say which instruction-set path they run and where they are, or why they are not
    built (exit status 1)."""
    ext = extension()
    print(summary(), file=sys.stdout if ext is not None else sys.stderr)
    if ext is None:
        sys.exit(1)
