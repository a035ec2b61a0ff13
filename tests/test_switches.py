"""Throughput switches: ``train.compile``, ``sample.compile``, ``sample.precision`` and the stages' allocator.

torch.compile runs here with the ``eager`` backend: TorchDynamo traces the network for real and runs the
traced graph, without inductor's minute of code generation (the inductor path is measured by ``make bench``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline.sample import write_samples
from torch._dynamo.utils import counters

import fault_train
from conftest import needs_procfs
from ddpm import export, generate, io
from ddpm.config import ConfigError, SampleConfig, TrainConfig
from ddpm.fit import train
from ddpm.module import DiffusionModule
from ddpm.runtime import compile_in_place

ROOT = Path(__file__).resolve().parents[1]
MODEL = {**fault_train.MODEL, "dropout": 0.0}  # the fault tests' tiny net, deterministic
DIFFUSION = {"T": 100, "steps": 4, "sampler": "ddim"}
# the fault tests' run, shortened to 4 steps without periodic checkpoints (these runs test the switches)
TRAIN = {
    **fault_train.TRAIN,
    **{"max_steps": 4, "batch_size": 16, "warmup_steps": 1, "val_every": 4, "log_every": 2, "checkpoint_every": None},
}


def fit(toy_image_sets, out: Path, **overrides) -> dict:
    train_set, val_set = toy_image_sets
    cfg = TrainConfig(**{**TRAIN, **overrides})
    return train(train_set, val_set, MODEL, DIFFUSION, cfg, out, progress=False, resume=False)


def graphs() -> int:
    return sum(counters["stats"].values()) if counters["stats"] else 0


@pytest.fixture(scope="module")
def plain_and_compiled(toy_image_sets, tmp_path_factory):
    """The same 4-step run without and with ``train.compile: eager``; the compiled run's graph count."""
    out = tmp_path_factory.mktemp("runs")
    plain = fit(toy_image_sets, out / "plain")
    before = graphs()
    compiled = fit(toy_image_sets, out / "compiled", compile="eager")
    return out, plain, compiled, graphs() - before


def test_train_compile_traces_the_net_and_trains_as_the_plain_one(plain_and_compiled):
    out, plain, compiled, traced = plain_and_compiled
    assert traced > 0  # TorchDynamo compiled frames during the compiled run
    assert compiled["steps"] == plain["steps"] == 4
    assert compiled["compile_seconds"] >= 0 and "compile_seconds" not in plain  # reported where compiled
    assert compiled["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-4)
    a = io.load_weights_only(out / "plain" / "model.pt", "model")["state_dict"]
    b = io.load_weights_only(out / "compiled" / "model.pt", "model")["state_dict"]
    assert a.keys() == b.keys()  # compiled in place: no _orig_mod. prefix in the exported model
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    model = export.load_model(out / "compiled" / "model.pt")  # the plain loader takes it
    assert next(generate.sample_batches(model.net, generate.plan(model.config, steps=2), 2)).shape == (2, 1, 8, 8)


def test_model_step_accepts_a_compiled_wrapper(plain_and_compiled, toy_images):
    model = export.load_model(plain_and_compiled[0] / "plain" / "model.pt")
    module = DiffusionModule(model.net, model.config)
    wrapper = torch.compile(module.ema, backend="eager")  # an OptimizedModule, not the UNet itself
    batch = toy_images[:8]
    with torch.no_grad():
        expected = module.model_step(batch, torch.Generator().manual_seed(0), net=module.ema)
        got = module.model_step(batch, torch.Generator().manual_seed(0), net=wrapper)
    torch.testing.assert_close(got, expected)


def drawn(model: Path, out: Path, **settings) -> tuple[np.ndarray, dict, set[torch.dtype]]:
    """Images, metadata and the dtypes the sampling network returned, for ``draw`` with ``settings``."""
    loaded = export.load_model(model)
    dtypes: set[torch.dtype] = set()
    loaded.net.register_forward_hook(lambda _m, _i, output: dtypes.add(output.dtype))
    cfg = SampleConfig(n=6, steps=3, batch_size=4, grid_size=2, trajectory_samples=2, trajectory_points=2, **settings)
    meta = write_samples(loaded, generate.plan(loaded.config, cfg.sampler, cfg.steps), cfg, out, progress=False)
    return io.load_samples(out / "samples.npz"), meta, dtypes


def test_sample_precision_runs_the_network_under_bf16_autocast(plain_and_compiled, tmp_path):
    model = plain_and_compiled[0] / "plain" / "model.pt"
    fp32, meta32, dtypes32 = drawn(model, tmp_path / "fp32")
    bf16, meta16, dtypes16 = drawn(model, tmp_path / "bf16", precision="bf16-mixed")
    assert dtypes32 == {torch.float32} and dtypes16 == {torch.bfloat16}
    assert (meta32["precision"], meta16["precision"]) == ("32-true", "bf16-mixed")
    assert fp32.dtype == bf16.dtype == np.uint8 and fp32.shape == bf16.shape == (6, 8, 8, 1)
    # bf16 rounds the network's output: close to the fp32 images, not equal to them
    assert not np.array_equal(fp32, bf16)
    assert np.abs(fp32.astype(int) - bf16.astype(int)).mean() < 8


def test_sample_compile_draws_the_same_images(plain_and_compiled, tmp_path):
    model = plain_and_compiled[0] / "plain" / "model.pt"
    plain, _, _ = drawn(model, tmp_path / "plain")
    torch._dynamo.reset()  # nets compiled by earlier tests of this process may have used up the forward's recompiles
    before = graphs()
    compiled, _, _ = drawn(model, tmp_path / "compiled", compile="eager")
    assert graphs() > before
    np.testing.assert_array_equal(compiled, plain)


def test_compile_in_place_keeps_the_module(tiny_net_kwargs):
    from ddpm.nets import UNet, UNetConfig

    net = UNet(UNetConfig(**tiny_net_kwargs))
    keys = list(net.state_dict())
    assert compile_in_place(net, False) is net and net._compiled_call_impl is None
    assert compile_in_place(net, "eager") is net and net._compiled_call_impl is not None
    assert list(net.state_dict()) == keys


@pytest.mark.parametrize(("section", "value"), [("train", "yes"), ("train", 1), ("sample", "fast"), ("sample", None)])
def test_bad_compile_settings_fail_in_one_line(section, value):
    config = TrainConfig if section == "train" else SampleConfig
    with pytest.raises(ConfigError, match=rf"^{section}\.compile=.*allowed: false, true \(inductor\)") as e:
        config.from_dict({"compile": value}, section)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
def test_compile_takes_inductors_modes(mode):
    assert TrainConfig(compile=mode).compile == SampleConfig(compile=mode).compile == mode
    with pytest.raises(ConfigError, match=r"an inductor mode \(reduce-overhead, max-autotune, max-autotune-no-cudag"):
        SampleConfig.from_dict({"compile": mode.upper()}, "sample")


def test_bad_sample_precision_fails_in_one_line():
    with pytest.raises(ConfigError, match=r"^sample\.precision='fp16'.*'32-true' or 'bf16-mixed'"):
        SampleConfig.from_dict({"precision": "fp16"}, "sample")


STAGE = textwrap.dedent(
    """
    import argparse, re
    from pathlib import Path
    from pipeline import params

    def rss_mb():
        return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

    def main(args):
        before = rss_mb()
        block = bytearray(256 * 2**20)  # 256 MB, zeroed: every page touched
        touched = rss_mb()
        del block
        print(f"{touched - before:.0f} {rss_mb() - before:.0f}")

    params.run_stage(main, argparse.ArgumentParser())
    """
)


@needs_procfs
@pytest.mark.parametrize("keep", ["1", "0"])
def test_stages_keep_freed_memory_unless_switched_off(keep):
    env = {**os.environ, "DDPM_KEEP_FREED_MEMORY": keep}
    done = subprocess.run([sys.executable, "-c", STAGE], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    touched, after_free = map(float, done.stdout.split())
    assert touched > 200
    if keep == "1":
        assert after_free > 200  # the freed block stays in the heap for the next step
    else:
        assert after_free < 50  # glibc's default: a large block is unmapped when freed


def test_params_yaml_names_the_switches():
    from pipeline import params

    p = params.load(ROOT / "params.yaml")
    assert p.train.compile is False and p.sample.compile is False and p.sample.precision == "32-true"
    assert json.loads(json.dumps(p.sample.to_dict()))["precision"] == "32-true"
