"""Fit the tiny DiffusionModule with 2-process CPU DDP (gloo) and write checksums per rank.

Usage: ``python tests/ddp_fit.py OUT_DIR``

Lightning's ``strategy="ddp"`` re-launches this same command for rank 1, so this must be a
script (not run inside pytest). Every rank writes ``OUT_DIR/rank{r}.json`` with the SHA-256
of its final ``net`` and ``ema`` weights and the sample indices it trained on in epoch 0;
rank 0 also writes ``OUT_DIR/result.json`` with the world size, the backend and its checksums.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS), str(TESTS.parent)]  # conftest, and the `pipeline` package it imports

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from conftest import TINY_NET_KWARGS, make_toy_images  # noqa: E402
from ddpm import DDPMConfig, DiffusionModule, OptimConfig, UNet  # noqa: E402

N_IMAGES = 64
BATCH_SIZE = 8
MAX_STEPS = 10


def checksum(module: torch.nn.Module) -> str:
    """SHA-256 over the names and exact bytes of every state-dict tensor."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Record(pl.Callback):
    """Remember the process-group backend and the sample indices seen in epoch 0."""

    def __init__(self) -> None:
        self.backend: str | None = None
        self.seen_epoch0: list[int] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.backend = str(torch.distributed.get_backend())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:
            self.seen_epoch0.extend(int(i) for i in batch[1])


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    images = make_toy_images(N_IMAGES, seed=0)
    # The "labels" are sample indices; the unconditional net ignores them.
    dataset = TensorDataset(images, torch.arange(N_IMAGES))
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True)
    module = DiffusionModule(
        UNet(**TINY_NET_KWARGS),
        DDPMConfig(image_size=8, T=100, steps=10),
        OptimConfig(lr=2e-3, ema_decay=0.9),
    )
    initial = checksum(module.net)
    record = Record()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=MAX_STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out_dir / "root"),
        callbacks=[record],
    )
    trainer.fit(module, loader)

    rank = trainer.global_rank
    info = {
        "rank": rank,
        "world_size": trainer.world_size,
        "backend": record.backend,
        "global_step": trainer.global_step,
        "initial_net": initial,
        "net": checksum(module.net),
        "ema": checksum(module.ema),
        "seen_epoch0": sorted(record.seen_epoch0),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(info))
    if rank == 0:
        keys = ("world_size", "backend", "global_step", "initial_net", "net", "ema")
        (out_dir / "result.json").write_text(json.dumps({k: info[k] for k in keys}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/ddp_fit.py OUT_DIR")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    main(out)
