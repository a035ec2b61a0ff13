"""Class-conditional generation through the pipeline: params, the train and sample stages, make sample."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
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
        ({"sweep.guidance": [1, -2]}, "sweep.guidance=[1, -2]: allowed: distinct guidance scales >= 0"),
        ({"sweep.guidance_run": "ddim"}, "sweep.guidance_run='ddim'"),
        ({"sweep.guidance_run": "nope-5"}, "sweep.guidance_run: 'nope-5'"),
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
    """The smoke project trained class-conditionally with label dropout: ``dvc repro evaluate guidance`` (train,
    sample with balanced labels and guidance 2, evaluate, the guidance curve), tracked in the local MLflow store."""
    from test_pipeline import copy_project, run

    text = yaml.safe_dump(dotted.merge(yaml.safe_load(smoke_params), CONDITIONAL), sort_keys=False)
    project = copy_project(tmp_path_factory.mktemp("conditional"), text)
    run(["dvc", "repro", "evaluate", "guidance"], project)
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
    # Heun's 10 steps make 19 network calls, and guidance two a call
    assert (meta["labels"], meta["guidance"], meta["nfe"]) == ("balanced", 2.0, 38)
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


# ------------------------------------------------------------------ metrics: label accuracy and the guidance curve


@pytest.mark.slow
def test_evaluate_scores_label_accuracy_and_logs_it_under_the_guided_protocol(conditional):
    result = json.loads((conditional / "outputs/metrics/evaluate.json").read_text())
    assert 0 <= result["label_accuracy"] <= 1 and 0 < result["confidence"] <= 1
    assert (result["labels"], result["guidance"]) == ("balanced", 2.0)
    run_id = json.loads((conditional / "outputs/train/run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{conditional / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.metrics["label_accuracy/heun_10"] == pytest.approx(result["label_accuracy"])
    assert (run.data.tags["protocol.labels"], run.data.tags["protocol.guidance"]) == ("balanced", "2.0")
    assert (run.data.params["sample.labels"], run.data.params["sample.guidance"]) == ("balanced", "2.0")
    artifacts = {a.path for a in client.list_artifacts(run_id, "samples/heun_10")}
    assert "samples/heun_10/grid.png" in artifacts  # the per-class grid


@pytest.mark.slow
def test_label_accuracy_catches_a_model_that_ignores_its_labels(conditional):
    """The featurizer's verdict on real test digits: their own labels score high, shuffled labels (what a model
    that ignores its labels draws against) score about 1/10."""
    from ddpm import data, featurizer

    test = data.load_npz(conditional / "outputs/data/test.npz")
    net, _ = featurizer.load_featurizer(conditional / "outputs/featurizer/featurizer.pt")
    right = featurizer.judge(net, test.images, test.labels)
    shuffled = featurizer.judge(net, test.images, np.random.default_rng(0).permutation(test.labels))
    assert right["label_accuracy"] > 0.5 > 0.25 > shuffled["label_accuracy"]
    assert right["confidence"] == shuffled["confidence"]  # confidence does not look at the labels


@pytest.mark.slow
def test_the_guidance_stage_plots_fid_and_label_accuracy_against_the_scale(conditional):
    from pipeline import guidance

    out = conditional / "outputs/guidance"
    lines = (out / "fid_vs_guidance.csv").read_text().splitlines()
    assert lines[0] == ",".join(guidance.HEADER)
    rows = [dict(zip(guidance.HEADER, line.split(","))) for line in lines[1:]]
    assert [float(r["guidance"]) for r in rows] == [0, 1, 2, 4]
    assert all(float(r["fid"]) > 0 and 0 <= float(r["label_accuracy"]) <= 1 for r in rows)
    assert [int(r["nfe"]) for r in rows] == [10, 10, 20, 20]  # 0 and 1 need one call a step, others two
    assert "Best FID at guidance" in (out / "table.md").read_text()
    assert (out / "guidance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run_id = json.loads((conditional / "outputs/train/run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{conditional / 'mlflow.db'}")
    history = client.get_metric_history(run_id, "guidance/label_accuracy/dpmpp_2m_10")
    assert sorted(m.step for m in history) == [0, 100, 200, 400]  # MLflow step = 100 x the scale
    assert {a.path for a in client.list_artifacts(run_id, "guidance")} >= {"guidance/guidance.png"}


# ------------------------------------------------------------------ inpainting


def test_mask_presets_generate_the_named_region():
    from pipeline.inpaint import load_mask

    assert load_mask("left", 8)[:, :4].all() and not load_mask("left", 8)[:, 4:].any()
    assert load_mask("right", 8)[:, 4:].all() and not load_mask("right", 8)[:, :4].any()
    assert load_mask("top", 8)[:4].all() and not load_mask("bottom", 8)[:4].any()
    center = load_mask("center", 8)
    assert center[2:6, 2:6].all() and center.sum() == 16


def write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def inpaint_cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    from test_pipeline import run

    return run([sys.executable, "-m", "pipeline.inpaint", *args], project, check=False)


@pytest.mark.slow
def test_inpainting_keeps_the_known_pixels_and_completes_the_masked_ones(conditional, tmp_path):
    result = inpaint_cli(conditional, "--mask", "left", "--n", "6", "--out", str(tmp_path / "left"), "--track")
    assert result.returncode == 0, result.stderr
    assert "inpaint: 6 images, mask left (50% generated)" in result.stdout
    with np.load(tmp_path / "left/completions.npz") as f:
        completed, original, mask, labels = f["arr_0"], f["original"], f["mask"].astype(bool), f["labels"]
    test = np.load(conditional / "outputs/data/test.npz")
    assert np.array_equal(original, test["images"][:6]) and labels.tolist() == test["labels"][:6].tolist()
    known = ~mask
    diff = np.abs(completed.astype(int) - original.astype(int))
    assert diff[:, known].max() <= 1  # the known pixels are the input's (up to the uint8 round trip)
    assert diff[:, mask].mean() > 1  # the masked ones were generated
    picture = np.asarray(Image.open(tmp_path / "left/inpaint.png"))
    assert picture.shape[0] == (3 * 10 + 2) * 8  # three rows of 8x8 images, 2 px apart, scaled 64 // 8 times
    run_id = json.loads((conditional / "outputs/train/run.json").read_text())["run_id"]
    params = MlflowClient(f"sqlite:///{conditional / 'mlflow.db'}").get_run(run_id).data.params
    assert (params["inpaint.mask"], params["inpaint.resample"]) == ("left", "1")

    # a PNG mask (white generated) with RePaint resampling
    pixels = np.zeros((8, 8))
    pixels[5:, :] = 255
    png = write_png(tmp_path / "mask.png", pixels)
    args = ("--mask", str(png), "--n", "3", "--repaint-jumps", "2", "--resample", "2", "--out", str(tmp_path / "p"))
    result = inpaint_cli(conditional, *args)
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "p/completions.npz") as f:
        assert np.array_equal(f["mask"].astype(bool), pixels == 255)
        assert np.abs(f["arr_0"].astype(int) - f["original"].astype(int))[:, :5].max() <= 1
    meta = json.loads((tmp_path / "p/meta.json").read_text())
    assert (meta["repaint_jumps"], meta["resample"]) == (2, 2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mask, images, message",
    [
        ("middle", None, "mask='middle' is invalid; allowed: left, right, top, bottom, center or a .png file"),
        ("big.png", None, "big.png: 16x16 pixels; allowed: a PNG of the model's 8x8 pixels"),
        ("gray.png", None, "gray.png: gray levels [100]; allowed: black (0, kept) and white (255, generated)"),
        ("missing.png", None, "missing.png: not found"),
        ("left", "rgb.npz", "rgb.npz: images of 8x8x3 (HxWxC); allowed: the model's 8x8x1"),
    ],
)
def test_bad_inpaint_input_fails_in_one_line_and_leaves_the_outputs(conditional, tmp_path, mask, images, message):
    from ddpm import data

    write_png(tmp_path / "big.png", np.zeros((16, 16)))
    write_png(tmp_path / "gray.png", np.full((8, 8), 100))
    rgb = data.ImageSet(np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, np.int64), ["0"])
    data.save_npz(tmp_path / "rgb.npz", rgb)
    out = tmp_path / "out"
    out.mkdir()
    (out / "completions.npz").write_bytes(b"earlier")
    args = ["--mask", mask if mask in ("middle", "left") else str(tmp_path / mask), "--out", str(out)]
    result = inpaint_cli(conditional, *args, *(["--images", str(tmp_path / images)] if images else []))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["completions.npz"] and (
        out / "completions.npz"
    ).read_bytes() == b"earlier"


@pytest.mark.slow
def test_inpainting_a_conditional_model_takes_a_guidance_scale_and_refuses_a_negative_one(conditional, tmp_path):
    bad = inpaint_cli(conditional, "--mask", "top", "--n", "2", "--guidance", "-1", "--out", str(tmp_path / "b"))
    assert bad.returncode == 2 and "guidance=-1: allowed: a scale >= 0" in bad.stderr and not (tmp_path / "b").exists()
    guided = inpaint_cli(conditional, "--mask", "top", "--n", "2", "--guidance", "3", "--out", str(tmp_path / "g"))
    assert guided.returncode == 0, guided.stderr
    assert json.loads((tmp_path / "g/meta.json").read_text())["guidance"] == 3.0
