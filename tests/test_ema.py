"""The power-function EMA (ddpm.ema, EDM2 Sec. 3.1): its exponent, its decay and the average it keeps."""

import math

import numpy as np
import pytest

from ddpm import ema


@pytest.mark.parametrize("std", [0.01, 0.05, 0.09, 0.1, 0.15, 0.25, 0.28])
def test_gamma_and_std_are_inverse(std):
    gamma = ema.gamma_from_std(std)
    assert gamma > 0
    assert ema.std_from_gamma(gamma) == pytest.approx(std, rel=1e-9)


def test_gamma_of_the_papers_profiles():
    """EDM2 names sigma_rel 0.05 and 0.10 by gamma 16.97 and 6.94."""
    assert ema.gamma_from_std(0.05) == pytest.approx(16.97, abs=0.005)
    assert ema.gamma_from_std(0.10) == pytest.approx(6.94, abs=0.005)


@pytest.mark.parametrize("std", [0.0, -0.1, ema.STD_MAX, 0.3, math.inf])
def test_a_std_outside_the_profiles_fails_naming_it(std):
    with pytest.raises(ValueError, match=rf"ema std \(sigma_rel\)={std}: allowed 0 < std < 0.2887"):
        ema.gamma_from_std(std)


def test_the_first_update_copies_and_the_decay_grows_towards_one():
    gamma = ema.gamma_from_std(0.1)
    assert ema.power_decay(1, gamma) == 0.0
    decays = [ema.power_decay(t, gamma) for t in range(1, 5000)]
    assert decays == sorted(decays) and decays[-1] < 1


@pytest.mark.parametrize("std", [0.05, 0.15])
def test_the_ema_is_the_power_weighted_average_of_the_updates(std):
    """After t updates the EMA is sum_tau w_tau x_tau, w_tau = (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1): density ~ tau^g,
    whose standard deviation relative to t is sigma_rel."""
    gamma, t = ema.gamma_from_std(std), 4000
    x = np.random.default_rng(0).normal(size=(t, 3))
    average = np.zeros(3)
    for tau in range(1, t + 1):
        beta = ema.power_decay(tau, gamma)
        average = beta * average + (1 - beta) * x[tau - 1]
    tau = np.arange(1, t + 1, dtype=np.float64)
    w = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / t ** (gamma + 1)
    np.testing.assert_allclose(average, w @ x, rtol=1e-9, atol=1e-12)
    mean = (w * tau / t).sum()
    assert np.sqrt((w * (tau / t - mean) ** 2).sum()) == pytest.approx(std, rel=0.01)
