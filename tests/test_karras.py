"""Sigma schedules and the Karras-family samplers against closed forms.

For Gaussian data N(mu, s^2) the exact denoiser D(x; sigma) = mu + (x - mu) s^2 / (s^2 + sigma^2)
makes every step affine, so a run on two points gives a deterministic sampler's exact map x_T -> x_0,
and ``exact_moments`` gives a stochastic one's exact output mean and std.
"""

import math

import pytest
import torch

from ddpm import generate, samplers, schedules
from ddpm.config import DDPMConfig
from ddpm.noise import SampleNoise
from ddpm.preconditioning import DDPM, Denoiser
from gaussian import GaussianOracle, edm_denoiser, exact_moments, normal

MU, S = 1.0, 0.5
D = edm_denoiser(MU, S)
SIGMA_MAX = 80.0
SIGMA_SAMPLERS = ["euler", "heun", "euler_maruyama", "dpmpp_2m"]


def affine_map(sampler, n: int, **kw) -> tuple[float, float]:
    """(intercept, slope) of a deterministic sampler's map x_T -> x_0 over n karras steps."""
    out = sampler(D, torch.tensor([[0.0], [1.0]], dtype=torch.float64), schedules.karras_sigmas(n), **kw)[:, 0]
    return out[0].item(), (out[1] - out[0]).item()


def flow_errors(sampler, n: int) -> tuple[float, float]:
    """Errors of (mean, relative std) against the exact probability-flow map from sigma_max to 0."""
    slope_exact = S / math.sqrt(S**2 + SIGMA_MAX**2)
    b, a = affine_map(sampler, n)
    return b - MU * (1 - slope_exact), a / slope_exact - 1


# ---------------------------------------------------------------- sigma schedules


def test_karras_sigmas_follow_edm_eq_5():
    sigmas = schedules.karras_sigmas(18)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (19,)
    expected = [(80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(18)]
    assert sigmas[:-1].tolist() == pytest.approx(expected, rel=1e-12)
    assert sigmas[0] == 80.0 and sigmas[-2].item() == pytest.approx(0.002) and sigmas[-1] == 0
    linear = schedules.karras_sigmas(4, 1.0, 4.0, rho=1.0)
    assert linear.tolist() == pytest.approx([4.0, 3.0, 2.0, 1.0, 0.0])
    assert schedules.karras_sigmas(1).tolist() == [80.0, 0.0]


def test_exponential_vp_and_ve_discretisations():
    exp = schedules.exponential_sigmas(10, 0.01, 10.0)
    ratios = exp[1:-1] / exp[:-2]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 0.001 ** (1 / 9)))
    assert exp[0].item() == pytest.approx(10.0) and exp[-2].item() == pytest.approx(0.01) and exp[-1] == 0
    assert torch.equal(schedules.SIGMA_SCHEDULES["ve"](10, 0.01, 10.0), exp)
    # EDM Table 1 VP: t_i = 1 + i / (n - 1) (eps_s - 1), sigma_i = sigma(t_i)
    eps_s = 1e-3
    sigma_lo, sigma_hi = schedules.vp_sigma(torch.tensor([eps_s, 1.0], dtype=torch.float64)).tolist()
    vp = schedules.vp_sigmas(8, sigma_lo, sigma_hi)
    t = 1 + torch.arange(8, dtype=torch.float64) / 7 * (eps_s - 1)
    torch.testing.assert_close(vp[:-1], schedules.vp_sigma(t))
    torch.testing.assert_close(schedules.vp_sigma_inv(schedules.vp_sigma(t)), t)
    for name, fn in schedules.SIGMA_SCHEDULES.items():
        s = fn(12, 0.02, 50.0)
        assert bool((s[1:] < s[:-1]).all()) and s[-1] == 0, name


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: schedules.karras_sigmas(0), r"n=0 is invalid"),
        (lambda: schedules.karras_sigmas(5, 1.0, 1.0), r"0 < sigma_min < sigma_max"),
        (lambda: schedules.exponential_sigmas(5, 0.0, 1.0), r"0 < sigma_min < sigma_max"),
        (lambda: schedules.karras_sigmas(5, rho=0.0), r"rho=0.0 is invalid"),
        (lambda: samplers.euler(D, normal(2), torch.tensor([1.0, 2.0, 0.0])), "decrease strictly"),
        (lambda: samplers.heun(D, normal(2), torch.tensor([1.0, -0.5])), "last value >= 0"),
        (lambda: samplers.dpmpp_2m(D, normal(2), torch.tensor([1.0])), r"1-D tensor \[n \+ 1\]"),
        (lambda: samplers.heun(D, normal(2), schedules.karras_sigmas(3), S_churn=-1.0), "S_churn >= 0"),
        (lambda: samplers.euler(D, normal(2), schedules.karras_sigmas(3), S_noise=0.0), "S_noise > 0"),
        (lambda: samplers.euler_maruyama(D, torch.zeros(3), schedules.karras_sigmas(3)), "batch dimension"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------- convergence against the exact flow


def test_euler_is_first_order():
    errors = [flow_errors(samplers.euler, n) for n in (18, 36, 72, 144)]
    for (mean0, std0), (mean1, std1) in zip(errors, errors[1:]):
        assert 0.45 < std1 / std0 < 0.55, errors  # observed 0.51, 0.51, 0.50
        assert 0.45 < mean1 / mean0 < 0.55, errors


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m"])
def test_heun_and_dpmpp_2m_are_second_order(name):
    errors = [flow_errors(samplers.SAMPLERS[name], n) for n in (18, 36, 72, 144)]
    for (mean0, std0), (mean1, std1) in zip(errors, errors[1:]):
        assert 0.15 < std1 / std0 < 0.3, errors  # observed 0.20-0.24 (heun), 0.21-0.24 (dpmpp_2m)
        assert 0.15 < mean1 / mean0 < 0.3, errors


def test_heun_std_is_5_percent_off_at_18_steps_and_under_1_percent_at_40():
    slope_18, slope_40 = affine_map(samplers.heun, 18)[1], affine_map(samplers.heun, 40)[1]
    assert 0.04 < slope_18 * SIGMA_MAX / S - 1 < 0.07  # regression pin: observed 5.5%
    assert 0 < slope_40 * SIGMA_MAX / S - 1 < 0.01  # regression pin: observed 0.98%


def test_euler_maruyama_is_weakly_first_order():
    errors = [exact_moments(samplers.euler_maruyama, D, schedules.karras_sigmas(n))[1] / S - 1 for n in (36, 72, 144)]
    for coarse, fine in zip(errors, errors[1:]):
        assert 0.4 < fine / coarse < 0.6, errors  # observed 0.47, 0.49


def test_churned_heun_stays_second_order():
    errors = [
        exact_moments(samplers.heun, D, schedules.karras_sigmas(n), S_churn=10.0)[1] / S - 1 for n in (36, 72, 144)
    ]
    for coarse, fine in zip(errors, errors[1:]):
        assert 0.2 < fine / coarse < 0.3, errors  # observed 0.24, 0.25


@pytest.mark.parametrize(
    ("name", "steps", "options"),
    [
        ("euler", 512, {}),
        ("heun", 64, {}),
        ("dpmpp_2m", 64, {}),
        ("euler_maruyama", 512, {}),
        ("heun", 160, {"S_churn": 40.0}),
        ("euler", 512, {"S_churn": 5.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}),
    ],
)
def test_each_sampler_reproduces_the_gaussian_within_1_percent(name, steps, options):
    mean, std = exact_moments(samplers.SAMPLERS[name], D, schedules.karras_sigmas(steps), **options)
    assert mean == pytest.approx(MU, rel=0.01)
    assert std == pytest.approx(S, rel=0.01)


@pytest.mark.parametrize(("name", "steps", "options"), [("heun", 160, {"S_churn": 40.0}), ("euler_maruyama", 256, {})])
def test_stochastic_samplers_with_real_noise_match_their_exact_moments(name, steps, options):
    sampler, sigmas = samplers.SAMPLERS[name], schedules.karras_sigmas(steps)
    mean, std = exact_moments(sampler, D, sigmas, **options)
    x = sigmas[0] * normal(40_000, seed=5)
    out = sampler(D, x, sigmas, generator=torch.Generator().manual_seed(6), **options)
    assert out.mean().item() == pytest.approx(mean, abs=0.01)
    assert out.std().item() == pytest.approx(std, rel=0.015)
    assert std == pytest.approx(S, rel=0.01)


def plan_sigmas(cfg: DDPMConfig) -> torch.Tensor:
    return torch.tensor(generate.plan(cfg).sigmas, dtype=torch.float64)


def test_ddpm_trained_epsilon_through_the_sigma_mapping_with_dpmpp_2m():
    """An exact DDPM epsilon model (linear schedule, T=1000), read as D(x; sigma) on snapped sigmas."""
    ab = schedules.alphas_cumprod("linear", 1000)
    oracle = GaussianOracle(ab, MU, S)
    denoiser = Denoiser(oracle.eps, DDPM(ab, "epsilon"))
    sigmas = plan_sigmas(DDPMConfig(sampler="dpmpp_2m", steps=50))
    assert set(sigmas[:-1].tolist()) <= set(schedules.sigma(ab).tolist())  # on trained timesteps
    mean, std = exact_moments(samplers.dpmpp_2m, denoiser, sigmas)
    assert mean == pytest.approx(MU, rel=0.01)  # observed 0.9937: x_T = sigma_max z misses mu s / sigma_max
    assert std == pytest.approx(S, rel=0.01)  # observed 0.5026
    coarse = exact_moments(samplers.dpmpp_2m, denoiser, plan_sigmas(DDPMConfig(sampler="dpmpp_2m", steps=10)))[1]
    assert abs(coarse / S - 1) > abs(std / S - 1)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_every_prediction_target_gives_the_same_denoiser(prediction):
    ab = schedules.alphas_cumprod("cosine", 1000)
    oracle = GaussianOracle(ab, MU, S)
    sigma = schedules.sigma(ab[torch.tensor([0, 10, 400, 999])])
    x = normal(4, seed=2) * sigma[:, None]
    reference = Denoiser(oracle.eps, DDPM(ab, "epsilon"))(x, sigma)
    torch.testing.assert_close(Denoiser(oracle.model_fn(prediction), DDPM(ab, prediction))(x, sigma), reference)
    torch.testing.assert_close(reference, D(x, sigma))  # the exact denoiser of the Gaussian


# ---------------------------------------------------------------- sampler contracts


def test_heun_makes_2n_minus_1_denoiser_calls():
    for n, options in [(1, {}), (5, {}), (18, {}), (7, {"S_churn": 20.0})]:
        calls = []

        def counting(x, sigma, calls=calls):
            calls.append(sigma[0].item())
            return D(x, sigma)

        samplers.heun(counting, normal(3), schedules.karras_sigmas(n), generator=torch.Generator(), **options)
        assert len(calls) == 2 * n - 1, (n, options)
    for name in ("euler", "euler_maruyama", "dpmpp_2m"):
        calls = []
        samplers.SAMPLERS[name](
            lambda x, s, calls=calls: calls.append(1) or D(x, s), normal(3), schedules.karras_sigmas(6)
        )
        assert len(calls) == 6, name


def test_denoiser_sees_sigma_as_a_batch_tensor_and_callback_the_trajectory():
    seen, steps = [], []

    def denoiser(x, sigma):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        seen.append(sigma[0].item())
        return D(x, sigma)

    sigmas = schedules.karras_sigmas(5)
    out = samplers.euler(denoiser, normal(4).float(), sigmas, callback=steps.append)
    assert out.dtype == torch.float32 and out.shape == (4, 1)
    assert seen == pytest.approx(sigmas[:-1].tolist(), rel=1e-6)
    assert [s["i"] for s in steps] == list(range(5))
    assert [s["sigma"] for s in steps] == sigmas[:-1].tolist()
    assert all(s["x"].shape == s["x0"].shape == (4, 1) for s in steps)
    assert torch.equal(steps[-1]["x"], out)


@pytest.mark.parametrize(
    ("name", "rel"),
    [  # observed: heun +0.19%, dpmpp_2m -0.13%, euler -1.4% (first order)
        ("heun", 0.005),
        ("dpmpp_2m", 0.005),
        ("euler", 0.02),
        ("euler_maruyama", 0.12),  # regression pin: observed +9.7%
    ],
)
def test_partial_schedules_end_at_their_last_sigma(name, rel):
    """A schedule may stop above 0 (RePaint segments); then no step jumps to the clean image."""
    sigmas = schedules.karras_sigmas(64)[:41]  # stops at sigma = 0.67
    std = exact_moments(samplers.SAMPLERS[name], D, sigmas)[1]
    assert std == pytest.approx(math.sqrt(S**2 + sigmas[-1].item() ** 2), rel=rel)


@pytest.mark.parametrize(
    ("name", "options"), [("euler_maruyama", {}), ("heun", {"S_churn": 30.0}), ("euler", {"S_churn": 30.0})]
)
def test_stochastic_samplers_are_seeded_and_batch_size_invariant(name, options):
    sampler, sigmas = samplers.SAMPLERS[name], schedules.karras_sigmas(10)
    x = sigmas[0] * SampleNoise(9).randn_like(torch.empty(7, 2, 3))
    whole = sampler(D, x, sigmas, generator=SampleNoise(3), **options)
    parts = torch.cat(
        [sampler(D, x[i : i + 3], sigmas, generator=SampleNoise(3, i), **options) for i in range(0, 7, 3)]
    )
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-6)
    assert not torch.equal(whole, sampler(D, x, sigmas, generator=SampleNoise(4), **options))


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_deterministic_samplers_ignore_the_generator(name):
    sigmas = schedules.karras_sigmas(6)
    x = sigmas[0] * normal(8)
    a = samplers.SAMPLERS[name](D, x, sigmas, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, samplers.SAMPLERS[name](D, x, sigmas, generator=torch.Generator().manual_seed(2)))
