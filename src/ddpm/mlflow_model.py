"""The EMA model as an MLflow ``python_function`` model: the loader module its ``MLmodel`` names.

The train stage logs ``model.pt`` as the run's *Logged model* (:func:`ddpm.tracking.log_model`) with this
module as its ``loader_module``: MLflow copies the file to the model's ``data/`` folder and, on
``mlflow.pyfunc.load_model``, calls :func:`_load_pyfunc` on it. The file is read with
:func:`ddpm.export.load_model` (``weights_only=True``); nothing in the model's folder is unpickled or
imported. ``predict`` draws images::

    model = mlflow.pyfunc.load_model("models:/ddpm-mnist@champion")
    images = model.predict({"n": 16, "seed": 0, "sampler": "heun", "steps": 18})  # uint8 [16, H, W, C]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ddpm import data, export, generate

OPTIONS = ("n", "seed", "sampler", "steps", "eta", "batch_size")


class ImageSampler:
    """``predict({"n": 16, "seed": 0, ...})`` -> uint8 images [n, H, W, C] drawn from the exported EMA model."""

    def __init__(self, model: export.Model) -> None:
        self.model = model

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> np.ndarray:
        """Draw images; the options (``n``, ``seed``, ``sampler``, ``steps``, ``eta``, ``batch_size``) come from
        a mapping, the first row of a DataFrame, or ``params``; sampler settings default to the model's."""
        options = dict(_first_row(model_input))
        options.update(params or {})
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise ValueError(f"unknown sampling options {sorted(unknown)}; allowed: {', '.join(OPTIONS)}")
        plan = generate.plan(self.model.config, options.get("sampler"), _int(options.get("steps")), options.get("eta"))
        n, seed = _int(options.get("n")) or 1, _int(options.get("seed")) or 0
        batch_size = _int(options.get("batch_size")) or n
        images = generate.sample(self.model.net, plan, n, seed=seed, batch_size=batch_size)
        return data.from_tensor(images.float())


def _first_row(model_input: Any) -> Mapping[str, Any]:
    if model_input is None:
        return {}
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a pandas DataFrame
        rows = model_input.to_dict(orient="records")
        return rows[0] if rows else {}
    if isinstance(model_input, Mapping):
        return {k: v[0] if isinstance(v, list | tuple | np.ndarray) else v for k, v in model_input.items()}
    raise TypeError(f"expected a mapping or a DataFrame of sampling options, got {type(model_input).__name__}")


def _int(value: Any) -> int | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else int(value)


def _load_pyfunc(data_path: str) -> ImageSampler:
    """MLflow's loader hook: the model file at ``data_path`` (read with ``weights_only=True``)."""
    return ImageSampler(export.load_model(data_path))
