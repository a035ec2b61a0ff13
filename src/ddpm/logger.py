"""The training's metric logger: Lightning's ``MLFlowLogger``, buffering through a tracking server outage."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from typing import Any

from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only

from ddpm.tracking import TrackingError


class BufferedMLFlowLogger(MLFlowLogger):
    """Lightning's ``MLFlowLogger`` that survives a tracking server outage during training.

    A metric batch the server does not take (connection refused, timeout) stays in a buffer, in order, and is
    sent with the next batch that gets through, so training never waits on the server and the run's curves
    have no gap once the server is back. ``flush(wait)`` sends what is left, retrying for up to ``wait``
    seconds, and raises a ``TrackingError`` naming the server and the number of unsent batches after that.
    Only rank 0 logs (Lightning's rank-zero guards).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: list[tuple[str, tuple]] = []
        self.warned = False

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.pending.append(("log_metrics", (dict(metrics), step)))
        self._send()

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        self.pending.append(("log_hyperparams", (params,)))
        self._send()

    @property
    def version(self) -> str | None:
        """The run id, without asking the server (checkpoints record it while the server may be down)."""
        return self._run_id if self._run_id is not None else super().version

    def _send(self) -> bool:
        """Send the buffer in order; False (and the rest kept) at the first failure."""
        with _fail_fast():
            while self.pending:
                name, args = self.pending[0]
                try:
                    getattr(MLFlowLogger, name)(self, *args)
                except Exception as e:  # the server is down: keep the batch, train on
                    if not self.warned:
                        print(f"tracking: {self._tracking_uri} unreachable ({_first_line(e)}); buffering metrics")
                        self.warned = True
                    return False
                self.pending.pop(0)
        if self.warned:
            print(f"tracking: {self._tracking_uri} reachable again; buffered metrics sent")
            self.warned = False
        return True

    def flush(self, wait: float) -> None:
        """Send the buffered metrics, retrying for up to ``wait`` seconds; TrackingError after that."""
        deadline = time.monotonic() + wait
        while not self._send():
            if time.monotonic() > deadline:
                raise TrackingError(
                    f"MLflow tracking server {self._tracking_uri} unreachable for {wait:.0f} s after training; "
                    f"{len(self.pending)} metric batch(es) unsent. The trained outputs are saved; "
                    "start the server and re-run, or set tracking.enabled: false"
                )
            time.sleep(min(5.0, max(0.5, wait / 20)))

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Mark the run terminated when everything is sent; otherwise leave it to the stage's ``flush``."""
        if self._send():
            with _fail_fast(), contextlib.suppress(Exception):
                super().finalize(status)


class _fail_fast:
    """Let MLflow's HTTP client fail at once (no retry back-off) while training is waiting on it."""

    KEYS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

    def __enter__(self) -> None:
        self.saved = {k: os.environ.get(k) for k in self.KEYS}
        os.environ.update(self.KEYS)

    def __exit__(self, *exc: Any) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
