"""A small ``fit.train`` run for the fault-injection tests (``tests/test_faults.py``).

Usage: ``python tests/fault_train.py DATA_DIR OUT_DIR [--sleep S] [--die-at-checkpoint N]``

``DATA_DIR`` holds ``train.npz`` and ``test.npz`` (``ddpm.data.save_npz``); the run is exactly the one
:func:`run` makes in-process. ``--sleep`` pauses after every step (the weights do not change) so that a
test can kill the process mid-run; ``--die-at-checkpoint N`` SIGKILLs the process itself while it writes
its N-th resume checkpoint: the temp file is complete and synced, the rename has not happened.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from ddpm import checkpoints, data, datasets, fit  # noqa: E402
from ddpm.config import DataConfig, TrainConfig  # noqa: E402

MODEL = {
    "channels": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [4],
    "num_heads": 2,
    "norm_groups": 8,
    "dropout": 0.1,  # dropout draws from the global torch RNG: a resume must restore it
}
DIFFUSION = {"T": 100, "steps": 10}
TRAIN = {
    "max_steps": 40,
    "batch_size": 32,
    "lr": 2e-3,
    "warmup_steps": 5,
    "ema_decay": 0.9,
    "ema_snapshot_stds": [0.05, 0.1],  # their averages resume too; snapshots every 8 steps, in ema/
    "ema_snapshot_every": 8,
    "val_every": 20,
    "log_every": 5,
    "checkpoint_every": 5,
    "accelerator": "cpu",
    "precision": "32-true",
}


class FirstStep(pl.Callback):
    """The global step at which fit started (0, or the step resumed from)."""

    step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.step = trainer.global_step


def save_digits(folder: Path) -> Path:
    """Write train.npz (360) and test.npz (40) of scikit-learn's 8x8 digits into ``folder``; return it."""
    train_set, test_set = datasets.split(datasets.load(DataConfig(dataset="digits")), 0.1, seed=0, limit=400)
    data.save_npz(folder / "train.npz", train_set)
    data.save_npz(folder / "test.npz", test_set)
    return folder


def run(data_dir: str | Path, out_dir: str | Path, callbacks: tuple = (), **overrides: Any) -> dict[str, float]:
    """``fit.train`` on the digits in ``data_dir`` with the settings above (``overrides`` replace some)."""
    torch.set_num_threads(1)
    data_dir = Path(data_dir)
    train_set, test_set = data.load_npz(data_dir / "train.npz"), data.load_npz(data_dir / "test.npz")
    cfg = TrainConfig(**{**TRAIN, **overrides})
    return fit.train(train_set, test_set, MODEL, DIFFUSION, cfg, out_dir, progress=False, callbacks=callbacks)


class Sleep(pl.Callback):
    """Pause after every step."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(self.seconds)


def die_at_checkpoint(n: int) -> None:
    """SIGKILL this process when it is about to rename its ``n``-th resume checkpoint into place."""
    replace, count = os.replace, [0]

    def dying_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if Path(dst).name == checkpoints.RESUME:
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst, *args, **kwargs)

    os.replace = dying_replace


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--die-at-checkpoint", type=int)
    args = parser.parse_args()
    if args.die_at_checkpoint:
        die_at_checkpoint(args.die_at_checkpoint)
    print(run(args.data_dir, args.out_dir, callbacks=(Sleep(args.sleep),) if args.sleep else ()))
