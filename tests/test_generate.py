"""The sampling plan (ddpm.generate.plan): the bound sampler, its noise levels and its NFE, built once."""

import math

import pytest
import torch

from ddpm import generate, samplers, schedules
from ddpm.config import ConfigError, DDPMConfig
from modules import T, draw, fit_tiny, make_module, one_torch_thread  # noqa: F401 (a fixture)


def test_plan_binds_the_config_and_validates_overrides():
    cfg = DDPMConfig(steps=30, eta=0.3, spacing="trailing", prediction="v", clip=False)
    fn = generate.plan(cfg).run
    assert fn.func is samplers.ddim
    assert fn.keywords == {"steps": 30, "prediction": "v", "clip": False, "eta": 0.3, "spacing": "trailing"}
    ddpm = generate.plan(cfg, "ddpm", steps=100).run
    assert ddpm.func is samplers.ddpm and ddpm.keywords["steps"] == 100 and ddpm.keywords["variance"] == "beta_tilde"
    with pytest.raises(ConfigError, match="eta=0.5 applies to the ddim sampler only"):
        generate.plan(cfg, "ddpm", eta=0.5)
    with pytest.raises(ConfigError, match="sampler='plms'"):
        generate.plan(cfg, "plms")
    with pytest.raises(ConfigError, match="steps=5000 exceeds"):
        generate.plan(cfg, steps=5000)


def test_plan_binds_the_sigma_samplers():
    cfg = DDPMConfig(S_churn=12.0, S_tmin=0.05, S_noise=1.003)
    heun = generate.plan(cfg, "heun", steps=20).run
    assert heun.func is samplers.heun
    assert heun.keywords == {"S_churn": 12.0, "S_tmin": 0.05, "S_tmax": math.inf, "S_noise": 1.003}
    assert generate.plan(cfg, "euler").run.func is samplers.euler
    for name in ("dpmpp_2m", "euler_maruyama"):
        assert generate.plan(cfg, name).run is samplers.SAMPLERS[name]
    with pytest.raises(ConfigError, match="eta=0.5 applies to the ddim sampler only, not 'heun'"):
        generate.plan(cfg, "heun", eta=0.5)
    with pytest.raises(ConfigError, match="sampler='ddim' needs preconditioning='ddpm'"):
        generate.plan(DDPMConfig.from_edm(), "ddim")


def sigmas(cfg: DDPMConfig, sampler: str | None = None, steps: int | None = None) -> torch.Tensor:
    return torch.tensor(generate.plan(cfg, sampler, steps).sigmas, dtype=torch.float64)


def test_sigmas_of_every_sampler():
    cfg = DDPMConfig(T=1000, steps=20)
    ab = schedules.alphas_cumprod(cfg.schedule, cfg.T)
    ddim = sigmas(cfg)
    torch.testing.assert_close(ddim[:-1], schedules.sigma(ab[samplers.ddim_timesteps(1000, 20)]))
    assert ddim[-1] == 0 and len(ddim) == 21
    torch.testing.assert_close(sigmas(cfg, "ddpm")[:-1], schedules.sigma(ab[samplers.respaced_timesteps(1000, 20)]))
    edm = DDPMConfig.from_edm(rho=3.0)
    torch.testing.assert_close(sigmas(edm, steps=7), schedules.karras_sigmas(7, 0.002, 80.0, 3.0))
    torch.testing.assert_close(
        sigmas(edm.replace(sigma_schedule="vp", beta_d=10.0)), schedules.vp_sigmas(18, 0.002, 80.0, 10.0, 0.1)
    )
    # a ddpm model under a sigma sampler: within the trained range, on trained sigmas
    snapped = sigmas(cfg, "dpmpp_2m")
    trained = schedules.sigma(ab)
    assert len(snapped) == 21 and snapped[-1] == 0
    assert set(snapped[:-1].tolist()) <= set(trained.tolist())
    assert snapped[0].item() == pytest.approx(80.0, rel=0.01) and snapped[-2] == trained[0]
    merged = generate.plan(cfg.replace(T=30, steps=30), "heun")
    assert len(merged.sigmas) <= 31 and merged.steps == len(merged.sigmas) - 1  # repeats merge
    with pytest.raises(ConfigError, match=r"miss the trained range"):
        generate.plan(cfg.replace(sigma_min=200.0, sigma_max=300.0), "heun")


def test_nfe_counts_network_calls_per_image():
    def nfe(cfg, sampler, steps, guidance=None):
        return generate.plan(cfg, sampler, steps, guidance=guidance).nfe

    cfg = DDPMConfig()
    assert nfe(cfg, "ddim", 50) == 50 and nfe(cfg, "ddpm", 1000) == 1000
    edm = DDPMConfig.from_edm()
    assert nfe(edm, "heun", 18) == 35 and nfe(edm, "euler", 18) == 18 and nfe(edm, "dpmpp_2m", 10) == 10
    assert nfe(edm, "heun", 18, guidance=2.0) == 70 and nfe(edm, "heun", 18, guidance=1.0) == 35


def test_the_plan_keeps_the_run_settings_apart_from_the_model_config():
    cfg = DDPMConfig()
    plan = generate.plan(cfg, "dpmpp_2m", 12)
    assert (plan.config.sampler, plan.config.steps, cfg.sampler, cfg.steps) == ("dpmpp_2m", 12, "ddim", 50)
    assert generate.plan(cfg).config is cfg  # no override: the model's own defaults


# --------------------------------------------------------------------------- drawing from a trained module


@pytest.fixture(scope="module")
def trained(tiny_net_kwargs, toy_images, tmp_path_factory):
    """The tiny module fitted for 150 steps on the toy images, its trainer and the loss before."""
    return fit_tiny(tiny_net_kwargs, toy_images, tmp_path_factory.mktemp("trained"))


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.0), ("ddim", 1.0), ("ddpm", None)])
def test_sample_is_invariant_to_batch_size(trained, sampler, eta):
    module, _, _ = trained
    kwargs = {"sampler": sampler, "eta": eta, "steps": 10, "seed": 3}
    small = draw(module, 7, batch_size=2, **kwargs)
    whole = draw(module, 7, batch_size=7, **kwargs)
    assert small.shape == whole.shape == (7, 1, 8, 8)
    assert small.device.type == "cpu"
    assert torch.isfinite(whole).all()
    torch.testing.assert_close(small, whole, rtol=1e-4, atol=1e-4)
    # the images of one call are not copies of each other
    assert not torch.allclose(whole[0], whole[1], atol=1e-3)


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.0), ("ddim", 1.0), ("ddpm", None)])
def test_sample_depends_on_the_seed_only(trained, sampler, eta):
    module, _, _ = trained
    kwargs = {"sampler": sampler, "eta": eta, "steps": 10}
    a = draw(module, 4, seed=0, **kwargs)
    assert torch.equal(a, draw(module, 4, seed=0, **kwargs))
    b = draw(module, 4, seed=1, **kwargs)
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-2  # every image changes


def test_sample_batches_yields_chunks(trained):
    module, _, _ = trained
    plan = generate.plan(module.config, steps=10)
    chunks = list(generate.sample_batches(module.ema, plan, 7, batch_size=3))
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert all(c.shape[1:] == (1, 8, 8) and c.device.type == "cpu" for c in chunks)
    torch.testing.assert_close(torch.cat(chunks), draw(module, 7, batch_size=3, steps=10), rtol=0, atol=0)
    assert [len(c) for c in generate.sample_batches(module.ema, plan, 4, batch_size=4)] == [4]
    assert [len(c) for c in generate.sample_batches(module.ema, plan, 3, batch_size=10)] == [3]


def test_sample_callback_receives_step_info(trained):
    module, _, _ = trained
    calls: list[dict] = []
    out = draw(module, 5, batch_size=2, steps=4, sampler="ddim", callback=calls.append)
    assert len(calls) == 4 * 3  # steps x chunks
    for info in calls:
        assert {"i", "t", "x", "x0", "start"} <= info.keys()
    assert [c["start"] for c in calls] == [0] * 4 + [2] * 4 + [4] * 4
    assert [c["i"] for c in calls] == [0, 1, 2, 3] * 3
    ts = [c["t"] for c in calls[:4]]
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == 4 and all(0 <= t < T for t in ts)
    assert calls[0]["x"].shape == calls[0]["x0"].shape == (2, 1, 8, 8)
    assert calls[-1]["x"].shape == (1, 1, 8, 8)
    # the last call of each chunk sees that chunk's final images
    torch.testing.assert_close(calls[3]["x"].cpu(), out[0:2])
    torch.testing.assert_close(calls[11]["x"].cpu(), out[4:5])


def test_sample_uses_ema_by_default_and_restores_train_mode(trained):
    module, _, _ = trained
    module.ema.train()
    module.net.train()
    ema = draw(module, 3, steps=10)
    net = draw(module, 3, steps=10, use_ema=False)
    assert not torch.allclose(ema, net)
    assert module.ema.training and module.net.training
    out = draw(module, 3, steps=10)
    assert not out.requires_grad
    out.add_(0)  # a normal tensor, usable outside inference mode


@pytest.fixture(scope="module")
def fresh_module(tiny_net_kwargs):
    return make_module(tiny_net_kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": 0}, ValueError, r"n=0 is invalid"),
        ({"n": -3}, ValueError, r"n=-3 is invalid"),
        ({"n": 2.0}, ValueError, r"n=2.0 is invalid"),
        ({"n": True}, ValueError, r"n=True is invalid"),
        ({"n": 2, "batch_size": 0}, ValueError, r"batch_size=0 is invalid"),
        ({"n": 2, "sampler": "plms"}, ConfigError, r"sampler='plms'"),
        ({"n": 2, "steps": T + 1}, ConfigError, rf"steps={T + 1} exceeds T={T}"),
        ({"n": 2, "steps": 0}, ConfigError, r"steps=0"),
        ({"n": 2, "sampler": "ddpm", "eta": 0.5}, ConfigError, r"eta=0.5 applies to the ddim sampler only"),
        ({"n": 2, "sampler": "ddim", "eta": 1.5}, ConfigError, r"eta=1.5"),
    ],
)
def test_sample_rejects_invalid_arguments(fresh_module, kwargs, error, match):
    assert issubclass(error, ValueError)
    kwargs = dict(kwargs)
    n = kwargs.pop("n")
    with pytest.raises(error, match=match):
        draw(fresh_module, n, **kwargs)
