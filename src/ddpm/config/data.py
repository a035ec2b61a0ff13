"""``DataConfig``: the ``data`` section (which dataset, at what size, how it is split), and what each dataset
needs and yields before anything is loaded. :mod:`ddpm.datasets` holds the loaders under the same names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from ddpm.config.base import Config


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset needs from the config (a ``root`` folder, an ``image_size``) and its native shape."""

    needs_root: bool
    needs_size: bool = False
    size: int | None = None  # native height and width (None: set by the files or image_size)
    channels: int = 1  # native channels


DATASETS: dict[str, DatasetSpec] = {
    "mnist5k": DatasetSpec(needs_root=False, size=28),
    "digits": DatasetSpec(needs_root=False, size=8),
    "mnist": DatasetSpec(needs_root=True, size=28),
    "cifar10": DatasetSpec(needs_root=True, size=32, channels=3),
    "image_folder": DatasetSpec(needs_root=True, needs_size=True, channels=3),
}

DatasetName = Literal[tuple(DATASETS)]  # type: ignore[valid-type]


class DataConfig(Config):
    """The ``data`` section: which dataset to load, at what size, and how to split it."""

    dataset: DatasetName = Field("mnist5k", description="dataset to load (see ddpm.datasets)")
    root: str | None = Field(None, description="folder of mnist / cifar10 / image_folder files")
    image_size: int | None = Field(None, ge=1, description="output height and width; null = the dataset's own")
    channels: Literal[1, 3] | None = Field(
        None, description="1 grey or 3 RGB; null = the dataset's own (RGB for folders)"
    )
    test_fraction: float = Field(0.1, gt=0, lt=1, description="fraction of images held out for test")
    seed: int = Field(0, ge=0, description="seed of the train/test shuffle")
    limit: int | None = Field(None, ge=2, description="keep only the first `limit` shuffled images (smoke runs)")

    @model_validator(mode="after")
    def _root_and_size(self) -> DataConfig:
        source = DATASETS[self.dataset]
        if source.needs_root and self.root is None:
            raise ValueError(f"root=None: dataset={self.dataset!r} needs root, the folder holding its files")
        if not source.needs_root and self.root is not None:
            raise ValueError(f"root={self.root!r}: dataset={self.dataset!r} reads no folder; allowed: null")
        if source.needs_size and self.image_size is None:
            raise ValueError(f"image_size=None: dataset={self.dataset!r} needs image_size, a positive integer")
        return self

    def native_shape(self) -> tuple[int, int]:
        """(image_size, channels) that loading this dataset produces, known before loading anything."""
        spec = DATASETS[self.dataset]
        return self.image_size or spec.size, self.channels or spec.channels
