"""The learning-rate schedule of DiffusionModule (its lr_scheduler): linear warmup, then cosine decay or constant."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from ddpm.config import OptimConfig
from ddpm.module import WarmupCosine
from modules import make_loader, make_module, make_trainer, one_torch_thread  # noqa: F401 (a fixture)


class LrRecorder(pl.Callback):
    """The learning rate in effect for each training step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


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


def test_cosine_with_an_unknown_run_length_fails_before_the_first_step(tiny_net_kwargs, toy_images, tmp_path):
    """A data set without a length and no max_steps: the cosine decay has no horizon, so the fit stops at once
    with an error naming the setting (rather than decaying over a guessed length, or to lr = 0)."""
    module = make_module(tiny_net_kwargs, optim=OptimConfig(lr=1e-3, warmup_steps=1, lr_scheduler="cosine"))
    recorder = LrRecorder()
    trainer = make_trainer(tmp_path, max_steps=-1, max_epochs=1, callbacks=[recorder])
    with pytest.raises(
        ValueError, match=r"optim\.lr_scheduler='cosine' needs a known run length, got \S+ steps: set max_steps"
    ):
        trainer.fit(module, DataLoader(ImageStream(toy_images[:96]), batch_size=32))
    assert recorder.lrs == [] and trainer.global_step == 0


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
