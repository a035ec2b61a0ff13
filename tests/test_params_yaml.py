"""params.yaml lists every field of every section's config, so every knob of a run is in one file."""

import importlib
from pathlib import Path

import pytest
import yaml
from pipeline import overrides, params

from ddpm.config import ConfigError

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


@pytest.mark.parametrize(
    "layers",
    [["gpu.yaml"], ["smoke.yaml"], ["ddpm.yaml"], ["smoke.yaml", "ddpm.yaml"]],
    ids=lambda layers: "+".join(layers),
)
def test_every_profile_validates_over_params_yaml(layers):
    """Each profile in configs/ is a set of overrides of params.yaml; every sampler it names (sample stage, sweep,
    guidance) must suit its model family, which the stages check before any work."""
    raw = params.read_yaml(ROOT / "params.yaml")
    for name in layers:
        raw = overrides.merge(raw, overrides.read(ROOT / "configs" / name))
    params.validate(raw)


def test_every_profile_in_configs_is_validated_above():
    assert {p.name for p in (ROOT / "configs").glob("*.yaml")} == {"gpu.yaml", "smoke.yaml", "ddpm.yaml"}


def test_a_sampler_of_another_family_fails_validation_naming_its_key():
    raw = overrides.merge(params.read_yaml(ROOT / "params.yaml"), {"sweep.runs": ["ddim-5"]})
    with pytest.raises(ConfigError, match=r"^sweep.runs: 'ddim-5': .*sampler='ddim' needs preconditioning='ddpm'"):
        params.validate(raw)


def test_a_sample_stage_sampler_of_another_family_fails_naming_its_section():
    raw = overrides.merge(params.read_yaml(ROOT / "params.yaml"), {"sample.sampler": "ddim"})
    with pytest.raises(ConfigError, match=r"^sample: .*sampler='ddim' needs preconditioning='ddpm'; 'edm' allows"):
        params.validate(raw)
