import pytest
import yaml

from ddpm import samplers
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
        ({"sampler": "euler"}, "sampler='euler': Input should be 'ddim' or 'ddpm'"),
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
