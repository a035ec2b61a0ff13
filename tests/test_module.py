"""Tests for the Lightning module in ddpm.module: training, EMA, checkpoints, sampling, DDP."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from ddpm import ConfigError, DDPMConfig, DiffusionModule, OptimConfig, UNet, ema
from modules import (  # noqa: F401 (one_torch_thread is a fixture)
    T,
    draw,
    eval_loss,
    fit_tiny,
    make_loader,
    make_module,
    make_trainer,
    one_torch_thread,
)

TESTS_DIR = Path(__file__).resolve().parent


def clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def states_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- a trained module


@pytest.fixture(scope="module")
def trained(tiny_net_kwargs, toy_images, tmp_path_factory):
    """The tiny module fitted for 150 steps on the toy images, its trainer and the loss before."""
    return fit_tiny(tiny_net_kwargs, toy_images, tmp_path_factory.mktemp("trained"))


# --------------------------------------------------------------------------- 1. training


def test_fit_lowers_the_loss(trained, toy_images):
    module, trainer, before = trained
    assert trainer.global_step == 150
    # the zero-initialised output layer predicts eps = 0 at first: loss = E[eps^2] = 1
    assert 0.9 < before < 1.1
    after = eval_loss(module, toy_images)
    assert math.isfinite(after)
    # regression pin: observed after / before ~ 0.07 over five seeds; 0.3 leaves a wide margin
    assert after < 0.3 * before, (before, after)


def test_model_step_is_per_sample_and_seeded(trained, toy_images):
    module, _, _ = trained
    x = toy_images[:5]
    a = module.model_step(x, generator=torch.Generator().manual_seed(3))
    b = module.model_step((x,), generator=torch.Generator().manual_seed(3))
    c = module.model_step((x, torch.zeros(5, dtype=torch.long)), generator=torch.Generator().manual_seed(3))
    assert a.shape == (5,)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    d = module.model_step(x, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a, d)


# --------------------------------------------------------------------------- 2. EMA


def test_ema_differs_from_net_after_fit(trained):
    module, _, _ = trained
    assert states_differ(clone_state(module.ema), clone_state(module.net))
    assert not any(p.requires_grad for p in module.ema.parameters())


def test_ema_with_zero_decay_equals_net_after_fit(tiny_net_kwargs, toy_images, tmp_path):
    module = make_module(tiny_net_kwargs, optim=OptimConfig(lr=2e-3, ema_decay=0.0))
    initial = clone_state(module.net)
    make_trainer(tmp_path, max_steps=3).fit(module, make_loader(toy_images))
    assert states_differ(initial, clone_state(module.net))  # it did train
    assert_state_equal(clone_state(module.ema), clone_state(module.net))


class EmaTrace(pl.Callback):
    """Net weights before training and after each optimizer step (EMA already updated)."""

    def __init__(self) -> None:
        self.initial: dict[str, torch.Tensor] = {}
        self.nets: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = clone_state(pl_module.net)
        assert_state_equal(self.initial, clone_state(pl_module.ema))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.nets.append(clone_state(pl_module.net))


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_update_uses_decay_of_the_step_number(tiny_net_kwargs, toy_images, tmp_path, warmup):
    """ema_{n+1} = d(n) ema_n + (1 - d(n)) net_{n+1}, with n the updates made so far (from 0)."""
    decay = 0.9
    module = make_module(tiny_net_kwargs, optim=OptimConfig(lr=2e-3, ema_decay=decay, ema_warmup=warmup))
    trace = EmaTrace()
    make_trainer(tmp_path, max_steps=3, callbacks=[trace]).fit(module, make_loader(toy_images))
    expected = {k: v.double() for k, v in trace.initial.items()}
    for n, net in enumerate(trace.nets):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        assert module.ema_decay(n) == pytest.approx(d)
        expected = {k: d * expected[k] + (1 - d) * net[k].double() for k in expected}
    assert len(trace.nets) == 3
    for k, v in clone_state(module.ema).items():
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_power_function_ema_follows_edm2s_profile(tiny_net_kwargs, toy_images, tmp_path):
    """With ema_std: decay (1 - 1/t)^(gamma + 1) at update t = n + 1, whatever ema_decay and its warmup say."""
    optim = OptimConfig(lr=2e-3, ema_decay=0.5, ema_warmup=True, ema_std=0.1)
    module = make_module(tiny_net_kwargs, optim=optim)
    gamma = ema.gamma_from_std(0.1)
    assert module.ema_decay(0) == 0.0  # the first update copies the net
    for n in [1, 10, 1000, 100_000]:
        assert module.ema_decay(n) == pytest.approx((n / (n + 1)) ** (gamma + 1))
    trace = EmaTrace()
    make_trainer(tmp_path, max_steps=4, callbacks=[trace]).fit(module, make_loader(toy_images))
    expected = {k: v.double() for k, v in trace.initial.items()}
    for n, net in enumerate(trace.nets):
        d = (n / (n + 1)) ** (gamma + 1)
        expected = {k: d * expected[k] + (1 - d) * net[k].double() for k in expected}
    assert len(trace.nets) == 4
    for k, v in clone_state(module.ema).items():
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_ema_decay_schedule(tiny_net_kwargs):
    module = make_module(tiny_net_kwargs, optim=OptimConfig(lr=2e-3, ema_decay=0.999, ema_warmup=True))
    assert module.ema_decay(0) == pytest.approx(0.1)
    for n in [0, 1, 5, 10, 100, 1000, 8990, 9000, 50_000]:
        assert module.ema_decay(n) == pytest.approx(min(0.999, (1 + n) / (10 + n)))
    assert module.ema_decay(50_000) == pytest.approx(0.999)
    values = [module.ema_decay(n) for n in range(0, 20_000, 97)]
    assert values == sorted(values)

    plain = make_module(tiny_net_kwargs, optim=OptimConfig(lr=2e-3, ema_decay=0.999, ema_warmup=False))
    for n in [0, 1, 10, 1000]:
        assert plain.ema_decay(n) == 0.999


# --------------------------------------------------------------------------- 3. checkpoints


def test_checkpoint_round_trip_keeps_net_ema_configs_and_samples(trained, tmp_path):
    module, trainer, _ = trained
    path = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(path)
    loaded = DiffusionModule.from_checkpoint(path)

    assert_state_equal(clone_state(loaded.net), clone_state(module.net))
    assert_state_equal(clone_state(loaded.ema), clone_state(module.ema))
    assert states_differ(clone_state(loaded.ema), clone_state(loaded.net))
    assert loaded.config == module.config
    assert loaded.optim == module.optim
    assert loaded.net.config == module.net.config
    assert dict(loaded.hparams) == dict(module.hparams)

    for kwargs in [{}, {"use_ema": False}, {"sampler": "ddpm", "seed": 5}]:
        assert torch.equal(draw(loaded, 4, **kwargs), draw(module, 4, **kwargs)), kwargs


def test_model_checkpoint_and_resume_restore_the_ema(tiny_net_kwargs, toy_images, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", every_n_train_steps=4)
    first = make_module(tiny_net_kwargs, seed=0, optim=OptimConfig(lr=2e-3, ema_decay=0.9))
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[checkpoint], enable_checkpointing=True)
    trainer.fit(first, make_loader(toy_images))
    path = Path(checkpoint.last_model_path or checkpoint.best_model_path)
    assert path.is_file()

    loaded = DiffusionModule.from_checkpoint(path)
    assert_state_equal(clone_state(loaded.ema), clone_state(first.ema))
    assert_state_equal(clone_state(loaded.net), clone_state(first.net))

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.step = trainer.global_step
            self.ema = clone_state(pl_module.ema)
            self.net = clone_state(pl_module.net)

    second = make_module(tiny_net_kwargs, seed=1, optim=OptimConfig(lr=2e-3, ema_decay=0.9))
    assert states_differ(clone_state(second.ema), clone_state(first.ema))  # a fresh, different init
    at_start = AtStart()
    make_trainer(tmp_path, max_steps=6, callbacks=[at_start]).fit(second, make_loader(toy_images), ckpt_path=path)
    assert at_start.step == 4
    assert_state_equal(at_start.ema, clone_state(first.ema))
    assert_state_equal(at_start.net, clone_state(first.net))
    # two more updates happened on top of the restored EMA
    assert states_differ(clone_state(second.ema), at_start.ema)


def test_from_checkpoint_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="not a DiffusionModule checkpoint"):
        DiffusionModule.from_checkpoint(path)
    partial = tmp_path / "partial.ckpt"
    torch.save({"state_dict": {}}, partial)
    with pytest.raises(ValueError, match="hyper_parameters"):
        DiffusionModule.from_checkpoint(partial)


def test_from_checkpoint_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        DiffusionModule.from_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError):
        DiffusionModule.from_checkpoint(tmp_path)  # a directory is not a checkpoint file


class CreatesFileOnLoad:
    """Unpickling this calls open(marker, "w"), creating the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_from_checkpoint_does_not_run_pickled_code(tmp_path):
    # control: a plain (unsafe) load of such a file really does run the payload
    control_marker = tmp_path / "control-marker"
    control = tmp_path / "control.ckpt"
    torch.save({"x": CreatesFileOnLoad(control_marker)}, control)
    assert not control_marker.exists()
    torch.load(control, weights_only=False)
    assert control_marker.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": CreatesFileOnLoad(marker)}, path)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        DiffusionModule.from_checkpoint(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- 5. validation


def test_config_net_mismatch_raises(tiny_net_kwargs):
    with pytest.raises(ValueError, match=r"does not match.*image_size"):
        DiffusionModule(UNet(**tiny_net_kwargs), DDPMConfig(image_size=28, T=T, steps=10))
    with pytest.raises(ValueError, match="does not match"):
        DiffusionModule(UNet(**tiny_net_kwargs), DDPMConfig(image_size=8, channels=3, T=T, steps=10))


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError, match="steps=20 exceeds T=10"):
        DDPMConfig(T=10, steps=20)


# --------------------------------------------------------------------------- 7. class-conditional


def test_class_conditional_fit_on_labelled_batches(tiny_net_kwargs, toy_images, tmp_path):
    labels = torch.arange(len(toy_images)) % 3  # the pattern kind of each toy image
    module = make_module({**tiny_net_kwargs, "num_classes": 3})
    emb_before = module.net.class_emb.weight.detach().clone()
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.fit(module, make_loader(toy_images, labels))
    assert trainer.global_step == 3
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    emb_after = module.net.class_emb.weight.detach()
    # the three class rows were trained, the unused "no label" row (index 3) was not
    assert all(not torch.equal(emb_before[c], emb_after[c]) for c in range(3))
    assert torch.equal(emb_before[3], emb_after[3])
    loss = module.model_step((toy_images[:4], labels[:4]))
    assert loss.shape == (4,) and torch.isfinite(loss).all()


def test_class_conditional_needs_labels(tiny_net_kwargs, toy_images, tmp_path):
    module = make_module({**tiny_net_kwargs, "num_classes": 3})
    with pytest.raises(ValueError, match="labels"):
        module.model_step(toy_images[:4])
    with pytest.raises(ValueError, match="labels"):
        module.model_step((toy_images[:4],))
    trainer = make_trainer(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="labels"):
        trainer.fit(module, DataLoader(toy_images, batch_size=16))  # bare-tensor batches


# --------------------------------------------------------------------------- 8. DDP


@pytest.mark.slow
def test_ddp_fit_on_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ)
    env.pop("LOCAL_RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, str(TESTS_DIR / "ddp_fit.py"), str(out)],
        cwd=TESTS_DIR.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    result = json.loads((out / "result.json").read_text())
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert result["world_size"] == 2
    assert result["backend"] == "gloo"
    assert result["global_step"] == 10
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["global_step"] == 10 for r in ranks)
    # both ranks end with bit-identical weights, which changed in training
    assert ranks[0]["net"] == ranks[1]["net"] == result["net"]
    assert ranks[0]["ema"] == ranks[1]["ema"] == result["ema"]
    assert result["net"] != result["initial_net"]
    assert result["ema"] != result["net"]
    # ... although each rank trained on its own half of the data (DistributedSampler)
    seen0, seen1 = set(ranks[0]["seen_epoch0"]), set(ranks[1]["seen_epoch0"])
    assert seen0 and seen1 and not seen0 & seen1
    assert seen0 | seen1 == set(range(64))


# --------------------------------------------------------------------------- validation loop


def test_validation_logs_reproducible_losses_of_net_and_ema(tiny_net_kwargs, toy_images, tmp_path):
    module = make_module(tiny_net_kwargs)
    trainer = make_trainer(tmp_path, max_steps=20, limit_val_batches=2)
    val_loader = DataLoader(TensorDataset(toy_images[:64]), batch_size=32)
    trainer.fit(module, make_loader(toy_images), val_dataloaders=val_loader)
    first = trainer.validate(module, val_loader, verbose=False)[0]
    second = trainer.validate(module, val_loader, verbose=False)[0]
    assert first == second, "validation draws fixed timesteps and noise"
    assert set(first) == {"val/loss", "val/loss_ema"}
    assert first["val/loss"] != first["val/loss_ema"]
