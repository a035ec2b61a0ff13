import pytest
import torch

from ddpm import losses, predictions, schedules


def batch(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    ab = schedules.alphas_cumprod("cosine", 1000)[torch.randint(0, 1000, (n,), generator=g)]
    return x0, eps, ab, ab.view(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction", predictions.PREDICTIONS)
def test_targets_convert_back_to_x0_and_eps(prediction):
    x0, eps, _, a = batch()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = predictions.target(prediction, x0, eps, a)
    x0_hat, eps_hat = predictions.to_x0_eps(prediction, out, x_t, a)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_v_target_definition_and_convert():
    x0, eps, _, a = batch(1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = predictions.target("v", x0, eps, a)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)
    for src in predictions.PREDICTIONS:
        for dst in predictions.PREDICTIONS:
            out = predictions.target(src, x0, eps, a)
            torch.testing.assert_close(predictions.convert(out, x_t, a, src, dst), predictions.target(dst, x0, eps, a))
    torch.testing.assert_close(predictions.eps_from_x0(x0, x_t, a), eps)


def test_elementwise_losses_reduce_per_sample():
    g = torch.Generator().manual_seed(0)
    out, tgt = torch.randn(5, 3, 2, 2, generator=g), torch.randn(5, 3, 2, 2, generator=g)
    ab = torch.full((5,), 0.5)
    torch.testing.assert_close(losses.DiffusionLoss("mse")(out, tgt, ab), ((out - tgt) ** 2).mean((1, 2, 3)))
    torch.testing.assert_close(losses.DiffusionLoss("l1")(out, tgt, ab), (out - tgt).abs().mean((1, 2, 3)))
    d = (out - tgt).abs()
    huber = torch.where(d < 0.5, 0.5 * d**2, 0.5 * (d - 0.25)).mean((1, 2, 3))
    torch.testing.assert_close(losses.DiffusionLoss("huber", huber_delta=0.5)(out, tgt, ab), huber)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_is_the_same_x0_space_loss_for_every_target(gamma):
    """Hang et al.: weighted loss = min(SNR, gamma) * ||x0_hat - x0||^2 whatever the network predicts."""
    x0, eps, ab, a = batch(2, n=64)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    eps_hat = predictions.eps_from_x0(x0_hat, x_t, a)
    snr = ab / (1 - ab)
    expected = snr.clamp(max=gamma) * ((x0_hat - x0) ** 2).flatten(1).mean(1)
    for prediction in predictions.PREDICTIONS:
        loss = losses.DiffusionLoss("mse", prediction, "min_snr", snr_gamma=gamma)
        output = predictions.target(prediction, x0_hat, eps_hat, a)
        target = predictions.target(prediction, x0, eps, a)
        torch.testing.assert_close(loss(output, target, ab), expected, rtol=1e-9, atol=1e-12)


def test_uniform_weighting_is_one():
    ab = torch.linspace(0.01, 0.99, 7)
    assert torch.equal(losses.snr_weight("uniform", "epsilon", ab), torch.ones(7))
    w = losses.snr_weight("min_snr", "epsilon", ab.double(), gamma=5.0)
    snr = ab.double() / (1 - ab.double())
    torch.testing.assert_close(w, torch.where(snr < 5, torch.ones_like(snr), 5 / snr))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "l2"}, "allowed: mse, l1, huber"),
        ({"weighting": "p2"}, "allowed: uniform, min_snr"),
        ({"prediction": "score"}, "allowed: epsilon, x0, v"),
    ],
)
def test_bad_loss_names(kwargs, message):
    with pytest.raises(ValueError, match=message):
        losses.DiffusionLoss(**kwargs)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"output shape \(2, 1\) != target shape \(2, 2\)"):
        losses.DiffusionLoss()(torch.zeros(2, 1), torch.zeros(2, 2), torch.ones(2) * 0.5)
