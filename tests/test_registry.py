"""ddpm.registry's pure parts: the registered model's name and the evaluation protocol that makes FIDs comparable.

The registry against a real MLflow server (register, the champion rule, fetching a model) is in test_tracking.py.
"""

from ddpm import registry
from ddpm.config import TrackingConfig

RESULT = {"feature_network": "classifier", "feature_weights_hash": "ab12", "reference": "test", "n_ref": 180}
RESULT = {**RESULT, "n_gen": 200, "fid": 3.5, "kid": 0.01, "sampler": "ddim", "steps": 10}


def test_model_name_defaults_to_the_dataset():
    assert registry.model_name(TrackingConfig(), "digits") == "ddpm-digits"
    assert registry.model_name(TrackingConfig(registered_model="mine"), "digits") == "mine"


def test_protocol_is_the_protocol_keys_and_their_hash():
    protocol = registry.protocol_of(RESULT)
    assert set(protocol) == {*registry.PROTOCOL_KEYS, "protocol"} and len(protocol["protocol"]) == 16
    other_run = {**RESULT, "fid": 9.0, "sampler": "heun", "steps": 25}  # scores and samplers are not the protocol
    assert registry.protocol_of(other_run) == protocol
    assert registry.protocol_of({**RESULT, "n_gen": 100})["protocol"] != protocol["protocol"]
