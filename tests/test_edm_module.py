"""DiffusionModule with the EDM families: training, class conditioning, guidance, inpainting, checkpoints."""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ddpm import generate, preconditioning, samplers
from ddpm.config import ConfigError, DDPMConfig, OptimConfig
from ddpm.module import DiffusionModule
from ddpm.nets import UNet
from ddpm.noise import SampleNoise
from ddpm.preconditioning import Denoiser

SIGMA_SAMPLERS = [("euler", {}), ("heun", {}), ("euler_maruyama", {}), ("dpmpp_2m", {}), ("heun", {"S_churn": 30.0})]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny nets gain nothing from threads; OpenMP spinning on a shared 2-vCPU machine is very slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_module(net_kwargs: dict, config: DDPMConfig, seed: int = 0) -> DiffusionModule:
    torch.manual_seed(seed)
    return DiffusionModule(UNet(**net_kwargs), config, OptimConfig(lr=2e-3, ema_decay=0.9))


def draw(module: DiffusionModule, n: int, *, sampler=None, steps=None, eta=None, guidance=None, **kwargs):
    """``n`` images from the module's EMA weights through its sampling plan (ddpm.generate)."""
    return generate.sample(module.ema, generate.plan(module.config, sampler, steps, eta, guidance), n, **kwargs)


def fit(module: DiffusionModule, root, *tensors: torch.Tensor, max_steps: int) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    loader = DataLoader(
        TensorDataset(*tensors), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    trainer.fit(module, loader)
    return trainer


def eval_loss(module: DiffusionModule, batch) -> float:
    module.net.eval()
    with torch.no_grad():
        loss = module.model_step(batch, generator=torch.Generator().manual_seed(7)).mean().item()
    module.net.train()
    return loss


def with_config(module: DiffusionModule, **changes) -> DiffusionModule:
    """A module whose net (and EMA) are ``module``'s EMA weights, under the config with ``changes``."""
    return DiffusionModule(copy.deepcopy(module.ema), module.config.replace(**changes))


def edm_config(**overrides) -> DDPMConfig:
    return DDPMConfig.from_edm(image_size=8, channels=1, steps=6, **overrides)


@pytest.fixture(scope="module")
def conditional(tiny_net_kwargs, toy_images, tmp_path_factory):
    """A class-conditional EDM module (3 classes, p_uncond = 0.2) fitted for 80 steps; loss before and after."""
    labels = torch.arange(len(toy_images)) % 3
    module = make_module({**tiny_net_kwargs, "num_classes": 3}, edm_config(p_uncond=0.2))
    null_row = module.net.class_emb.weight[3].detach().clone()
    before = eval_loss(module, (toy_images, labels))
    trainer = fit(module, tmp_path_factory.mktemp("edm"), toy_images, labels, max_steps=80)
    return module, trainer, before, eval_loss(module, (toy_images, labels)), null_row


@pytest.fixture(scope="module")
def ddpm_module(tiny_net_kwargs):
    """An untrained DDPM-family module (T = 100) with perturbed weights, so every layer passes signal."""
    module = make_module(tiny_net_kwargs, DDPMConfig(image_size=8, channels=1, T=100, steps=8))
    with torch.no_grad():
        for p in module.ema.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return module


# --------------------------------------------------------------------------- training


def test_tiny_edm_fit_on_cpu_lowers_the_loss(conditional):
    module, trainer, before, after, null_row = conditional
    assert trainer.global_step == 80
    assert math.isfinite(after) and after < 0.5 * before, (before, after)  # regression pin: observed ~0.3
    # labels were dropped to the null class (row 3) with probability p_uncond, so it was trained
    assert not torch.equal(module.net.class_emb.weight[3], null_row)


def test_edm_model_step_is_eq_2(tiny_net_kwargs, toy_images):
    module = make_module(tiny_net_kwargs, edm_config())
    x0 = toy_images[:6]
    g = torch.Generator().manual_seed(3)
    loss = module.model_step(x0, generator=g)
    g = torch.Generator().manual_seed(3)
    sigma = (-1.2 + 1.2 * torch.randn(6, generator=g)).exp()
    n = torch.randn(x0.shape, generator=g) * sigma.view(-1, 1, 1, 1)
    s = sigma.view(-1, 1, 1, 1)
    c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt(), 1 / (s**2 + 0.25).sqrt()
    denoised = c_skip * (x0 + n) + c_out * module.net(c_in * (x0 + n), sigma.log() / 4)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(loss, weight * ((denoised - x0) ** 2).flatten(1).mean(1))


@pytest.mark.parametrize("config", [DDPMConfig.from_vp, DDPMConfig.from_ve], ids=["vp", "ve"])
def test_vp_and_ve_fit_and_sample(tiny_net_kwargs, toy_images, tmp_path, config):
    module = make_module(tiny_net_kwargs, config(image_size=8, channels=1, steps=4))
    initial = module.net.conv_out.weight.detach().clone()
    trainer = fit(module, tmp_path, toy_images[:64], max_steps=4)
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert not torch.equal(module.net.conv_out.weight, initial)
    out = draw(module, 3, seed=1)
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()


def test_label_dropout_rate(tiny_net_kwargs):
    module = make_module({**tiny_net_kwargs, "num_classes": 3}, edm_config(p_uncond=0.3))
    y = torch.zeros(20_000, dtype=torch.long)
    dropped = module._drop_labels(y, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 3}
    assert (dropped == 3).float().mean().item() == pytest.approx(0.3, abs=0.01)


def test_guidance_and_p_uncond_need_a_class_conditional_net(tiny_net_kwargs):
    for overrides in ({"p_uncond": 0.1}, {"guidance": 2.0}):
        with pytest.raises(ValueError, match="need a class-conditional net"):
            make_module(tiny_net_kwargs, edm_config(**overrides))


# --------------------------------------------------------------------------- sampling

# Seeded samples of different batch sizes agree up to float rounding: some kernels (MKL's matmuls, oneDNN's 1x1
# convolutions) round differently at other batch sizes, ~1e-6 of one net evaluation, which a sampler's steps carry
# on to values of up to sigma_max (80). A wrong noise stream or batch slicing differs by O(1).


@pytest.mark.parametrize(("sampler", "options"), SIGMA_SAMPLERS)
def test_seeded_samples_do_not_depend_on_the_batch_size(conditional, sampler, options):
    module = with_config(conditional[0], **options) if options else conditional[0]
    kwargs = {"sampler": sampler, "steps": 6, "seed": 3, "labels": torch.tensor([0, 1, 2, 0, 1, 2, 0])}
    small = draw(module, 7, batch_size=2, guidance=2.0, **kwargs)
    whole = draw(module, 7, batch_size=7, guidance=2.0, **kwargs)
    assert whole.shape == (7, 1, 8, 8) and torch.isfinite(whole).all()
    torch.testing.assert_close(small, whole, rtol=1e-4, atol=1e-4)
    other = draw(module, 7, seed=4, **{k: v for k, v in kwargs.items() if k != "seed"})
    assert (whole - other).abs().amax(dim=(1, 2, 3)).min() > 1e-2


def test_guidance_scale_one_is_the_conditional_model(conditional):
    module = conditional[0]
    labels = torch.tensor([2, 0, 1])
    out = draw(module, 3, sampler="heun", steps=6, seed=5, labels=labels, guidance=1.0)
    noise = SampleNoise(5)
    sigmas = torch.tensor(generate.plan(module.config, "heun", 6).sigmas, dtype=torch.float64)
    x = sigmas[0].item() * noise.randn_like(torch.empty(3, 1, 8, 8))
    denoiser = Denoiser(module.ema, preconditioning.for_config(module.config))
    with torch.no_grad():
        expected = samplers.heun(lambda x, s: denoiser(x, s, labels), x, sigmas, generator=noise)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    unconditional = draw(module, 3, sampler="heun", steps=6, seed=5)  # the null class
    torch.testing.assert_close(draw(module, 3, sampler="heun", steps=6, seed=5, labels=labels, guidance=0.0),
                               unconditional, rtol=0, atol=0)  # fmt: skip
    guided = draw(module, 3, sampler="heun", steps=6, seed=5, labels=labels, guidance=3.0)
    assert not torch.allclose(guided, out) and not torch.allclose(guided, unconditional)


def test_labels_choose_the_classes_and_the_config_guidance_is_the_default(conditional):
    module = conditional[0]
    a = draw(module, 4, steps=6, seed=1, labels=1)
    torch.testing.assert_close(a, draw(module, 4, steps=6, seed=1, labels=torch.ones(4, dtype=torch.long)))
    assert not torch.allclose(a, draw(module, 4, steps=6, seed=1, labels=2))
    guided = with_config(module, guidance=2.5)
    torch.testing.assert_close(draw(guided, 4, steps=6, seed=1, labels=1), draw(module, 4, steps=6, seed=1, labels=1,
                                                                                          guidance=2.5))  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"labels": torch.tensor([0, 1])}, ValueError, r"allowed: one or 3 integers in \[0, 3\)"),
        ({"labels": 3}, ValueError, r"labels=3 are invalid"),
        ({"labels": torch.tensor([0.0, 1.0, 2.0])}, ValueError, "labels="),
        ({"guidance": 2.0}, ValueError, r"guidance=2.0 needs labels"),
        ({"labels": 0, "guidance": -1.0}, ConfigError, r"guidance=-1.0"),
        ({"sampler": "ddim"}, ConfigError, r"sampler='ddim' needs preconditioning='ddpm'"),
        ({"sampler": "heun", "eta": 0.5}, ConfigError, "eta=0.5 applies to the ddim sampler only"),
        ({"known": torch.zeros(3, 1, 8, 8)}, ValueError, r"mask=None is invalid"),
        ({"known": torch.zeros(2, 1, 8, 8), "mask": torch.ones(1, 1, 8, 8)}, ValueError, r"known=\[2, 1, 8, 8\]"),
        ({"known": torch.zeros(1, 1, 8, 8), "mask": torch.ones(1, 1, 4, 8)}, ValueError, r"mask=\[1, 1, 4, 8\]"),
        ({"jump_length": 0}, ValueError, "jump_length=0"),
        ({"resample": 1.5}, ValueError, "resample=1.5"),
    ],
)
def test_sample_rejects_invalid_arguments(conditional, kwargs, error, match):
    with pytest.raises(error, match=match):
        draw(conditional[0], 3, **kwargs)


def test_labels_need_a_class_conditional_net(ddpm_module):
    with pytest.raises(ValueError, match="labels need a class-conditional net"):
        draw(ddpm_module, 2, labels=0)


def test_sigma_samplers_on_a_ddpm_model_visit_trained_timesteps(ddpm_module):
    seen = []
    out = draw(ddpm_module, 5, sampler="dpmpp_2m", steps=8, batch_size=2, seed=2, callback=seen.append)
    assert out.shape == (5, 1, 8, 8) and torch.isfinite(out).all()
    trained = set(generate.plan(ddpm_module.config, "ddpm", 100).sigmas[:-1])  # every trained timestep
    assert {s["sigma"] for s in seen} <= trained and len({s["sigma"] for s in seen}) == 8
    assert [s["start"] for s in seen] == [0] * 8 + [2] * 8 + [4] * 8
    torch.testing.assert_close(draw(ddpm_module, 5, sampler="dpmpp_2m", steps=8, seed=2), out, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- inpainting


@pytest.mark.parametrize(
    ("family", "sampler"),
    [("ddpm", "ddim"), ("ddpm", "ddpm"), ("ddpm", "heun"), ("edm", "heun"), ("edm", "euler_maruyama"),
     ("edm", "dpmpp_2m")],
)  # fmt: skip
def test_inpainting_keeps_known_pixels_exactly(conditional, ddpm_module, toy_images, family, sampler):
    module = ddpm_module if family == "ddpm" else conditional[0]
    labels = {} if family == "ddpm" else {"labels": torch.tensor([0, 1, 2, 0, 1]), "guidance": 2.0}
    known = toy_images[:5]
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., :, :4] = True  # the left half is known
    kwargs = {"sampler": sampler, "steps": 6, "seed": 1, "known": known, "mask": mask, **labels}
    out = draw(module, 5, jump_length=2, resample=2, batch_size=2, **kwargs)
    assert torch.equal(out[..., :4], known[..., :4])
    assert torch.isfinite(out).all()
    assert not torch.equal(out[..., 4:], known[..., 4:])
    torch.testing.assert_close(draw(module, 5, jump_length=2, resample=2, **kwargs), out, rtol=1e-4, atol=1e-4)
    plain = draw(module, 5, **kwargs)
    assert torch.equal(plain[..., :4], known[..., :4]) and not torch.allclose(plain, out)


@pytest.mark.parametrize(("family", "sampler"), [("ddpm", "ddim"), ("ddpm", "ddpm"), ("edm", "heun")])
def test_inpainting_generates_the_unknown_pixels_from_the_known_ones(conditional, ddpm_module, toy_images, family,
                                                                     sampler):  # fmt: skip
    """Same seeds, other known images: every image's generated half changes, so the sampler saw the known half
    (the known pixels are also pasted over the output, which alone would keep them exactly)."""
    module = ddpm_module if family == "ddpm" else conditional[0]
    labels = {} if family == "ddpm" else {"labels": torch.tensor([0, 1, 2]), "guidance": 2.0}
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., :, :4] = True
    kwargs = {"sampler": sampler, "steps": 6, "seed": 1, "mask": mask, "jump_length": 2, "resample": 2, **labels}
    a, b = (draw(module, 3, known=known, **kwargs) for known in (toy_images[:3], toy_images[3:6]))
    assert torch.equal(a[..., :4], toy_images[:3, ..., :4]) and torch.equal(b[..., :4], toy_images[3:6, ..., :4])
    changed = [not torch.equal(a[i, ..., 4:], b[i, ..., 4:]) for i in range(3)]
    assert all(changed), changed


def test_inpainting_with_a_per_image_float_mask(ddpm_module, toy_images):
    known = toy_images[:3]
    mask = torch.zeros(3, 1, 8, 8)
    mask[0, ..., 0, :] = 1.0
    mask[1, ..., :, 0] = 1.0
    out = draw(ddpm_module, 3, steps=5, known=known, mask=mask)
    assert torch.equal(out[mask.bool()], known[mask.bool()])
    assert not torch.equal(out[2], known[2])


# --------------------------------------------------------------------------- checkpoints


def test_edm_checkpoint_round_trip(conditional, tmp_path):
    module, trainer = conditional[:2]
    path = tmp_path / "edm.ckpt"
    trainer.save_checkpoint(path)
    loaded = DiffusionModule.from_checkpoint(path)
    assert loaded.config == module.config and loaded.config.preconditioning == "edm"
    kwargs = {"steps": 6, "seed": 2, "labels": 1, "guidance": 1.5}
    assert torch.equal(draw(loaded, 3, **kwargs), draw(module, 3, **kwargs))
