"""Evaluation: images per second of the FID feature extractors (the classifier FeatureNet and Inception-v3)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.configs import Plan
from benchmarks.report import num, table
from benchmarks.timing import Timer


def evaluation(plan: Plan, timer: Timer, device: torch.device) -> dict[str, float]:
    """FID feature-extraction images/s: the classifier FeatureNet and Inception-v3 (random weights), uint8 input."""
    from ddpm import metrics
    from ddpm.featurizer import FeatureNet, to_nchw

    name, cfg = plan.first
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (plan.eval_batch, cfg.image_size, cfg.image_size, cfg.in_channels), dtype=np.uint8)
    torch.manual_seed(0)
    extractors = {"classifier (FeatureNet)": (metrics.UInt8Features(FeatureNet(cfg.in_channels, 10)), plan.eval_batch)}
    with suppress(ImportError):  # the inception extra is not installed
        extractors["Inception-v3 pool3 (random weights)"] = (random_inception(), plan.inception_batch)

    def call(extractor: nn.Module, n: int) -> Callable[[], None]:
        x = to_nchw(images[:n]).contiguous().to(device)

        def run() -> None:
            with torch.inference_mode():
                extractor(x)

        return run

    extractors = {k: (e.to(device).eval(), n) for k, (e, n) in extractors.items()}
    seconds = timer.group({k: call(e, n) for k, (e, n) in extractors.items()}, max(2, plan.reps[name]), 1)
    return {k: extractors[k][1] / v for k, v in seconds.items()}


def random_inception() -> nn.Module:
    """ddpm.metrics' Inception-v3 feature network loaded from a randomly initialised weights file (for timing)."""
    from ddpm import metrics

    metrics._require_inception_extra()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInit(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
            """Keep the random initialisation (the constructor insists on loading weights)."""

    with tempfile.TemporaryDirectory() as tmp:
        empty, weights = Path(tmp, "empty.pt"), Path(tmp, "inception.pt")
        torch.save({}, empty)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = RandomInit("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
        torch.save(net.state_dict(), weights)
        return metrics.load_inception(weights)


def section(evals: dict[str, float]) -> list[str]:
    """The report's evaluation table."""
    lines = ["## Evaluation (FID feature extraction, uint8 images in, inference_mode)", ""]
    return lines + table(["features", "img/s"], [[k, num(v)] for k, v in evals.items()])
