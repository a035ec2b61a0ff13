"""Where the stages read and write (the ``outputs/`` layout of ``dvc.yaml``), and the loader of the data splits.

Paths are relative to the project root, where DVC runs every stage. Importing this module loads nothing but
:mod:`pathlib`: the flows read the layout without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ddpm.data import ImageSet

OUT = Path("outputs")

DATA = OUT / "data"  # prepare: train.npz, test.npz (uint8 splits) and info.json
DATA_INFO = DATA / "info.json"
FEATURIZER = OUT / "featurizer" / "featurizer.pt"  # featurizer: the classifier of "classifier FID"
TRAIN = OUT / "train"  # train: last.ckpt (resumable), model.pt, curves.csv and run.json
TRAIN_MODEL = TRAIN / "model.pt"  # the run's own EMA model
MODEL = OUT / "model" / "model.pt"  # ema: the EMA model that sample, sweep and guidance draw from
MODEL_RECORD = OUT / "model" / "ema.json"  # ema: which EMA that is (its length, and its MLflow Logged model)
EMA_SNAPSHOTS = TRAIN / "ema"  # snapshots of the power-function EMAs (train.ema_snapshot_stds); python -m ddpm.ema
RUN_RECORD = TRAIN / "run.json"  # the pipeline execution's MLflow run; the later stages log into it
SAMPLES = OUT / "samples"  # sample: samples.npz, grid.png, trajectory.png, meta.json
SAMPLES_NPZ = SAMPLES / "samples.npz"
SAMPLES_META = SAMPLES / "meta.json"
REGISTRY_RECORD = OUT / "evaluate" / "registry.json"  # evaluate: the registry decision
METRICS = OUT / "metrics"  # <stage>.json of featurizer, train and evaluate (DVC metrics)
SWEEP = OUT / "sweep"  # sweep: one <sampler>-<steps>.json per run
SWEEP_REPORT = OUT / "sweep_report"  # sweep_report: table.md and fid_vs_nfe.csv
GUIDANCE = OUT / "guidance"  # guidance: table.md and fid_vs_guidance.csv (the classifier-free guidance trade-off)


def split(name: str) -> Path:
    """The file of split ``name`` (``train`` or ``test``)."""
    return DATA / f"{name}.npz"


def metrics_file(stage: str) -> Path:
    """The metrics file of ``stage``."""
    return METRICS / f"{stage}.json"


def load_split(name: str) -> ImageSet:
    """The uint8 split ``name`` that the prepare stage wrote."""
    from ddpm import data  # on use: torch loads with it

    return data.load_npz(split(name))


def load_splits() -> tuple[ImageSet, ImageSet]:
    """The (train, test) splits that the prepare stage wrote."""
    return load_split("train"), load_split("test")
