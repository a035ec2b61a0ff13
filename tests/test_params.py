"""Every params.yaml gets one clear line: fuzzed values, sections and files, and hostile YAML, validate or fail
in one line naming the key (pipeline.params)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline import params

from ddpm.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


BASE = params.read_yaml(ROOT / "params.yaml")
KEYS = [(s, k) for s, values in BASE.items() for k in values]
LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["auto", "cpu", "ddim", "heun", "cosine", "digits", "image_folder", "ddim-0", "UTC", "* * *"]),
    st.sampled_from([0, 1, -1, 2**31, 2**64, 10**30, 1e308, float("nan"), float("inf"), 0.5]),
)
JUNK = st.recursive(
    LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner),
    max_leaves=8,
)
FUZZ = settings(max_examples=250, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def validates_or_fails_in_one_line(raw) -> None:
    try:
        params.validate(raw)
    except ConfigError as e:
        assert "\n" not in str(e) and len(str(e)) < 600, str(e)


@FUZZ
@given(st.data())
def test_fuzzed_params_values_validate_or_fail_in_one_line(draw):
    raw = copy.deepcopy(BASE)
    for _ in range(draw.draw(st.integers(1, 3))):
        kind = draw.draw(st.sampled_from(["value", "value", "section", "new key"]))
        if kind == "value":
            section, key = draw.draw(st.sampled_from(KEYS))
            if isinstance(raw[section], dict):
                raw[section][key] = draw.draw(JUNK)
        elif kind == "section":
            raw[draw.draw(st.sampled_from(list(BASE)))] = draw.draw(JUNK)
        elif isinstance(values := raw[draw.draw(st.sampled_from(list(BASE)))], dict):
            values[draw.draw(st.one_of(st.text(max_size=6), st.integers(), st.none()))] = draw.draw(JUNK)
    validates_or_fails_in_one_line(raw)


@FUZZ
@given(st.dictionaries(st.one_of(st.sampled_from(list(BASE)), st.text(max_size=6), st.integers()), JUNK, max_size=6))
def test_fuzzed_params_sections_validate_or_fail_in_one_line(raw):
    validates_or_fails_in_one_line(raw)


YAML_BITS = [
    "{",
    "}",
    "[",
    "]",
    ": ",
    "- ",
    "\n",
    "  ",
    "\t",
    "&a ",
    "*a",
    "? ",
    "!!binary ",
    "!!set ",
    ".nan",
    "-.inf",
]
YAML_BITS += [
    "!!python/object/apply:os.system ",
    "<<: *a",
    "'",
    '"',
    "#",
    "---\n",
    "~",
    "1e999",
    "0x1F",
    "\x00",
    "\ufeff",
]


@FUZZ
@given(st.data())
def test_fuzzed_params_files_load_or_fail_in_one_line(tmp_path_factory, draw):
    lines = (ROOT / "params.yaml").read_text().splitlines()
    for _ in range(draw.draw(st.integers(1, 4))):
        i = draw.draw(st.integers(0, len(lines) - 1))
        j = draw.draw(st.integers(0, len(lines[i])))
        lines[i] = lines[i][:j] + draw.draw(st.one_of(st.sampled_from(YAML_BITS), st.text(max_size=4))) + lines[i][j:]
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text("\n".join(lines))
    try:
        params.load(path)
    except ConfigError as e:
        assert "\n" not in str(e), str(e)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[" * 50000, "nested too deeply"),
        (b"\xff\xfe junk", "not UTF-8 text"),
        (b"train: !!python/object/apply:os.system [touch pwned]", "not valid YAML"),
        (b"- a\n- b", "expected a mapping of sections, got list"),
        (yaml.safe_dump({"train": {"lr": float("nan")}}).encode(), "train.lr=nan: Input should be a finite number"),
        (yaml.safe_dump({"train": {"seed": 2**40}}).encode(), "train.seed=1099511627776: Input should be less than"),
        (yaml.safe_dump({"model": {"channels": 10**30}}).encode(), "model: "),
        (yaml.safe_dump({"diffusion": {"T": 10**9}}).encode(), "diffusion.T=1000000000: Input should be less than"),
        (yaml.safe_dump({"train": {"devices": 0}}).encode(), "train.devices=0: expected a count >= 1"),
        (yaml.safe_dump({"train": {"precision": "fp8"}}).encode(), "train.precision='fp8': Input should be"),
        (yaml.safe_dump({"train": {"nonfinite": "ignore"}}).encode(), "train.nonfinite='ignore': Input should be"),
        (yaml.safe_dump({"sample": [1, 2]}).encode(), "sample=[1, 2]: expected a mapping"),
        (yaml.safe_dump({"data": {"x\ny": 1}}).encode(), r"data.'x\ny': unknown key"),
    ],
)
def test_hostile_params_files_fail_in_one_line(tmp_path, content, message):
    (tmp_path / "params.yaml").write_bytes(content)
    with pytest.raises(ConfigError) as e:
        params.load(tmp_path / "params.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "pwned").exists()
