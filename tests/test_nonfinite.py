"""A nan or inf loss stops training naming the step and keeps the last good checkpoint; ``train.nonfinite: skip``
skips such a step's update and resumes from that checkpoint (``tests/fault_train.py``'s tiny run)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import fault_train
from ddpm.module import DiffusionModule, NonFiniteLossError

pytestmark = pytest.mark.usefixtures("restore_threads")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class Poison(pl.Callback):
    """Fill the batch of optimizer step ``step`` with nan; remember the state around that step."""

    def __init__(self, step: int) -> None:
        self.step, self.before, self.after = step, None, None

    def state(self, trainer, module) -> dict:
        return copy.deepcopy({"module": module.state_dict(), "optimizer": trainer.optimizers[0].state_dict()})

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step:
            batch[0].fill_(float("nan"))
            self.before = self.state(trainer, module)

    def on_train_batch_end(self, trainer, module, *args) -> None:
        if trainer.global_step == self.step:
            self.after = self.state(trainer, module)


def test_a_nan_loss_stops_naming_the_step_and_skip_resumes_from_the_last_good_checkpoint(digits, tmp_path):
    with pytest.raises(NonFiniteLossError) as stopped:
        fault_train.run(digits, tmp_path, callbacks=(Poison(8),))
    message = str(stopped.value)
    assert stopped.value.step == 8 and message.startswith("loss is nan at optimizer step 8; training stopped")
    assert f"{tmp_path / 'resume.ckpt'} (step 5) is kept" in message and "train.nonfinite: skip" in message
    assert "\n" not in message
    assert sorted(os.listdir(tmp_path)) == ["resume.ckpt"] and load(tmp_path / "resume.ckpt")["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in load(tmp_path / "resume.ckpt")["state_dict"].values())

    poison, first = Poison(8), fault_train.FirstStep()
    metrics = fault_train.run(digits, tmp_path, callbacks=(poison, first), nonfinite="skip")
    assert first.step == 5 and metrics["steps"] == 40 and metrics["skipped_steps"] == 1
    before, after = poison.before, poison.after
    for key, value in before["module"].items():  # the skipped step changed neither the weights nor the EMA
        assert torch.equal(value, after["module"][key]), key
    for i, state in before["optimizer"]["state"].items():  # nor the optimizer's moments and step count
        assert all(torch.equal(state[k], after["optimizer"]["state"][i][k]) for k in state)
    assert all(torch.isfinite(v).all() for v in load(tmp_path / "model.pt")["state_dict"].values())


def test_an_inf_loss_is_caught_too(digits, tmp_path):
    class Inf(Poison):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if trainer.global_step + 1 == self.step:
                module.model_step = lambda *a, **k: DiffusionModule.model_step(module, *a, **k) * float("inf")

    with pytest.raises(NonFiniteLossError, match=r"loss is inf at optimizer step 3; training stopped; no checkpoint"):
        fault_train.run(digits, tmp_path, callbacks=(Inf(3),), max_steps=4)
