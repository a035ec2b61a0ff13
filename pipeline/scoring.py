"""The scores of generated images, shared by the evaluate, sweep and guidance stages: FID and KID against the
reference split (see ddpm.metrics), and the featurizer's verdict on them (confidence; label accuracy when the
images were drawn for requested classes)."""

import numpy as np

from ddpm import featurizer, metrics
from ddpm.config import EvaluateConfig
from pipeline import paths


def score(fake: np.ndarray, cfg: EvaluateConfig, labels: np.ndarray | None = None) -> dict:
    """FID/KID of uint8 images ``fake`` against the reference split with the protocol, the featurizer's mean
    max-softmax ``confidence``, and with ``labels`` (the class asked for each image) its ``label_accuracy``."""
    real = paths.load_split(cfg.reference).images
    net, _ = featurizer.load_featurizer(paths.FEATURIZER)
    result = metrics.evaluate(real, fake, cfg, featurizer=net if cfg.features == "classifier" else None)
    return {**result, **featurizer.judge(net, fake, labels, batch_size=cfg.batch_size)}
