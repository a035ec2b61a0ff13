import math

import pytest
import torch

from ddpm import schedules


@pytest.mark.parametrize("name", list(schedules.SCHEDULES))
@pytest.mark.parametrize("T", [10, 1000])
def test_schedule_invariants(name, T):
    ab = schedules.alphas_cumprod(name, T)
    assert ab.dtype == torch.float64 and ab.shape == (T,)
    assert bool(((ab > 0) & (ab < 1)).all())
    assert bool((ab[1:] < ab[:-1]).all()), "alpha_bar must decrease strictly"
    assert ab[0] > 0.9 and ab[-1] < 0.01
    b = schedules.betas(ab)
    assert bool(((b > 0) & (b < 1)).all())
    torch.testing.assert_close(torch.cumprod(1 - b, 0), ab)


def test_linear_matches_ho_et_al():
    ab = schedules.alphas_cumprod("linear", 1000)
    betas = schedules.betas(ab)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-9)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-9)
    expected = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000))
    assert ab[-1].item() == pytest.approx(expected, rel=1e-9)


def test_cosine_matches_closed_form_and_clips():
    T, s = 1000, 0.008
    ab = schedules.alphas_cumprod("cosine", T)

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    for t in [0, 10, 500, 900]:  # unclipped region: alpha_bar_t = f((t+1)/T) / f(0)
        assert ab[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)
    assert schedules.betas(ab).max().item() == pytest.approx(0.999)


def test_exp_closed_form():
    T = 1000
    ab = schedules.alphas_cumprod("exp", T)
    for t in [0, 499, 999]:
        s = (t + 1) / T
        assert ab[t].item() == pytest.approx(math.exp(-0.5 * (19.9 * s**2 + 1e-4)), rel=1e-12)


@pytest.mark.parametrize(("start", "end", "tau"), [(-3.0, 3.0, 1.0), (0.0, 3.0, 0.7), (-3.0, 3.0, 0.5)])
def test_sigmoid_matches_closed_form_and_clips(start, end, tau):
    """Chen 2023, Algorithm 1: alpha_bar(u) = (v(end) - v(u (end - start) + start)) / (v(end) - v(start)) with
    v(z) = 1 / (1 + exp(-z / tau)); alpha_bar_t = alpha_bar((t+1)/T) / alpha_bar(0) = alpha_bar((t+1)/T) until the
    last beta, 1 - alpha_bar(1) / alpha_bar((T-1)/T) = 1, is clipped to 0.999."""
    T = 1000
    ab = schedules.alphas_cumprod("sigmoid", T, start=start, end=end, tau=tau)

    def v(z):
        return 1 / (1 + math.exp(-z / tau))

    def f(u):
        return (v(end) - v(u * (end - start) + start)) / (v(end) - v(start))

    assert f(0) == 1 and f(1) == 0
    for t in [0, 1, 10, 500, 900, 998]:
        assert ab[t].item() == pytest.approx(f((t + 1) / T), rel=1e-9)
    assert ab[-1].item() == pytest.approx(f((T - 1) / T) * (1 - 0.999), rel=1e-9)


def test_sigmoid_endpoints_and_options():
    ab = schedules.alphas_cumprod("sigmoid", 1000)
    steep = schedules.alphas_cumprod("sigmoid", 1000, tau=0.5)
    assert not torch.allclose(ab, steep)
    assert schedules.betas(ab).max().item() <= 0.999 + 1e-12


def test_snr_is_monotone():
    snr = schedules.snr(schedules.alphas_cumprod("linear", 100))
    assert bool((snr[1:] < snr[:-1]).all())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "quadratic"}, "allowed: linear, cosine, exp, sigmoid"),
        ({"name": "linear", "T": 1}, "T=1"),
        ({"name": "linear", "T": 10.5}, "integer >= 2"),
        ({"name": "cosine", "T": 10, "beta_end": 0.1}, "allowed: s, max_beta"),
    ],
)
def test_bad_schedule_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        schedules.alphas_cumprod(**kwargs)
