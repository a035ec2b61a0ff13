"""params.yaml lists every field of every section's config, so every knob of a run is in one file."""

import importlib
from pathlib import Path

import pytest
import yaml
from pipeline import params

ROOT = Path(__file__).resolve().parents[1]
# The schema of each params.yaml section, as "module:Class".
SCHEMAS = {
    "data": "ddpm.config:DataConfig",
    "featurizer": "ddpm.config:FeaturizerConfig",
    "model": "ddpm.config:UNetConfig",
    "diffusion": "ddpm.config:DDPMConfig",
    "train": "ddpm.config:TrainConfig",
    "ema": "ddpm.config:EmaConfig",
    "sample": "ddpm.config:SampleConfig",
    "evaluate": "ddpm.config:EvaluateConfig",
    "sweep": "ddpm.config:SweepConfig",
    "tracking": "ddpm.config:TrackingConfig",
    "schedule": "pipeline.schedule:ScheduleConfig",
}
# Fields that params.yaml must not set: the data fixes them (pipeline.params refuses them).
FROM_THE_DATA = {"model": {"in_channels", "image_size"}, "diffusion": {"channels", "image_size"}}
# Fields that another section sets (pipeline.params refuses them here): the schema's name -> the key that sets it.
SET_ELSEWHERE = {"diffusion": {"p_uncond": "train.label_dropout"}}
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def schema(section: str) -> type:
    module, name = SCHEMAS[section].split(":")
    return getattr(importlib.import_module(module), name)


def test_every_section_has_a_schema_and_is_in_params_yaml():
    assert set(SCHEMAS) == set(params.SECTIONS) == set(PARAMS)


@pytest.mark.parametrize("section", list(SCHEMAS))
def test_params_yaml_lists_every_field_of_the_section(section):
    fields = set(schema(section).model_fields) - FROM_THE_DATA.get(section, set()) - set(SET_ELSEWHERE.get(section, {}))
    listed = set(PARAMS[section])
    assert not fields - listed, f"params.yaml `{section}` lacks {sorted(fields - listed)}"
    assert not listed - fields, f"params.yaml `{section}` has keys its schema does not know: {sorted(listed - fields)}"


def test_the_fields_that_come_from_the_data_are_fields_of_their_schema():
    for section, names in FROM_THE_DATA.items():
        assert names <= set(schema(section).model_fields), section


def test_the_fields_set_elsewhere_are_fields_of_both_schemas():
    for section, names in SET_ELSEWHERE.items():
        for name, key in names.items():
            other, field = key.split(".")
            assert name in schema(section).model_fields and field in schema(other).model_fields, key


def test_params_yaml_validates():
    params.load(ROOT / "params.yaml")
