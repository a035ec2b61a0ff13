"""Thin command-line stages of the DVC pipeline (``python -m pipeline.<stage>``) and the Prefect flows.

Importing the package sets the OpenMP environment of the process (:func:`bound_openmp_spin`). Every stage,
flow and CLI here starts as ``python -m pipeline.<module>``, so this runs before torch loads libgomp, which
reads the environment once; the processes they start (DVC and its stages) inherit it.
"""

import os

GOMP_SPINCOUNT = "30000"


def bound_openmp_spin() -> None:
    """Idle OpenMP threads spin ``GOMP_SPINCOUNT`` = 30000 turns (~0.3 ms), then sleep, unless the user chose.

    The spinning bridges the gaps between one step's operators (CPU training ran 1.09-1.18x faster than with
    threads that sleep at once, see benchmarks/results.md); the bound keeps a shared machine's cores free. A set
    ``OMP_WAIT_POLICY`` (``PASSIVE``: sleep at once) or ``GOMP_SPINCOUNT`` is left as it is.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)


bound_openmp_spin()
