"""FID and KID of generated images against the reference split: the scoring of the evaluate and sweep stages."""

import numpy as np

from ddpm import featurizer, metrics
from ddpm.config import EvaluateConfig
from pipeline import paths


def score(fake: np.ndarray, cfg: EvaluateConfig) -> dict:
    """FID/KID of uint8 images ``fake`` against the reference split, with the protocol (see ddpm.metrics)."""
    real = paths.load_split(cfg.reference).images
    net = None
    if cfg.features == "classifier":
        net, _ = featurizer.load_featurizer(paths.FEATURIZER)
    return metrics.evaluate(real, fake, cfg, featurizer=net)
