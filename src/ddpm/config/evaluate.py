"""The ``featurizer`` and ``evaluate`` sections: the classifier behind "classifier FID", and the FID/KID protocol."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field

from ddpm.config.base import Config

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's port of the TF Inception-v3
FeaturesName = Literal["classifier", "inception"]
FEATURES = get_args(FeaturesName)


class FeaturizerConfig(Config):
    """Training of the classifier whose penultimate layer gives the FID features."""

    epochs: int = Field(4, ge=1, description="passes over the training images")
    batch_size: int = Field(32, ge=2, description="images per optimizer step (BatchNorm needs 2)")
    lr: float = Field(2e-3, gt=0, description="Adam learning rate (cosine-decayed to 0 over training)")
    feature_dim: int = Field(128, ge=2, description="dimension of the penultimate (feature) layer")
    width: int = Field(32, ge=1, description="channels of the first conv block (doubled per block)")
    seed: int = Field(0, ge=0, lt=2**64, description="seed of the initial weights and the batch order")


class EvaluateConfig(Config):
    """FID/KID protocol of the evaluate stage (sample counts are the sample stage's ``n`` and the split size)."""

    features: FeaturesName = Field("classifier", description="feature network: classifier or inception")
    inception_weights: str | None = Field(
        None, description=f"local {INCEPTION_FILE} (features: inception); null: the torch hub cache, fetched if online"
    )
    reference: Literal["train", "test"] = Field("train", description="real split the samples are compared to")
    batch_size: int = Field(250, ge=1, description="images per feature-extraction batch")
    kid_subset_size: int = Field(1000, ge=2, description="KID subset size (capped at the smaller image count)")
    kid_subsets: int = Field(100, ge=1, description="number of random KID subsets")
    seed: int = Field(0, ge=0, lt=2**64, description="seed of the KID subsets")
