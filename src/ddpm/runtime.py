"""Process-wide settings for throughput: glibc's malloc, and torch.compile of a network in place.

glibc's malloc serves every large block (above an adaptive threshold of 128 KiB to 32 MiB) with its own
``mmap`` and hands it back with ``munmap`` when it is freed. A U-Net step allocates and frees tens of
activation tensors of megabytes each, so every step page-faults all of them in again and the kernel
zeroes each page: on this project's 2-core CPU that was about 40% of a sampling step and 2.5 million page
faults per eight steps. :func:`keep_freed_memory` makes malloc keep freed memory in its heap for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import TYPE_CHECKING

from ddpm.config import CompileSetting

if TYPE_CHECKING:
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


def compile_in_place(net: nn.Module, setting: CompileSetting) -> nn.Module:
    """``net`` compiled in place with ``nn.Module.compile`` as ``setting`` asks (nothing for false).

    In place, the module keeps its class, attributes and ``state_dict`` keys, so checkpoints, the EMA
    update and the exported model are those of the plain network. Compilation happens at the first call.
    """
    if setting is False:
        return net
    net.compile(backend="inductor" if setting is True else setting)
    return net
