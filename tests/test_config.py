import pytest
import torch
import yaml

from ddpm import config, losses, preconditioning, predictions, samplers, schedules
from ddpm.config import ConfigError, DDPMConfig, OptimConfig, TrainConfig, UNetConfig


@pytest.mark.parametrize("cls", [DDPMConfig, OptimConfig, TrainConfig, UNetConfig])
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
    with pytest.raises(ConfigError, match="ema_decay=1.0"):
        OptimConfig(ema_decay=1.0)
    assert OptimConfig(grad_clip=None).grad_clip is None
    assert OptimConfig(ema_std=0.1).ema_std == 0.1 and OptimConfig().ema_std is None
    for std in (0, 0.29):
        with pytest.raises(ConfigError, match=rf"^train.ema_std={std}: Input should be (greater|less) than"):
            TrainConfig.from_dict({"ema_std": std}, "train")


def test_an_lr_whose_first_adamw_step_overflows_float32_fails_in_one_line():
    """torch's AdamW raises in the middle of the first step when lr / (1 - beta1) passes float32's largest value."""
    expected = r"^train: lr=1e\+38: AdamW's first step size .* overflows float32; allowed: lr < 3.4e\+37 with betas"
    with pytest.raises(ConfigError, match=expected) as e:
        TrainConfig.from_dict({"lr": 1e38}, "train")
    assert "\n" not in str(e.value)
    assert TrainConfig.from_dict({"lr": 3.3e37}, "train").lr == 3.3e37  # its first step size still fits
    with pytest.raises(ConfigError, match=r"allowed: lr < 3.4e\+36 with betas\[0\]=0.99"):
        TrainConfig.from_dict({"lr": 3.3e37, "betas": [0.99, 0.999]}, "train")
    for lr, fits in ((3.3e37, True), (1e38, False)):  # the limit is torch's
        weight = torch.nn.Parameter(torch.ones(2))
        weight.sum().backward()
        if fits:
            torch.optim.AdamW([weight], lr=lr).step()
        else:
            with pytest.raises(RuntimeError, match="overflow"):
                torch.optim.AdamW([weight], lr=lr).step()


def test_alphas_cumprod_and_loss_follow_the_config():
    cfg = DDPMConfig(schedule="cosine", T=100, loss="huber", weighting="min_snr", prediction="x0")
    loss = losses.for_config(cfg)
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
    assert isinstance(preconditioning.for_config(edm), preconditioning.EDM)
    assert preconditioning.for_config(vp) == preconditioning.VP(19.9, 0.1, 1e-5)
    assert preconditioning.for_config(ve) == preconditioning.VE(0.02, 100.0)
    assert isinstance(preconditioning.for_config(DDPMConfig()), preconditioning.DDPM)
    assert isinstance(losses.for_config(edm), losses.DenoiserLoss)
    assert isinstance(losses.for_config(DDPMConfig()), losses.DiffusionLoss)
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


def test_several_unknown_keys_share_one_clause():
    with pytest.raises(ConfigError) as e:
        DDPMConfig.from_dict({"shedule": "linear", "stpes": 3, "T": 1}, "diffusion")
    message = str(e.value)
    assert message.startswith("diffusion.T=1: ")
    assert "; diffusion.shedule, diffusion.stpes: unknown keys; allowed keys: image_size, channels" in message
    assert message.count("allowed keys") == 1 and "\n" not in message


def test_schemas_name_what_the_implementations_register():
    """The light schemas list the allowed names; the implementations register exactly those."""
    assert tuple(schedules.SCHEDULES) == config.SCHEDULES
    assert tuple(samplers.SAMPLERS) == config.SAMPLERS
    assert tuple(schedules.SIGMA_SCHEDULES) == config.SIGMA_SCHEDULES
    assert tuple(losses.ELEMENTWISE) == config.LOSSES
    assert tuple(preconditioning.PRECONDITIONINGS) == config.PRECONDITIONINGS
    assert predictions.PREDICTIONS == config.PREDICTIONS
    from ddpm import datasets

    assert tuple(datasets.LOADERS) == tuple(config.DATASETS)


def test_train_config_is_the_optimizer_config_with_the_run():
    train = TrainConfig(lr=3e-4, ema_decay=0.99, max_steps=10)
    assert isinstance(train, OptimConfig) and (train.lr, train.ema_decay) == (3e-4, 0.99)
    assert set(OptimConfig.model_fields) < set(TrainConfig.model_fields)
    assert (TrainConfig().lr, OptimConfig().lr) == (1e-3, 2e-4)  # the pipeline's defaults differ from the library's


def test_unet_config_rejects_what_the_net_cannot_build():
    with pytest.raises(ConfigError, match="image_size=28 must be divisible by 8"):
        UNetConfig(image_size=28, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ConfigError, match=r"attn_resolutions=\(5,\) contains \[5\]"):
        UNetConfig(attn_resolutions=(5,))
    with pytest.raises(ConfigError, match="num_heads=3 must divide"):
        UNetConfig(num_heads=3)
    with pytest.raises(ConfigError, match="norm_groups=24 must divide"):
        UNetConfig(norm_groups=24)
    with pytest.raises(ConfigError, match="parameters; allowed: at most"):
        UNetConfig(channels=10**9)
