"""Preconditioning (EDM Table 1), its training distributions and loss weighting, and the DDPM sigma view."""

import math

import pytest
import torch

from ddpm import losses, schedules
from ddpm.preconditioning import DDPM, EDM, VE, VP, Denoiser
from gaussian import GaussianOracle, edm_denoiser

SIGMA = torch.tensor([0.002, 0.05, 0.5, 1.0, 7.0, 80.0], dtype=torch.float64)
FAMILIES = [EDM(), VP(), VE()]


def bounded_net(x, c_noise, y=None):
    """A fixed, bounded stand-in for F: tanh of a mix of the input and the noise label."""
    return torch.tanh(x.flip(0) + 0.1 * c_noise.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1)))


def test_edm_scalings_are_table_1():
    c_skip, c_out, c_in, c_noise = EDM(sigma_data=0.5).scalings(SIGMA)
    for i, sigma in enumerate(SIGMA.tolist()):
        assert c_skip[i].item() == pytest.approx(0.25 / (sigma**2 + 0.25))
        assert c_out[i].item() == pytest.approx(sigma * 0.5 / math.sqrt(sigma**2 + 0.25))
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(sigma**2 + 0.25))
        assert c_noise[i].item() == pytest.approx(math.log(sigma) / 4)


def test_vp_and_ve_scalings_are_table_1():
    c_skip, c_out, c_in, c_noise = VP().scalings(SIGMA)
    torch.testing.assert_close(c_skip, torch.ones_like(SIGMA))
    torch.testing.assert_close(c_out, -SIGMA)
    torch.testing.assert_close(c_in, 1 / (SIGMA**2 + 1).sqrt())
    t = schedules.vp_sigma_inv(SIGMA)
    torch.testing.assert_close(schedules.vp_sigma(t), SIGMA)
    torch.testing.assert_close(c_noise, 999 * t)
    c_skip, c_out, c_in, c_noise = VE().scalings(SIGMA)
    torch.testing.assert_close(c_skip, torch.ones_like(SIGMA))
    torch.testing.assert_close(c_out, SIGMA)
    torch.testing.assert_close(c_in, torch.ones_like(SIGMA))
    torch.testing.assert_close(c_noise, (SIGMA / 2).log())


@pytest.mark.parametrize("family", FAMILIES, ids=["edm", "vp", "ve"])
def test_denoiser_tends_to_x_as_sigma_goes_to_zero(family):
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    denoiser = Denoiser(bounded_net, family)
    gaps = [(denoiser(x, torch.full((4,), s, dtype=torch.float64)) - x).abs().max().item() for s in (1e-2, 1e-4, 1e-6)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-5, gaps


@pytest.mark.parametrize("family", FAMILIES, ids=["edm", "vp", "ve"])
def test_loss_weight_is_one_over_c_out_squared(family):
    """lambda(sigma) c_out(sigma)^2 = 1: the effective weight on the network output F is uniform (EDM sec. 5)."""
    c_out = family.scalings(SIGMA)[1]
    torch.testing.assert_close(family.weight(SIGMA) * c_out**2, torch.ones_like(SIGMA))


def test_edm_loss_weight_closed_form_and_unit_variance_input():
    edm = EDM(sigma_data=0.7)
    torch.testing.assert_close(edm.weight(SIGMA), (SIGMA**2 + 0.49) / (SIGMA * 0.7) ** 2)
    c_in = edm.scalings(SIGMA)[2]
    torch.testing.assert_close(c_in**2 * (0.49 + SIGMA**2), torch.ones_like(SIGMA))  # Var(c_in (x0 + n)) = 1


def test_edm_loss_of_the_ideal_denoiser_is_one_at_every_sigma():
    """Data N(0, sigma_data^2): lambda(sigma) E||D*(x0 + n; sigma) - x0||^2 = 1 (EDM eq. 2 and Table 1)."""
    edm, n = EDM(), 200_000
    g = torch.Generator().manual_seed(0)
    for sigma in (0.01, 0.5, 20.0):
        x0 = 0.5 * torch.randn(n, 1, generator=g, dtype=torch.float64)
        s = torch.full((n,), sigma, dtype=torch.float64)
        x = x0 + sigma * torch.randn(n, 1, generator=g, dtype=torch.float64)
        loss = losses.DenoiserLoss()(edm_denoiser(0.0, 0.5)(x, s), x0, edm.weight(s))
        assert loss.mean().item() == pytest.approx(1.0, rel=0.01), sigma


def test_training_noise_distributions():
    n, g = 200_000, torch.Generator().manual_seed(1)
    log_sigma = EDM(P_mean=-1.2, P_std=1.2).sample_sigma(n, generator=g, dtype=torch.float64).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(1.2, rel=0.01)
    vp = VP(epsilon_t=1e-3)
    t = schedules.vp_sigma_inv(vp.sample_sigma(n, generator=g, dtype=torch.float64))
    assert t.min().item() >= 1e-3 - 1e-9 and t.max().item() <= 1.0 + 1e-9
    assert t.mean().item() == pytest.approx((1 + 1e-3) / 2, abs=0.005)
    assert t.var().item() == pytest.approx((1 - 1e-3) ** 2 / 12, rel=0.02)
    log_ve = VE(0.02, 100.0).sample_sigma(n, generator=g, dtype=torch.float64).log()
    lo, hi = math.log(0.02), math.log(100.0)
    assert log_ve.min().item() >= lo and log_ve.max().item() <= hi
    assert log_ve.mean().item() == pytest.approx((lo + hi) / 2, abs=0.02)
    assert log_ve.var().item() == pytest.approx((hi - lo) ** 2 / 12, rel=0.02)
    assert EDM().sample_sigma(3).dtype == torch.float32


def test_denoiser_passes_labels_and_keeps_dtype():
    seen = []

    def net(x, c_noise, y=None):
        seen.append(y)
        return torch.zeros_like(x)

    x = torch.ones(2, 1, 2, 2)
    out = Denoiser(net, EDM())(x, torch.tensor([1.0, 2.0]), torch.tensor([3, 4]))
    assert out.dtype == torch.float32 and seen[0].tolist() == [3, 4]
    torch.testing.assert_close(out[:, 0, 0, 0], 0.25 / (torch.tensor([1.0, 4.0]) + 0.25))  # c_skip x
    Denoiser(net, EDM())(x, torch.tensor([1.0, 2.0]))
    assert seen[1] is None


# ---------------------------------------------------------------- the DDPM sigma view


def test_ddpm_snaps_sigma_to_the_nearest_trained_timestep_in_log_space():
    ab = schedules.alphas_cumprod("linear", 1000)
    ddpm = DDPM(ab)
    trained = schedules.sigma(ab)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    assert torch.equal(ddpm.timestep(trained[t]), t)
    between = (trained[t[2:4]].log() * 0.3 + trained[t[2:4] + 1].log() * 0.7).exp()
    assert torch.equal(ddpm.timestep(between), t[2:4] + 1)
    assert ddpm.timestep(torch.tensor([1e-6, 1e6])).tolist() == [0, 999]  # clamped to the trained range
    c_skip, c_out, c_in, c_noise = ddpm.scalings(trained[t].float())
    assert c_noise.dtype == torch.long and torch.equal(c_noise, t)
    assert c_skip.dtype == torch.float32
    torch.testing.assert_close(c_in.double(), ab[t].sqrt(), rtol=1e-6, atol=0)


def test_ddpm_snap_merges_repeats_and_keeps_the_final_zero():
    ab = schedules.alphas_cumprod("linear", 10)
    trained = schedules.sigma(ab)
    sigmas = torch.tensor(
        [trained[9].item() * 2, trained[9].item() * 0.99, trained[5].item() * 1.01, trained[5].item(), 1e-4, 0.0]
    )
    snapped = DDPM(ab).snap(sigmas.double())
    assert snapped.tolist() == [trained[9].item(), trained[5].item(), trained[0].item(), 0.0]


def test_ddpm_denoiser_is_the_gaussian_denoiser_for_the_exact_model():
    ab = schedules.alphas_cumprod("cosine", 100)
    oracle = GaussianOracle(ab, 0.3, 0.8)
    sigma = schedules.sigma(ab[torch.tensor([0, 30, 99])])
    x = torch.tensor([[0.5], [-2.0], [40.0]], dtype=torch.float64)
    for prediction in ("epsilon", "x0", "v"):
        out = Denoiser(oracle.model_fn(prediction), DDPM(ab, prediction))(x, sigma)
        torch.testing.assert_close(out, edm_denoiser(0.3, 0.8)(x, sigma))


def test_denoiser_loss_is_weighted_per_sample():
    d, x0 = torch.zeros(3, 2, 2), torch.ones(3, 2, 2)
    torch.testing.assert_close(losses.DenoiserLoss()(d, x0, torch.tensor([1.0, 2.0, 0.5])), torch.tensor([1, 2, 0.5]))
    torch.testing.assert_close(losses.DenoiserLoss("l1")(2 * x0, x0, torch.ones(3)), torch.ones(3))
    with pytest.raises(ValueError, match="loss='l3' is unknown"):
        losses.DenoiserLoss("l3")
    with pytest.raises(ValueError, match="output shape"):
        losses.DenoiserLoss()(d, x0[:2], torch.ones(3))
