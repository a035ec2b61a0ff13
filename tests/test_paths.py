"""pipeline.paths: the layout it names is the one dvc.yaml declares, and its loader reads what prepare writes."""

from pathlib import Path

import numpy as np
import yaml
from pipeline import paths

from ddpm import data

ROOT = Path(__file__).resolve().parents[1]


def declared() -> set[str]:
    """Every out, metric and plot of dvc.yaml's stages (a matrix stage's ``${item.run}`` stays as written)."""
    found = set()
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                found.update(entry if isinstance(entry, dict) else [entry])
    return found


def test_every_path_is_a_dvc_output_or_holds_one():
    outs = declared()
    for name, value in vars(paths).items():
        if isinstance(value, Path):
            p = value.as_posix()
            assert any(p == o or p.startswith(o + "/") or o.startswith(p + "/") for o in outs), (name, p)
    for stage in ("featurizer", "train", "evaluate"):
        assert paths.metrics_file(stage).as_posix() in outs


def test_load_splits_reads_the_prepared_splits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in (("train", 6), ("test", 2)):
        images = rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
        written[name] = data.ImageSet(images, np.zeros(n, np.int64), ["x"])
        data.save_npz(paths.split(name), written[name])
    train, test = paths.load_splits()
    assert np.array_equal(train.images, written["train"].images) and np.array_equal(test.images, written["test"].images)
