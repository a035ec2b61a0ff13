"""The feature network of "classifier FID": a small seeded CNN classifier trained on the real images.

Diffusion papers on MNIST-like data (where Inception-v3 features of 28x28 digits say little)
measure FID (Heusel et al. 2017) in the penultimate layer of a classifier trained on the
dataset itself. :class:`FeatureNet` is that classifier; :func:`train_featurizer` is a plain,
seeded torch loop; :func:`save_featurizer` / :func:`load_featurizer` round-trip it through a
file that ``torch.load(weights_only=True)`` reads; :func:`weights_hash` names its weights in
the FID protocol, since FIDs are comparable only under one feature network.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.config import ConfigError, FeaturizerConfig
from ddpm.io import atomic_path, load_weights_only

FORMAT = "ddpm.featurizer/1"


def to_float(images: Tensor) -> Tensor:
    """uint8 images [B, C, H, W] in 0..255 -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_nchw(images: np.ndarray) -> Tensor:
    """uint8 array [N, H, W, C] -> uint8 tensor [N, C, H, W] (a view of a C-contiguous array: no pixel copy)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def check_images(images: Any, name: str = "images") -> np.ndarray:
    """Return ``images`` if it is a uint8 array [N, H, W, C] with C in {1, 3} and H, W >= 8, else raise."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        got = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) else type(images)
        raise ValueError(f"{name} must be a uint8 array [N, H, W, C], got {got}")
    n, h, w, c = images.shape
    if c not in (1, 3) or h < 8 or w < 8:
        raise ValueError(f"{name} must have H, W >= 8 and C in (1, 3) (layout [N, H, W, C]), got shape {images.shape}")
    return images


class FeatureNet(nn.Module):
    """Three conv blocks, adaptive pooling, a linear feature layer [B, feature_dim] and a linear head.

    Works for any H, W >= 8. ``features`` is the penultimate layer before its ReLU, batch-normalized
    without affine parameters: on the training images each dimension has mean ~0 and variance ~1
    (so FID and KID values have a stable scale, and no dead ReLU makes the covariance singular).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, feature_dim: int = 128, width: int = 32) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.feature_dim, self.width = in_channels, num_classes, feature_dim, width
        chans = (in_channels, width, 2 * width, 4 * width)
        blocks: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:])):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            blocks.append(nn.MaxPool2d(2) if i < 2 else nn.AdaptiveAvgPool2d(2))
        self.body = nn.Sequential(*blocks, nn.Flatten())
        self.feature = nn.Sequential(nn.Linear(chans[-1] * 4, feature_dim), nn.BatchNorm1d(feature_dim, affine=False))
        self.head = nn.Linear(feature_dim, num_classes)

    def arch(self) -> dict[str, int]:
        """Constructor arguments that rebuild this architecture."""
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
            "width": self.width,
        }

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features [B, feature_dim] of images x [B, C, H, W] in [-1, 1]."""
        return self.feature(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits [B, num_classes] of images x [B, C, H, W] in [-1, 1]."""
        return self.head(F.relu(self.features(x)))


def _check_labels(labels: Any, n: int, name: str) -> Tensor:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or (n and labels.min() < 0):
        raise ValueError(f"{name} must be {n} non-negative integer class indices, got {labels.dtype} {labels.shape}")
    return torch.from_numpy(labels.astype(np.int64))


@torch.no_grad()
def classify(
    net: FeatureNet, images: np.ndarray, batch_size: int = 500, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """The class ``net`` predicts for each of ``images`` (uint8 [N, H, W, C]) and its softmax probability."""
    x = to_nchw(check_images(images))
    was_training = net.training
    net.eval()
    classes, probabilities = [], []
    for i in range(0, len(x), batch_size):
        p = F.softmax(net(to_float(x[i : i + batch_size].to(device))).float(), dim=1).max(1)
        classes.append(p.indices.cpu())
        probabilities.append(p.values.cpu())
    net.train(was_training)
    if not classes:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return torch.cat(classes).numpy(), torch.cat(probabilities).numpy()


def accuracy(net: FeatureNet, images: np.ndarray, labels: Any, batch_size: int = 500, device: str = "cpu") -> float:
    """Fraction of ``images`` (uint8 [N, H, W, C]) that ``net`` classifies as ``labels``."""
    return judge(net, images, labels, batch_size, device)["label_accuracy"]


def judge(
    net: FeatureNet, images: np.ndarray, labels: Any = None, batch_size: int = 500, device: str = "cpu"
) -> dict[str, float]:
    """How sure the classifier is of generated ``images``: ``confidence``, the mean max-softmax probability (clean
    digits score near the real test images' value), and with the requested ``labels`` the ``label_accuracy``,
    the share classified as the class asked for (a model that ignores its labels scores about 1/num_classes)."""
    y = None if labels is None else _check_labels(labels, len(images), "labels").numpy()
    predicted, probability = classify(net, images, batch_size, device)
    out = {"confidence": float(probability.mean()) if len(probability) else 0.0}
    if y is not None:
        out["label_accuracy"] = float((predicted == y).mean()) if len(y) else 0.0
    return out


def train_featurizer(
    images: np.ndarray,
    labels: Any,
    test_images: np.ndarray,
    test_labels: Any,
    cfg: FeaturizerConfig,
    device: str = "cpu",
) -> tuple[FeatureNet, dict[str, float]]:
    """Train the seeded classifier (Adam, cosine lr decay, cross-entropy); returns it in eval mode + metrics.

    Metrics: ``test_accuracy``, ``train_loss`` (mean over the last epoch) and ``train_seconds``.
    Deterministic for a seed on CPU (same thread count); the global RNG is left untouched. A
    trailing batch of one image is skipped (BatchNorm needs two).
    """
    x = to_nchw(check_images(images, "images"))
    y = _check_labels(labels, len(x), "labels")
    check_images(test_images, "test_images")
    if test_images.shape[1:] != images.shape[1:]:
        raise ValueError(f"test_images shape {test_images.shape[1:]} differs from images shape {images.shape[1:]}")
    if len(x) < 2:
        raise ValueError(f"the featurizer needs at least 2 training images, got {len(x)}")
    y_test = _check_labels(test_labels, len(test_images), "test_labels")
    num_classes = int(torch.cat([y, y_test]).max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = FeatureNet(x.shape[1], num_classes, cfg.feature_dim, cfg.width).to(device)
    g = torch.Generator().manual_seed(cfg.seed)
    starts = range(0, len(x) - 1, cfg.batch_size)  # no batch of one image
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * len(starts))
    start = time.perf_counter()
    net.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=g)
        total, seen = 0.0, 0
        for i in starts:
            idx = perm[i : i + cfg.batch_size]
            loss = F.cross_entropy(net(to_float(x[idx].to(device))), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_scheduler.step()
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
    train_seconds = time.perf_counter() - start
    net.eval().requires_grad_(False)
    metrics = {
        "test_accuracy": accuracy(net, test_images, test_labels, device=device),
        "train_loss": total / seen,
        "train_seconds": train_seconds,
    }
    return net, metrics


def weights_hash(net: nn.Module) -> str:
    """sha256 over the state_dict (names, dtypes, shapes and bytes, in sorted name order)."""
    h = hashlib.sha256()
    state = net.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_featurizer(path: str | os.PathLike[str], net: FeatureNet, cfg: FeaturizerConfig) -> None:
    """Write ``net`` (state_dict + architecture) and ``cfg`` to ``path`` atomically (temp file + rename)."""
    payload = {
        "format": FORMAT,
        "arch": net.arch(),
        "config": cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_featurizer(path: str | os.PathLike[str], device: str = "cpu") -> tuple[FeatureNet, FeaturizerConfig]:
    """Rebuild the featurizer written by :func:`save_featurizer` (``weights_only=True``: runs no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: featurizer weights not found; run the featurizer stage first")
    payload = load_weights_only(path, "featurizer")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a featurizer file (expected format {FORMAT!r})")
    try:
        cfg = FeaturizerConfig.from_dict(payload.get("config"), prefix=f"{path}: config")
        net = FeatureNet(**payload["arch"])
        net.load_state_dict(payload["state_dict"])
    except (ConfigError, KeyError, TypeError, RuntimeError) as e:
        reason = " ".join(str(e).split())
        raise ValueError(f"{path}: featurizer file does not match FeatureNet ({reason[:300]})") from None
    return net.to(device).eval().requires_grad_(False), cfg
