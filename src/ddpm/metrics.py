"""FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) between generated and real images, via torchmetrics.

Two feature networks, chosen by ``evaluate.features``:

- ``classifier`` (the offline default, "classifier FID"): the penultimate layer of the
  :class:`~ddpm.featurizer.FeatureNet` trained on the real images by the featurizer stage.
- ``inception``: the pytorch-fid / TF Inception-v3 pool3 features (2048-d), as torchmetrics
  builds them (``NoTrainInceptionV3``, torch-fidelity's port of the 2015-12-05 TF graph) from a
  local weights file. Needs the ``inception`` extra (torch-fidelity, torchvision).

Each image batch goes through the feature network once; its features feed both torchmetrics
metrics (``FrechetInceptionDistance`` and ``KernelInceptionDistance``, each given an identity
feature module), so the Fréchet distance and the MMD are torchmetrics' own. FIDs are comparable
only under one protocol, so every result carries it: the feature network, a hash of its weights,
the reference split and the sample counts.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance

from ddpm.config import FEATURES, INCEPTION_FILE, EvaluateConfig
from ddpm.featurizer import FeatureNet, check_images, load_weights_only, to_float, to_nchw, weights_hash

INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_EXTRA = "pip install -e .[inception]"


class UInt8Features(nn.Module):
    """A FeatureNet as a torchmetrics feature extractor: uint8 images [B, C, H, W] -> features [B, D] float32.

    ``num_features`` spares torchmetrics its dummy forward pass (which would use a 3x299x299 image).
    """

    def __init__(self, net: FeatureNet) -> None:
        super().__init__()
        self.net = net
        self.num_features = net.feature_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(to_float(x))


class _InceptionFeatures(nn.Module):
    """pool3 features [B, 2048] of uint8 images [B, C, H, W]; grey images are repeated to 3 channels."""

    num_features = 2048

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


class _Precomputed(nn.Module):
    """Identity feature module: torchmetrics accumulates features that were extracted once for FID and KID."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def fid_kid_from_features(
    real: Iterable[Tensor],
    fake: Iterable[Tensor],
    num_features: int,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
) -> dict[str, float | int]:
    """FID and KID (torchmetrics) of feature batches [B, num_features]; KID's random subsets are seeded."""
    fid = FrechetInceptionDistance(feature=_Precomputed(num_features))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(
            feature=_Precomputed(num_features), subsets=kid_subsets, subset_size=kid_subset_size
        )
    for batches, is_real in ((real, True), (fake, False)):
        for features in batches:
            fid.update(features, real=is_real)
            kid.update(features, real=is_real)
    n_ref, n_gen = int(fid.real_features_num_samples), int(fid.fake_features_num_samples)
    if min(n_ref, n_gen) < kid_subset_size:
        raise ValueError(f"kid_subset_size={kid_subset_size} exceeds the image count (n_gen={n_gen}, n_ref={n_ref})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid": float(kid_mean),
        "kid_std": float(kid_std),
        "n_gen": n_gen,
        "n_ref": n_ref,
        "kid_subset_size": kid_subset_size,
        "kid_subsets": kid_subsets,
    }


def _require_inception_extra() -> None:
    try:
        import torch_fidelity  # noqa: F401  (imports torchvision as well)
        import torchvision  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"features='inception' needs torch-fidelity and torchvision ({e}); install the inception extra: "
            f"{INCEPTION_EXTRA}"
        ) from None


def _download(url: str, dst: Path, timeout: float = 60.0) -> None:
    """Fetch ``url`` to ``dst`` atomically, checking the sha256 prefix that ends the file name (torch hub style)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    hash_prefix = dst.stem.rsplit("-", 1)[-1]
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".partial")
    try:
        sha256 = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                sha256.update(chunk)
                f.write(chunk)
        if not sha256.hexdigest().startswith(hash_prefix):
            raise OSError(f"sha256 {sha256.hexdigest()[:8]} of {url} does not match {hash_prefix}")
        os.replace(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)


def inception_weights_path(weights: str | os.PathLike[str] | None) -> Path:
    """The Inception-v3 weights file: ``weights`` if given, else the torch hub cache (downloaded once, if online)."""
    how = f"download {INCEPTION_URL} and set evaluate.inception_weights to its path"
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"evaluate.inception_weights={str(weights)!r}: no such file; {how}")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not cached.is_file():
        try:
            _download(INCEPTION_URL, cached)
        except (OSError, http.client.HTTPException) as e:
            raise FileNotFoundError(
                f"Inception-v3 weights are not in {cached} and could not be fetched ({e}); "
                f"{how} (or put the file at {cached})"
            ) from None
    return cached


def load_inception(weights: str | os.PathLike[str] | None = None) -> nn.Module:
    """torchmetrics' pytorch-fid Inception-v3 (pool3, 2048-d, TF-compatible resize to 299) from a local file.

    The file must be a plain state_dict: it is first read with ``weights_only=True`` (so a crafted
    pickle is refused before torch-fidelity, which loads it with ``weights_only=False``, sees it).
    """
    _require_inception_extra()
    path = inception_weights_path(weights)
    state = load_weights_only(path, "Inception-v3 weights")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: not an Inception-v3 state_dict (expected a mapping of names to tensors)")
    del state
    try:
        net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=str(path),
            antialias=False,
        )
    except RuntimeError as e:
        raise ValueError(f"{path}: state_dict does not match Inception-v3 ({' '.join(str(e).split())[:300]})") from None
    return _InceptionFeatures(net)


def feature_extractor(
    features: str, featurizer: FeatureNet | None = None, inception_weights: str | os.PathLike[str] | None = None
) -> tuple[nn.Module, str]:
    """The feature module (uint8 [B, C, H, W] -> [B, D]; ``num_features``; core network ``.net``) and its name."""
    if features == "classifier":
        if featurizer is None:
            raise ValueError("features='classifier' needs the trained featurizer (see ddpm.featurizer.load_featurizer)")
        if inception_weights is not None:
            raise ValueError("inception_weights applies to features='inception' only")
        return UInt8Features(featurizer), f"classifier/FeatureNet/{featurizer.feature_dim}"
    if features == "inception":
        if featurizer is not None:
            raise ValueError("featurizer applies to features='classifier' only")
        return load_inception(inception_weights), "inception-v3-compat/pool3/2048"
    raise ValueError(f"features={features!r}: allowed: {', '.join(FEATURES)}")


def _batches(extractor: nn.Module, images: np.ndarray, batch_size: int, device: str | torch.device) -> Iterator[Tensor]:
    """Features [B, D] (float32, CPU) of uint8 images [N, H, W, C], one batch in memory at a time."""
    for i in range(0, len(images), batch_size):
        x = to_nchw(images[i : i + batch_size]).contiguous().to(device)
        with torch.inference_mode():
            yield extractor(x).float().cpu()


def compute_fid_kid(
    real: np.ndarray,
    fake: np.ndarray,
    features: str = "classifier",
    featurizer: FeatureNet | None = None,
    inception_weights: str | os.PathLike[str] | None = None,
    batch_size: int = 250,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """FID and KID of ``fake`` against ``real`` (uint8 [N, H, W, C]) with the protocol: network and weights hash.

    The feature network is put in eval mode on ``device``; ``kid_subset_size`` is capped at the
    smaller image count (the value used is in the result).
    """
    check_images(real, "real")
    check_images(fake, "fake")
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"real images {real.shape[1:]} and fake images {fake.shape[1:]} differ in [H, W, C]")
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got n_ref={len(real)}, n_gen={len(fake)}")
    if featurizer is not None and featurizer.in_channels != real.shape[3]:
        raise ValueError(f"the featurizer takes {featurizer.in_channels}-channel images, got shape {real.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    extractor, name = feature_extractor(features, featurizer, inception_weights)
    extractor = extractor.to(device).eval()
    result = fid_kid_from_features(
        _batches(extractor, real, batch_size, device),
        _batches(extractor, fake, batch_size, device),
        num_features=extractor.num_features,
        kid_subset_size=min(kid_subset_size, len(real), len(fake)),
        kid_subsets=kid_subsets,
        seed=seed,
    )
    return {**result, "feature_network": name, "feature_weights_hash": weights_hash(extractor.net)}


def evaluate(
    real: np.ndarray,
    fake: np.ndarray,
    cfg: EvaluateConfig,
    featurizer: FeatureNet | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """The evaluate stage's metrics: FID, KID, n_gen, n_ref and the protocol (features, weights hash, reference)."""
    result = compute_fid_kid(
        real,
        fake,
        features=cfg.features,
        featurizer=featurizer,
        inception_weights=cfg.inception_weights if cfg.features == "inception" else None,
        batch_size=cfg.batch_size,
        kid_subset_size=cfg.kid_subset_size,
        kid_subsets=cfg.kid_subsets,
        seed=cfg.seed,
        device=device,
    )
    return {**result, "reference": cfg.reference}
