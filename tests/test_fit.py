"""The training stage function (ddpm.fit.train): what a run prints."""

from __future__ import annotations

import logging
import warnings

from pytorch_lightning.utilities.rank_zero import rank_zero_module

from ddpm import fit
from ddpm.config import TrainConfig

MODEL = {"channels": 8, "channel_mult": [1, 2], "attn_resolutions": [4], "num_heads": 2, "norm_groups": 4}
DIFFUSION = {"T": 50, "steps": 4, "sampler": "ddim"}
TRAIN = {"max_steps": 6, "batch_size": 16, "warmup_steps": 1, "val_every": 6, "log_every": 2, "accelerator": "cpu"}


def test_a_run_without_a_terminal_logs_progress_and_no_lightning_notices(toy_image_sets, tmp_path, capsys, caplog):
    train_set, val_set = toy_image_sets
    lightning = rank_zero_module.log  # Lightning's own messages, which do not propagate to pytest's handler
    lightning.addHandler(caplog.handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = fit.train(train_set, val_set, MODEL, DIFFUSION, TrainConfig(**TRAIN), tmp_path, resume=False)
    finally:
        lightning.removeHandler(caplog.handler)
    assert metrics["steps"] == 6
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train: step")]
    # standard output is not a terminal under capsys: a line every tenth of the run (here every step)
    assert [line.split(",")[0] for line in lines] == [f"train: step {s}/6" for s in range(1, 7)]
    assert all(" img/s, elapsed " in line and ", ETA " in line for line in lines)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("GPU available" in m for m in messages), messages  # Lightning's log is captured ...
    assert not any("Tip" in m or "litlogger" in m or "litmodels" in m for m in messages), messages  # ... but no tip
    assert not [str(w.message) for w in caught if "LeafSpec" in str(w.message)]
