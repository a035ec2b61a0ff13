"""The data loaders of a training run: a resumable training loader and the validation loader.

The training loader's order depends only on the seed and the epoch, and Lightning saves and restores its
position with the checkpoint, so a resumed run sees exactly the batches an uninterrupted one would. The
validation loader serves fixed batches of :data:`VAL_BATCH_SIZE` images.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from ddpm import data

# Images per validation batch. Validation seeds its timesteps and noise with the batch index
# (DiffusionModule.validation_step), so this fixes which noise each image gets, and so the val loss.
VAL_BATCH_SIZE = 256


def dataset(images: data.ImageSet) -> TensorDataset:
    """(x in [-1, 1] [N, C, H, W], label) pairs of an ImageSet."""
    return TensorDataset(data.to_tensor(images.images), torch.from_numpy(images.labels).long())


def _world() -> tuple[int, int]:
    """(world size, rank) of the initialized process group, else (1, 0)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class EpochSampler(Sampler[int]):
    """Indices of a permutation that depends only on (seed, epoch), this rank's shard of it, from ``start`` once.

    Lightning calls ``set_epoch``; ``start`` (set when resuming) skips the first indices of the next pass.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // _world()[0]

    def __iter__(self) -> Iterator[int]:
        world, rank = _world()
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        start, self.start = self.start, 0
        return iter(order[: len(self) * world][rank::world][start:].tolist())


class ResumableLoader(DataLoader):
    """Shuffled full batches in an order fixed by (seed, epoch); Lightning saves and restores its position.

    ``state_dict`` (the epoch and the batches served in it) goes into Lightning's checkpoint, and
    ``load_state_dict`` makes the next pass start where the checkpointed run was.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0) -> None:
        self.epoch_sampler = EpochSampler(len(dataset), seed)
        self.served = 0
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=self.epoch_sampler,
            drop_last=True,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed),  # worker seeds; keeps the global RNG untouched
        )

    def __iter__(self) -> Iterator[Any]:
        self.served = self.epoch_sampler.start // self.batch_size
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.epoch_sampler.seed, "epoch": self.epoch_sampler.epoch, "batches": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.epoch_sampler.seed:
            raise ValueError(f"the checkpoint's data order has seed {state['seed']}, not {self.epoch_sampler.seed}")
        epoch, batches = state["epoch"], state["batches"]
        if batches >= len(self):  # saved after the last batch of an epoch: the next one starts afresh
            epoch, batches = epoch + 1, 0
        self.epoch_sampler.epoch, self.epoch_sampler.start, self.served = epoch, batches * self.batch_size, batches


def val_loader(images: data.ImageSet, seed: int, num_workers: int = 0) -> DataLoader:
    """The images in order, in batches of :data:`VAL_BATCH_SIZE` (the last one may be smaller)."""
    return DataLoader(
        dataset(images),
        batch_size=VAL_BATCH_SIZE,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),  # worker seeds; keeps the global RNG untouched
    )
