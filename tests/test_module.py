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
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from ddpm import ConfigError, DDPMConfig, DiffusionModule, EMAConfig, OptimConfig, UNet
from ddpm.module import WarmupCosine

T = 100
TESTS_DIR = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- helpers


def make_module(
    net_kwargs: dict,
    *,
    seed: int = 0,
    optim: OptimConfig | None = None,
    ema: EMAConfig | None = None,
    **config,
) -> DiffusionModule:
    """A DiffusionModule on the tiny net with T=100 and 10 default sampling steps."""
    torch.manual_seed(seed)
    config = {
        "image_size": net_kwargs["image_size"],
        "channels": net_kwargs["in_channels"],
        "T": T,
        "steps": 10,
        **config,
    }
    return DiffusionModule(UNet(**net_kwargs), DDPMConfig(**config), optim or OptimConfig(lr=2e-3), ema)


def make_trainer(root: Path, max_steps: int, callbacks: list | None = None, **kwargs) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
        "callbacks": callbacks or [],
        **kwargs,
    }
    return pl.Trainer(**options)


def make_loader(*tensors: torch.Tensor, batch_size: int = 32, seed: int = 0) -> DataLoader:
    return DataLoader(
        TensorDataset(*tensors), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


def eval_loss(module: DiffusionModule, images: torch.Tensor, seed: int = 1234) -> float:
    """Mean ``model_step`` loss over ``images`` with fixed timesteps and noise, net in eval mode."""
    was_training = module.net.training
    module.net.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        losses = [module.model_step(images[i : i + 64], generator=generator) for i in range(0, len(images), 64)]
    module.net.train(was_training)
    return torch.cat(losses).mean().item()


def clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def states_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


class LrRecorder(pl.Callback):
    """The learning rate in effect for each training step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run these tiny nets on one intra-op thread.

    The ops are far too small to gain from threads, and on a shared 2-vCPU machine OpenMP's
    spin-waiting made a 2-thread forward/backward up to ~35x slower, at random.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- a trained module


@pytest.fixture(scope="module")
def trained(tiny_net_kwargs, toy_images, tmp_path_factory):
    """The tiny module fitted for 150 steps on the toy images, its trainer and the loss before."""
    module = make_module(tiny_net_kwargs, seed=0, ema=EMAConfig(decay=0.99))
    loss_before = eval_loss(module, toy_images)
    trainer = make_trainer(tmp_path_factory.mktemp("trained"), max_steps=150)
    trainer.fit(module, make_loader(toy_images, seed=0))
    return module, trainer, loss_before


# --------------------------------------------------------------------------- 1. training


def test_fit_lowers_the_loss(trained, toy_images):
    module, trainer, before = trained
    assert trainer.global_step == 150
    # the zero-initialised output layer predicts eps = 0 at first: loss = E[eps^2] = 1
    assert 0.9 < before < 1.1
    after = eval_loss(module, toy_images)
    assert math.isfinite(after)
    # observed: after / before ~ 0.07 over five seeds; 0.3 leaves a wide margin
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
    module = make_module(tiny_net_kwargs, ema=EMAConfig(decay=0.0))
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
    module = make_module(tiny_net_kwargs, ema=EMAConfig(decay=decay, warmup=warmup))
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


def test_ema_decay_schedule(tiny_net_kwargs):
    module = make_module(tiny_net_kwargs, ema=EMAConfig(decay=0.999, warmup=True))
    assert module.ema_decay(0) == pytest.approx(0.1)
    for n in [0, 1, 5, 10, 100, 1000, 8990, 9000, 50_000]:
        assert module.ema_decay(n) == pytest.approx(min(0.999, (1 + n) / (10 + n)))
    assert module.ema_decay(50_000) == pytest.approx(0.999)
    values = [module.ema_decay(n) for n in range(0, 20_000, 97)]
    assert values == sorted(values)

    plain = make_module(tiny_net_kwargs, ema=EMAConfig(decay=0.999, warmup=False))
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
    assert loaded.ema_config == module.ema_config
    assert loaded.net.config == module.net.config
    assert dict(loaded.hparams) == dict(module.hparams)

    for kwargs in [{}, {"use_ema": False}, {"sampler": "ddpm", "seed": 5}]:
        assert torch.equal(loaded.sample(4, **kwargs), module.sample(4, **kwargs)), kwargs


def test_model_checkpoint_and_resume_restore_the_ema(tiny_net_kwargs, toy_images, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", every_n_train_steps=4)
    first = make_module(tiny_net_kwargs, seed=0, ema=EMAConfig(decay=0.9))
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

    second = make_module(tiny_net_kwargs, seed=1, ema=EMAConfig(decay=0.9))
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


# --------------------------------------------------------------------------- 4. sampling


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.0), ("ddim", 1.0), ("ddpm", None)])
def test_sample_is_invariant_to_batch_size(trained, sampler, eta):
    module, _, _ = trained
    kwargs = {"sampler": sampler, "eta": eta, "steps": 10, "seed": 3}
    small = module.sample(7, batch_size=2, **kwargs)
    whole = module.sample(7, batch_size=7, **kwargs)
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
    a = module.sample(4, seed=0, **kwargs)
    assert torch.equal(a, module.sample(4, seed=0, **kwargs))
    b = module.sample(4, seed=1, **kwargs)
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-2  # every image changes


def test_sample_batches_yields_chunks(trained):
    module, _, _ = trained
    chunks = list(module.sample_batches(7, batch_size=3, steps=10))
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert all(c.shape[1:] == (1, 8, 8) and c.device.type == "cpu" for c in chunks)
    torch.testing.assert_close(torch.cat(chunks), module.sample(7, batch_size=3, steps=10), rtol=0, atol=0)
    assert [len(c) for c in module.sample_batches(4, batch_size=4, steps=10)] == [4]
    assert [len(c) for c in module.sample_batches(3, batch_size=10, steps=10)] == [3]


def test_sample_callback_receives_step_info(trained):
    module, _, _ = trained
    calls: list[dict] = []
    out = module.sample(5, batch_size=2, steps=4, sampler="ddim", callback=calls.append)
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
    ema = module.sample(3, steps=10)
    net = module.sample(3, steps=10, use_ema=False)
    assert not torch.allclose(ema, net)
    assert module.ema.training and module.net.training
    out = module.sample(3, steps=10)
    assert not out.requires_grad
    out.add_(0)  # a normal tensor, usable outside inference mode


# --------------------------------------------------------------------------- 5. validation


@pytest.fixture(scope="module")
def fresh_module(tiny_net_kwargs):
    return make_module(tiny_net_kwargs)


def test_config_net_mismatch_raises(tiny_net_kwargs):
    with pytest.raises(ValueError, match=r"does not match.*image_size"):
        DiffusionModule(UNet(**tiny_net_kwargs), DDPMConfig(image_size=28, T=T, steps=10))
    with pytest.raises(ValueError, match="does not match"):
        DiffusionModule(UNet(**tiny_net_kwargs), DDPMConfig(image_size=8, channels=3, T=T, steps=10))


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
        fresh_module.sample(n, **kwargs)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError, match="steps=20 exceeds T=10"):
        DDPMConfig(T=10, steps=20)


# --------------------------------------------------------------------------- 6. learning rate


def test_warmup_cosine_values():
    f = WarmupCosine(warmup_steps=5, total_steps=25, min_ratio=0.1)
    warm = [f(k) for k in range(5)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert warm[0] == pytest.approx(0.2)
    assert f(4) == pytest.approx(1.0)  # the end of warmup
    assert f(5) == pytest.approx(1.0)  # the start of the cosine
    decay = [f(k) for k in range(5, 26)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert f(15) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way
    assert f(25) == pytest.approx(0.1)  # min_ratio at the end
    assert f(1000) == pytest.approx(0.1)

    constant = WarmupCosine(warmup_steps=3, total_steps=None)
    assert [constant(k) for k in range(6)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])
    assert WarmupCosine(warmup_steps=0, total_steps=10)(0) == pytest.approx(1.0)
    assert WarmupCosine(warmup_steps=0, total_steps=10)(10) == pytest.approx(0.0)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_fit_lr_follows_warmup_then_schedule(tiny_net_kwargs, toy_images, tmp_path, schedule):
    lr, steps = 1e-3, 20
    optim = OptimConfig(lr=lr, warmup_steps=5, lr_scheduler=schedule, min_lr_ratio=0.1)
    module = make_module(tiny_net_kwargs, optim=optim)
    recorder = LrRecorder()
    trainer = make_trainer(tmp_path, max_steps=steps, callbacks=[recorder])
    trainer.fit(module, make_loader(toy_images))

    f = WarmupCosine(5, steps if schedule == "cosine" else None, 0.1)
    expected = [lr * f(k) for k in range(steps)]
    assert recorder.lrs == pytest.approx(expected, rel=1e-9)
    assert recorder.lrs[4] == pytest.approx(lr)  # the end of warmup
    if schedule == "cosine":
        assert all(a > b for a, b in zip(recorder.lrs[5:], recorder.lrs[6:]))
    else:
        assert recorder.lrs[5:] == pytest.approx([lr] * (steps - 5))
    # the last logged lr is the one of the last step; the scheduler ends at min_lr_ratio * lr
    assert trainer.callback_metrics["train/lr"].item() == pytest.approx(expected[-1], rel=1e-5)
    last = trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]
    assert last == pytest.approx(0.1 * lr if schedule == "cosine" else lr)


def test_cosine_needs_a_finite_run(tiny_net_kwargs, toy_images, tmp_path):
    module = make_module(tiny_net_kwargs, optim=OptimConfig(lr_scheduler="cosine"))
    trainer = make_trainer(tmp_path, max_steps=-1, max_epochs=-1)
    with pytest.raises(ValueError, match="lr_scheduler=.cosine. needs a known run length"):
        trainer.fit(module, make_loader(toy_images))


class ImageStream(IterableDataset):
    """An iterable dataset without a length: Lightning cannot tell the number of steps."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __iter__(self):
        return iter(self.images)


def test_cosine_with_unknown_run_length_raises_or_keeps_the_lr(tiny_net_kwargs, toy_images, tmp_path):
    module = make_module(tiny_net_kwargs, optim=OptimConfig(lr=1e-3, warmup_steps=1, lr_scheduler="cosine"))
    recorder = LrRecorder()
    trainer = make_trainer(tmp_path, max_steps=-1, max_epochs=1, callbacks=[recorder])
    try:
        trainer.fit(module, DataLoader(ImageStream(toy_images[:96]), batch_size=32))
    except ValueError as e:
        assert "lr_scheduler='cosine'" in str(e)
        return
    # if it trains, it must not silently train with lr = 0 after warmup
    assert min(recorder.lrs) > 0, recorder.lrs


def test_resume_with_more_steps_follows_the_new_cosine_horizon(tiny_net_kwargs, toy_images, tmp_path):
    optim = OptimConfig(lr=1e-3, warmup_steps=2, lr_scheduler="cosine", min_lr_ratio=0.0)
    first = make_module(tiny_net_kwargs, optim=optim)
    trainer = make_trainer(tmp_path, max_steps=5)
    trainer.fit(first, make_loader(toy_images))
    path = tmp_path / "five.ckpt"
    trainer.save_checkpoint(path)

    recorder = LrRecorder()
    second = make_module(tiny_net_kwargs, optim=optim)
    make_trainer(tmp_path, max_steps=10, callbacks=[recorder]).fit(second, make_loader(toy_images), ckpt_path=path)
    f = WarmupCosine(2, 10, 0.0)
    assert recorder.lrs == pytest.approx([1e-3 * f(k) for k in range(5, 10)])


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
