"""Class-conditional generation through the pipeline: params, the train and sample stages, make sample."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pipeline import overrides as dotted
from pipeline import params
from pipeline.sample import grid_images

from ddpm import export, io
from ddpm.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONDITIONAL = {
    "model.num_classes": "auto",
    "train.label_dropout": 0.2,
    "sample.labels": "balanced",
    "sample.guidance": 2.0,
}


def validated(**changes) -> params.Params:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return params.validate(dotted.merge(raw, changes))


# ------------------------------------------------------------------ params: one line before any work


def test_the_default_params_are_unconditional_and_a_conditional_setting_validates():
    assert validated().sample.labels is None
    p = validated(**CONDITIONAL)
    assert p.model["num_classes"] == "auto" and p.diffusion["p_uncond"] == 0.2
    assert params.resolved_model(p.model, 10)["num_classes"] == 10
    assert params.resolved_model(validated().model, 10)["num_classes"] is None


@pytest.mark.parametrize(
    "changes, message",
    [
        ({**CONDITIONAL, "model.num_classes": 10, "sample.labels": [3, 10]}, "sample.labels=[3, 10]: [10] outside"),
        ({"sample.labels": [7]}, "sample.labels=[7]: the model is unconditional"),
        ({**CONDITIONAL, "sample.guidance": -1}, "sample.guidance=-1"),
        ({**CONDITIONAL, "sample.labels": "all"}, "sample.labels='all'"),
        ({**CONDITIONAL, "sample.labels": [-1]}, "sample.labels=[-1]"),
        ({**CONDITIONAL, "sample.labels": None}, "sample.guidance=2.0: guidance needs the classes to draw"),
        ({"sample.guidance": 2}, "sample.guidance=2.0: guidance needs the classes to draw"),
        ({"diffusion.guidance": 3}, "diffusion.guidance=3.0: guidance needs the classes to draw"),
        ({"train.label_dropout": 0.1}, "train.label_dropout=0.1: the model is unconditional"),
        ({**CONDITIONAL, "train.label_dropout": 1.0}, "train.label_dropout=1.0"),
        ({**CONDITIONAL, "train.label_dropout": 0.0}, "which train.label_dropout=0 never trains"),
        ({**CONDITIONAL, "sample.labels": None, "sample.guidance": None, "train.label_dropout": 0.0}, "never trains"),
        ({"diffusion.p_uncond": 0.1}, "diffusion.p_uncond=0.1: the share of dropped labels is train.label_dropout"),
        ({"model.num_classes": "some"}, "model.num_classes='some'"),
    ],
)
def test_bad_conditioning_params_fail_in_one_line_naming_the_key(changes, message):
    with pytest.raises(ConfigError) as e:
        validated(**changes)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_labels_with_guidance_1_need_no_label_dropout():
    p = validated(**{**CONDITIONAL, "train.label_dropout": 0.0, "sample.guidance": 1.0})
    assert p.sample.label_array(5, 10) == [0, 1, 2, 3, 4]


def test_label_array_cycles_the_listed_classes_and_balanced_covers_every_class():
    p = validated(**{**CONDITIONAL, "sample.labels": [3, 5]})
    assert p.sample.label_array(5, 10) == [3, 5, 3, 5, 3]
    labels = validated(**CONDITIONAL).sample.label_array(25, 10)
    assert np.bincount(labels).tolist() == [3] * 5 + [2] * 5
    with pytest.raises(ValueError, match=r"sample.labels='balanced': the model is unconditional"):
        validated(**CONDITIONAL).sample.label_array(4, None)


# ------------------------------------------------------------------ the grid and the stored labels


def test_the_grid_shows_one_row_per_class_in_the_order_drawn():
    images = np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1)
    labels = np.array([4, 2, 4, 2, 4, 2, 4, 2, 4, 2, 4, 2])
    shown, columns = grid_images([images[:5], images[5:]], labels, 3)
    assert columns == 3
    assert shown[:, 0, 0, 0].tolist() == [0, 2, 4, 1, 3, 5]  # row of 4s, then row of 2s
    shown, columns = grid_images([images], None, 3)
    assert (columns, len(shown)) == (3, 9)


def test_labels_are_stored_beside_the_images(tmp_path):
    labels = np.array([1, 0, 1], dtype=np.int64)
    with io.NpzWriter(tmp_path / "s.npz", (3, 2, 2, 1), extra={"labels": labels}) as writer:
        writer.write(np.zeros((3, 2, 2, 1), np.uint8))
    assert io.load_samples(tmp_path / "s.npz").shape == (3, 2, 2, 1)
    assert io.load_labels(tmp_path / "s.npz").tolist() == [1, 0, 1]
    with io.NpzWriter(tmp_path / "u.npz", (1, 2, 2, 1)) as writer:
        writer.write(np.zeros((1, 2, 2, 1), np.uint8))
    assert io.load_labels(tmp_path / "u.npz") is None
    with pytest.raises(FileNotFoundError, match="samples not found"):
        io.load_labels(tmp_path / "missing.npz")


# ------------------------------------------------------------------ real stages


@pytest.fixture(scope="module")
def conditional(smoke_params, tmp_path_factory):
    """The smoke project trained class-conditionally with label dropout (``dvc repro sample``)."""
    from test_pipeline import copy_project, run

    text = yaml.safe_dump(dotted.merge(yaml.safe_load(smoke_params), CONDITIONAL), sort_keys=False)
    project = copy_project(tmp_path_factory.mktemp("conditional"), text)
    run(["dvc", "repro", "sample"], project)
    return project


def sample_cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    from test_pipeline import run

    return run([sys.executable, "-m", "pipeline.sample", "--quiet", *args], project, check=False)


@pytest.mark.slow
def test_a_conditional_model_is_trained_on_the_datas_classes_and_draws_them(conditional):
    model = export.load_model(conditional / "outputs/train/model.pt")
    assert model.net.config.num_classes == 10  # auto: the digits' classes
    assert model.config.p_uncond == 0.2
    out = conditional / "outputs/samples"
    labels = io.load_labels(out / "samples.npz")
    assert np.bincount(labels).tolist() == [20] * 10  # sample.n = 200, balanced
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["labels"], meta["guidance"], meta["nfe"]) == ("balanced", 2.0, 20)  # guided: 2 calls a step
    grid = np.asarray(Image.open(out / "grid.png"))
    # grid_size 6: six rows (classes 0..5) of six 8x8 images, 2 px apart, upscaled 256 // 48 = 5 times
    assert grid.shape[:2] == ((6 * 10 + 2) * 5, (6 * 10 + 2) * 5)


@pytest.mark.slow
def test_make_sample_draws_the_asked_class_with_guidance(conditional, tmp_path):
    guided = sample_cli(conditional, "--labels", "7", "--guidance", "3", "--n", "8", "--out", str(tmp_path / "g"))
    assert guided.returncode == 0, guided.stderr
    assert "of classes [7], guidance 3.0" in guided.stdout
    assert io.load_labels(tmp_path / "g/samples.npz").tolist() == [7] * 8
    plain = sample_cli(conditional, "--labels", "7", "--guidance", "1", "--n", "8", "--out", str(tmp_path / "c"))
    assert plain.returncode == 0, plain.stderr
    steps = json.loads((tmp_path / "c/meta.json").read_text())["nfe"]
    assert json.loads((tmp_path / "g/meta.json").read_text())["nfe"] == 2 * steps
    # different guidance, different images from the same noise
    a, b = (io.load_samples(tmp_path / f"{k}/samples.npz") for k in "gc")
    assert not np.array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--labels", "12"], "sample.labels=[12]: [12] outside the model's classes; allowed: integers in [0, 10)"),
        (["--labels", "3", "--guidance", "-1"], "sample.guidance=-1.0"),
        (["--labels", "x"], "sample.labels='x' is invalid"),
    ],
)
def test_bad_sample_input_fails_in_one_line_and_leaves_the_outputs(conditional, args, message):
    out = conditional / "outputs/samples"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    result = sample_cli(conditional, *args, "--out", str(out))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
