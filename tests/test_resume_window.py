"""The train stage removes the resume checkpoint only after writing its records (``keep_resume``)."""

from __future__ import annotations

import logging

import numpy as np
import torch

import fault_train
from ddpm import checkpoints, io
from ddpm.config import TrainConfig
from ddpm.fit import train

MODEL = {"channels": 8, "channel_mult": [1, 2], "attn_resolutions": [4], "num_heads": 2, "norm_groups": 4}
DIFFUSION = {"T": 50, "steps": 4, "sampler": "ddim"}
# the fault tests' run, shortened to 6 steps with checkpoints at steps 3 and 6
TRAIN = {
    **fault_train.TRAIN,
    **{"max_steps": 6, "batch_size": 16, "warmup_steps": 1, "val_every": 6, "log_every": 2, "checkpoint_every": 3},
}


def fit(toy_image_sets, out, **kwargs) -> dict:
    train_set, val_set = toy_image_sets
    cfg = TrainConfig(**TRAIN)
    return train(train_set, val_set, MODEL, DIFFUSION, cfg, out, progress=False, **kwargs)


def test_a_run_killed_after_training_but_before_its_records_finishes_from_the_checkpoint(
    toy_image_sets, tmp_path, caplog
):
    first = fit(toy_image_sets, tmp_path, keep_resume=True)
    resume = tmp_path / checkpoints.RESUME
    assert resume.is_file()  # left for the stage, which removes it after train.json and run.json
    weights = io.load_weights_only(tmp_path / "model.pt", "model")["state_dict"]
    # the stage is killed here; DVC runs it again, and the run resumes at the last periodic checkpoint (step 3)
    with caplog.at_level(logging.WARNING):
        again = fit(toy_image_sets, tmp_path)
    assert f"resuming from {resume} at step 3" in caplog.text  # not trained again from step 0
    assert not resume.exists()
    assert again["steps"] == first["steps"] == 6
    assert again["val_loss_ema"] == first["val_loss_ema"] and again["train_loss"] == first["train_loss"]
    assert np.isfinite(again["images_per_second"]) and again["images_per_second"] < 1e6
    for k, v in io.load_weights_only(tmp_path / "model.pt", "model")["state_dict"].items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)


def test_train_removes_the_checkpoint_by_default(toy_image_sets, tmp_path):
    fit(toy_image_sets, tmp_path)
    assert not (tmp_path / checkpoints.RESUME).exists() and (tmp_path / "model.pt").is_file()
