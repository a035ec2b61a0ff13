import math

import pytest
import torch
import yaml

from ddpm import losses, preconditioning, samplers, schedules
from ddpm.config import ConfigError, DDPMConfig, EMAConfig, OptimConfig
from ddpm.nets import UNetConfig


@pytest.mark.parametrize("cls", [DDPMConfig, OptimConfig, EMAConfig, UNetConfig])
def test_round_trip_through_yaml(cls):
    cfg = cls()
    text = yaml.safe_dump(cfg.to_dict())
    assert cls.from_dict(yaml.safe_load(text)) == cfg


def test_class_methods_for_the_well_known_models():
    classical = DDPMConfig.from_classical_ddpm()
    assert (classical.sampler, classical.steps, classical.variance, classical.schedule) == (
        "ddpm",
        1000,
        "beta",
        "linear",
    )
    small = DDPMConfig.from_classical_ddpm(variance="beta_tilde", schedule="cosine", T=500)
    assert (small.T, small.steps, small.variance, small.schedule) == (500, 500, "beta_tilde", "cosine")
    improved = DDPMConfig.from_ddpm()
    assert (improved.sampler, improved.schedule, improved.steps) == ("ddpm", "cosine", 250)
    ddim = DDPMConfig.from_ddim(schedule="cosine", steps=20)
    assert (ddim.sampler, ddim.eta, ddim.steps, ddim.schedule) == ("ddim", 0.0, 20, "cosine")
    with pytest.raises(ConfigError, match="variance='large'"):
        DDPMConfig.from_classical_ddpm(variance="large")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"schedule": "quadratic"},
            "DDPMConfig.schedule='quadratic': Input should be 'linear', 'cosine', 'exp' or 'sigmoid'",
        ),
        ({"prediction": "score"}, "prediction='score': Input should be 'epsilon', 'x0' or 'v'"),
        (
            {"sampler": "plms"},
            "sampler='plms': Input should be 'ddim', 'ddpm', 'euler', 'heun', 'euler_maruyama' or 'dpmpp_2m'",
        ),
        ({"eta": 1.5}, "eta=1.5: Input should be less than or equal to 1"),
        ({"T": 0}, "T=0: Input should be greater than or equal to 2"),
        ({"steps": 2000}, "steps=2000 exceeds T=1000"),
        ({"shedule": "linear"}, "DDPMConfig.shedule: unknown key; allowed keys: image_size, channels, schedule"),
    ],
)
def test_invalid_fields_give_one_line_naming_field_value_and_allowed(data, message):
    with pytest.raises(ConfigError) as info:
        DDPMConfig(**data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="train.ddpm"):
        DDPMConfig.from_dict(data, "train.ddpm")


def test_from_dict_rejects_non_mappings_and_accepts_none():
    assert DDPMConfig.from_dict(None) == DDPMConfig()
    with pytest.raises(ConfigError, match=r"train=\[1, 2\]: expected a mapping"):
        DDPMConfig.from_dict([1, 2], "train")


def test_configs_are_frozen():
    with pytest.raises(ValueError):
        DDPMConfig().T = 10


def test_optim_and_ema_validation():
    with pytest.raises(ConfigError, match="betas"):
        OptimConfig(betas=(0.9, 1.0))
    with pytest.raises(ConfigError, match="lr_scheduler='step'"):
        OptimConfig(lr_scheduler="step")
    with pytest.raises(ConfigError, match="decay=1.0"):
        EMAConfig(decay=1.0)
    assert OptimConfig(grad_clip=None).grad_clip is None


def test_sampler_fn_binds_the_config_and_validates_overrides():
    cfg = DDPMConfig(steps=30, eta=0.3, spacing="trailing", prediction="v", clip=False)
    fn = cfg.sampler_fn()
    assert fn.func is samplers.ddim
    assert fn.keywords == {"steps": 30, "prediction": "v", "clip": False, "eta": 0.3, "spacing": "trailing"}
    ddpm = cfg.sampler_fn("ddpm", steps=100)
    assert ddpm.func is samplers.ddpm and ddpm.keywords["steps"] == 100 and ddpm.keywords["variance"] == "beta_tilde"
    with pytest.raises(ConfigError, match="eta=0.5 applies to the ddim sampler only"):
        cfg.sampler_fn("ddpm", eta=0.5)
    with pytest.raises(ConfigError, match="sampler='plms'"):
        cfg.sampler_fn("plms")
    with pytest.raises(ConfigError, match="steps=5000 exceeds"):
        cfg.sampler_fn(steps=5000)


def test_alphas_cumprod_and_loss_follow_the_config():
    cfg = DDPMConfig(schedule="cosine", T=100, loss="huber", weighting="min_snr", prediction="x0")
    assert cfg.alphas_cumprod().shape == (100,)
    loss = cfg.loss_fn()
    assert (loss.loss, loss.weighting, loss.prediction) == ("huber", "min_snr", "x0")


# ---------------------------------------------------------------- the EDM families


def test_edm_vp_ve_class_methods():
    edm = DDPMConfig.from_edm()
    assert (edm.preconditioning, edm.sampler, edm.steps, edm.sigma_schedule, edm.clip) == (
        "edm",
        "heun",
        18,
        "karras",
        False,
    )
    assert (edm.sigma_min, edm.sigma_max, edm.rho, edm.sigma_data, edm.P_mean, edm.P_std) == (
        0.002,
        80,
        7,
        0.5,
        -1.2,
        1.2,
    )
    vp, ve = DDPMConfig.from_vp(), DDPMConfig.from_ve(steps=30)
    assert (vp.preconditioning, vp.beta_d, vp.beta_min, vp.epsilon_t) == ("vp", 19.9, 0.1, 1e-5)
    assert (ve.preconditioning, ve.sigma_min, ve.sigma_max, ve.steps) == ("ve", 0.02, 100.0, 30)
    assert isinstance(edm.preconditioner(), preconditioning.EDM)
    assert vp.preconditioner() == preconditioning.VP(19.9, 0.1, 1e-5)
    assert ve.preconditioner() == preconditioning.VE(0.02, 100.0)
    assert isinstance(DDPMConfig().preconditioner(), preconditioning.DDPM)
    assert isinstance(edm.loss_fn(), losses.DenoiserLoss) and isinstance(DDPMConfig().loss_fn(), losses.DiffusionLoss)
    for cfg in (edm, vp, ve, DDPMConfig(S_tmax=10.0, S_churn=5.0, p_uncond=0.1, guidance=3.0)):
        assert DDPMConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"preconditioning": "flow"}, "preconditioning='flow': Input should be 'ddpm', 'edm', 'vp' or 've'"),
        ({"preconditioning": "edm"}, "sampler='ddim' needs preconditioning='ddpm'; 'edm' allows euler, heun,"),
        ({"preconditioning": "vp", "sampler": "ddpm"}, "sampler='ddpm' needs preconditioning='ddpm'"),
        ({"preconditioning": "edm", "sampler": "heun", "prediction": "v"}, "prediction='v' applies to"),
        ({"preconditioning": "ve", "sampler": "euler", "weighting": "min_snr"}, "weighting='min_snr' applies to"),
        ({"sigma_min": 2.0, "sigma_max": 1.0}, "sigma_min=2.0 >= sigma_max=1.0"),
        ({"S_tmin": 5.0, "S_tmax": 1.0}, "S_tmin=5.0 > S_tmax=1.0"),
        (
            {"sigma_schedule": "linear"},
            "sigma_schedule='linear': Input should be 'karras', 'exponential', 'vp' or 've'",
        ),
        ({"guidance": -1}, "guidance=-1: Input should be greater than or equal to 0"),
        ({"p_uncond": 1.5}, "p_uncond=1.5: Input should be less than or equal to 1"),
        ({"epsilon_t": 0}, "epsilon_t=0: Input should be greater than 0"),
        ({"S_churn": -1}, "S_churn=-1: Input should be greater than or equal to 0"),
    ],
)
def test_invalid_family_fields_give_one_line(data, message):
    with pytest.raises(ConfigError) as info:
        DDPMConfig(**data)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_edm_steps_are_not_bounded_by_T():
    assert DDPMConfig.from_edm(T=10, steps=40).steps == 40


def test_sampler_fn_binds_the_sigma_samplers():
    cfg = DDPMConfig(S_churn=12.0, S_tmin=0.05, S_noise=1.003)
    heun = cfg.sampler_fn("heun", steps=20)
    assert heun.func is samplers.heun
    assert heun.keywords == {"S_churn": 12.0, "S_tmin": 0.05, "S_tmax": math.inf, "S_noise": 1.003}
    assert cfg.sampler_fn("euler").func is samplers.euler
    for name in ("dpmpp_2m", "euler_maruyama"):
        fn = cfg.sampler_fn(name)
        assert fn.func is samplers.SAMPLERS[name] and fn.keywords == {}
    with pytest.raises(ConfigError, match="eta=0.5 applies to the ddim sampler only, not 'heun'"):
        cfg.sampler_fn("heun", eta=0.5)
    with pytest.raises(ConfigError, match="sampler='ddim' needs preconditioning='ddpm'"):
        DDPMConfig.from_edm().sampler_fn("ddim")


def test_sigmas_of_every_sampler():
    cfg = DDPMConfig(T=1000, steps=20)
    ab = cfg.alphas_cumprod()
    ddim = cfg.sigmas()
    torch.testing.assert_close(ddim[:-1], schedules.sigma(ab[samplers.ddim_timesteps(1000, 20)]))
    assert ddim[-1] == 0 and len(ddim) == 21
    torch.testing.assert_close(cfg.sigmas("ddpm")[:-1], schedules.sigma(ab[samplers.respaced_timesteps(1000, 20)]))
    edm = DDPMConfig.from_edm(rho=3.0)
    torch.testing.assert_close(edm.sigmas(steps=7), samplers.karras_sigmas(7, 0.002, 80.0, 3.0))
    torch.testing.assert_close(
        edm.replace(sigma_schedule="vp", beta_d=10.0).sigmas(), samplers.vp_sigmas(18, 0.002, 80.0, 10.0, 0.1)
    )
    # a ddpm model under a sigma sampler: within the trained range, on trained sigmas
    snapped = cfg.sigmas("dpmpp_2m")
    trained = schedules.sigma(ab)
    assert len(snapped) == 21 and snapped[-1] == 0
    assert set(snapped[:-1].tolist()) <= set(trained.tolist())
    assert snapped[0].item() == pytest.approx(80.0, rel=0.01) and snapped[-2] == trained[0]
    assert len(cfg.replace(T=30, steps=30).sigmas("heun")) <= 31  # repeats merge
    with pytest.raises(ConfigError, match=r"miss the trained range"):
        cfg.replace(sigma_min=200.0, sigma_max=300.0).sigmas("heun")


def test_nfe_counts_network_calls_per_image():
    cfg = DDPMConfig()
    assert cfg.nfe("ddim", 50) == 50 and cfg.nfe("ddpm", 1000) == 1000
    edm = DDPMConfig.from_edm()
    assert edm.nfe("heun", 18) == 35 and edm.nfe("euler", 18) == 18 and edm.nfe("dpmpp_2m", 10) == 10
    assert edm.nfe("heun", 18, guidance=2.0) == 70 and edm.nfe("heun", 18, guidance=1.0) == 35


def test_several_unknown_keys_share_one_clause():
    with pytest.raises(ConfigError) as e:
        DDPMConfig.from_dict({"shedule": "linear", "stpes": 3, "T": 1}, "diffusion")
    message = str(e.value)
    assert message.startswith("diffusion.T=1: ")
    assert "; diffusion.shedule, diffusion.stpes: unknown keys; allowed keys: image_size, channels" in message
    assert message.count("allowed keys") == 1 and "\n" not in message
