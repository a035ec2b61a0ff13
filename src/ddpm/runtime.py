"""Process-wide settings for throughput: glibc's malloc, the device of an accelerator setting, and torch.compile
of a network in place with a persistent compile cache.

glibc's malloc serves every large block (above an adaptive threshold of 128 KiB to 32 MiB) with its own
``mmap`` and hands it back with ``munmap`` when it is freed. A U-Net step allocates and frees tens of
activation tensors of megabytes each, so every step page-faults all of them in again and the kernel
zeroes each page: on this project's 2-core CPU that was about 40% of a sampling step and 2.5 million page
faults per eight steps. :func:`keep_freed_memory` makes malloc keep freed memory in its heap for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ddpm.config import COMPILE_MODES, CompileSetting, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

M_TRIM_THRESHOLD = -1  # mallopt parameters of glibc's <malloc.h>
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve large blocks from malloc's heap and never trim it (glibc ``mallopt``); False where there is no glibc.

    Freed memory stays in the process for the next step, so the resident set stays at its peak instead of
    shrinking between steps. The environment variables ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``
    do the same for a whole process from its start.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def device(accelerator: str, key: str) -> torch.device:
    """The device of an accelerator setting ``key``: the CPU for cpu; the current CUDA GPU for gpu (a one-line
    ConfigError naming ``key`` where torch sees none); for auto, that GPU where torch sees one, else the CPU."""
    import torch

    if accelerator != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if accelerator == "gpu":
        raise ConfigError(f"{key}='gpu': torch sees no CUDA GPU on this machine; allowed here: auto or cpu")
    return torch.device("cpu")


def compile_in_place(net: nn.Module, setting: CompileSetting) -> nn.Module:
    """``net`` compiled in place with ``nn.Module.compile`` as ``setting`` asks (nothing for false).

    In place, the module keeps its class, attributes and ``state_dict`` keys, so checkpoints, the EMA
    update and the exported model are those of the plain network. Compilation happens at the first call;
    inductor keeps its code in :func:`inductor_cache` (set for the process), so a later run loads it.
    """
    if setting is False:
        return net
    if setting in COMPILE_MODES:
        backend, mode = "inductor", setting
    else:
        backend, mode = "inductor" if setting is True else setting, None
    if backend == "inductor":
        os.environ[INDUCTOR_CACHE] = str(inductor_cache())
    net.compile(backend=backend, mode=mode)
    return net


INDUCTOR_CACHE = "TORCHINDUCTOR_CACHE_DIR"


def inductor_cache() -> Path:
    """Inductor's cache folder for compiling here: ``$TORCHINDUCTOR_CACHE_DIR`` where the user chose one, else
    ``~/.cache/ddpm-pipeline/inductor`` (``$XDG_CACHE_HOME/ddpm-pipeline/inductor`` where that is set).

    Inductor keeps the code it generates (and Triton its GPU kernels) there and loads it when it compiles the
    same graph again. Its own default is a folder in ``/tmp``, which a reboot or a fresh container empties;
    importing ``torch._inductor.config`` (as Lightning does) writes that default into the environment, so it
    counts as not chosen.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get(INDUCTOR_CACHE)
    if chosen and chosen != default_cache_dir():
        return Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm-pipeline" / "inductor"
