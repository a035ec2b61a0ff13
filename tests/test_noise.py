import pytest
import torch

from ddpm.noise import SampleNoise, mix32, randn_like


def test_noise_is_standard_normal():
    z = SampleNoise(0).randn_like(torch.empty(2000, 3, 8, 8))
    assert z.shape == (2000, 3, 8, 8) and z.dtype == torch.float32
    assert abs(z.mean().item()) < 0.01
    assert z.std().item() == pytest.approx(1.0, abs=0.01)
    assert (z**4).mean().item() == pytest.approx(3.0, abs=0.1)  # Gaussian kurtosis
    assert (z > 1.96).float().mean().item() == pytest.approx(0.025, abs=0.002)


def test_rows_depend_only_on_seed_and_sample_index():
    x = torch.empty(10, 1, 5, 5)
    whole = SampleNoise(3).randn_like(x)
    parts = torch.cat([SampleNoise(3, start).randn_like(x[start : start + 3]) for start in range(0, 10, 3)])
    assert torch.equal(whole, parts)


def test_draws_seeds_and_samples_are_decorrelated():
    x = torch.empty(256, 64)
    noise = SampleNoise(1)
    first, second = noise.randn_like(x), noise.randn_like(x)
    other_seed = SampleNoise(2).randn_like(x)
    assert noise.draws == 2
    for a, b in [(first, second), (first, other_seed), (first[:128], first[128:])]:
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(corr.item()) < 0.02
    rows = torch.corrcoef(first)
    assert (rows - torch.eye(256)).abs().max().item() < 0.6  # 64-dim rows: max |r| of 32k pairs stays well below


def test_large_seeds_and_indices_work_and_differ():
    x = torch.empty(2, 16)
    a = SampleNoise(2**63 + 5, 2**40).randn_like(x)
    b = SampleNoise(5, 2**40).randn_like(x)
    assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_mix32_stays_in_uint32_and_avalanches():
    x = torch.arange(1 << 12, dtype=torch.int64)
    h = mix32(x)
    assert int(h.min()) >= 0 and int(h.max()) < 2**32
    assert len(torch.unique(h)) == len(x)
    flipped = mix32(x ^ 1)
    bits = torch.stack([((h ^ flipped) >> k) & 1 for k in range(32)]).float().mean()
    assert bits.item() == pytest.approx(0.5, abs=0.02)


def test_randn_like_accepts_torch_generators():
    x = torch.empty(4, 3, dtype=torch.float64)
    a = randn_like(x, torch.Generator().manual_seed(0))
    assert a.dtype == torch.float64 and torch.equal(a, randn_like(x, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize(("seed", "start"), [(-1, 0), (2**64, 0), (1.5, 0), (0, -2)])
def test_bad_seed_or_start(seed, start):
    with pytest.raises(ValueError, match="is invalid; allowed"):
        SampleNoise(seed, start)
