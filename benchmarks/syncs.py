"""Host-device synchronisations of a training step and a sampling chunk (CUDA's sync debug mode; GPU only)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from benchmarks.calls import TrainStep, diffusion_module, sample_call, training_batch
from benchmarks.configs import Plan


def synchronisations(plan: Plan, device: torch.device, steps: int = 10) -> dict[str, int]:
    """Host-device synchronisations (CUDA's sync debug mode) in a training step and in a sampling chunk.

    The training step is TrainStep (model_step, backward, clipping, AdamW, EMA) in bf16-mixed; the chunk is
    ``sample_batches`` with ``steps`` steps, whose one expected synchronisation is the copy of the images to
    the host at its end. Empty on CPU.
    """
    if device.type != "cuda":
        return {}
    _, cfg = plan.first
    torch.manual_seed(0)
    module = diffusion_module(cfg, device)
    batch = training_batch(cfg, plan.train_batch, device)
    calls = {
        "training step, bf16-mixed": TrainStep(module, module.net, batch, "bf16-mixed"),
        f"sampling chunk of {plan.sample_batch} images, {plan.sampler}, {steps} steps": sample_call(
            module.net, module.config, plan.sample_batch, plan.sampler, steps, "bf16-mixed"
        ),
    }
    return {name: count(call, device) for name, call in calls.items()}


def count(call: Callable[[], object], device: torch.device) -> int:
    """Host-device synchronisations of one call of ``call`` on a CUDA device, after a warm-up call (lazy
    initialisation may synchronise once), counted with CUDA's sync debug mode."""
    call()
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


def targets(syncs: dict[str, int]) -> list[str]:
    """The synchronisation target: counted on a GPU, by construction elsewhere."""
    if syncs:
        counted = "; ".join(f"{k}: {v}" for k, v in syncs.items())
        return [
            f"- Host-device synchronisations counted by CUDA's sync debug mode: {counted} (a chunk's one expected"
            " synchronisation is the copy of its images to the host). No Python loop over the batch in sampling or"
            " in `model_step`: noise is drawn for the whole chunk at once."
        ]
    return [
        "- No host-device synchronisation per step and no Python loop over the batch in sampling or in"
        " `model_step`: by construction (a sampler's noise levels and timesteps are Python numbers computed"
        " before its loop, and noise is drawn for the whole chunk at once); counted on a GPU only."
    ]
