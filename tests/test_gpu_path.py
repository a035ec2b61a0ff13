"""The GPU path, as far as a CPU shows it: the GPU profile (``configs/gpu.yaml``) validates and its CIFAR-10 net
compiles, trains and samples here; AdamW is fused where the net is on CUDA; the compile time is reported and
inductor's cache outlives the process; the Prefect flows take the profile; the GPU benchmark runs its harness."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from benchmarks import gpu_profile
from pipeline import deployments, flows, params
from pipeline import overrides as dotted
from pytorch_lightning.loggers import CSVLogger

from ddpm import data, export, fit, generate
from ddpm.config import ConfigError, DDPMConfig, OptimConfig, TrainConfig, UNetConfig
from ddpm.module import DiffusionModule, adamw
from ddpm.nets import UNet
from ddpm.runtime import INDUCTOR_CACHE, compile_in_place, device, inductor_cache

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "configs/gpu.yaml"
CIFAR10_NET_PARAMETERS = 35_746_307  # Ho et al. 2020, Appendix B: 35.7 M


def profile_params() -> params.Params:
    """params.yaml with the GPU profile over it, validated as a stage validates it."""
    return params.validate(dotted.merge(params.read_yaml(ROOT / "params.yaml"), dotted.read(ROOT / PROFILE)))


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """The module's compiled nets leave no TorchDynamo caches behind for the tests after it in this process."""
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def profile() -> params.Params:
    return profile_params()


@pytest.fixture(scope="module")
def cifar_net(profile) -> tuple[UNetConfig, DDPMConfig]:
    """The profile's net and diffusion on CIFAR-10's 32x32 RGB images."""
    size, channels = profile.data.native_shape()
    net = UNetConfig.from_dict({**profile.model, "in_channels": channels, "image_size": size}, "model")
    return net, DDPMConfig.from_dict({**profile.diffusion, "channels": channels, "image_size": size}, "diffusion")


def test_the_gpu_profile_validates_over_params_yaml(profile):
    assert (profile.data.dataset, profile.data.root) == ("cifar10", "data/cifar10")
    assert profile.data.native_shape() == (32, 3)
    assert (profile.train.accelerator, profile.train.precision, profile.train.compile) == ("gpu", "bf16-mixed", True)
    assert profile.train.batch_size == 512
    assert (profile.sample.accelerator, profile.sample.precision) == ("gpu", "bf16-mixed")
    assert profile.sample.compile == "reduce-overhead"
    assert profile.sample.n % profile.sample.batch_size == 0  # chunks of one shape: one CUDA graph for all


def test_the_profile_net_is_the_ddpm_cifar10_net(cifar_net):
    net = UNet(cifar_net[0])
    assert sum(p.numel() for p in net.parameters()) == CIFAR10_NET_PARAMETERS
    assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_the_profile_net_compiles_and_takes_a_training_and_a_sampling_step(profile, cifar_net):
    """The CIFAR-10 net traced by TorchDynamo and AOTAutograd (``aot_eager``: forward and backward graphs, no code
    generation) takes an optimizer step and a sampling step in the profile's precision, on two images."""
    net_cfg, diffusion = cifar_net
    torch.manual_seed(0)
    module = DiffusionModule(UNet(net_cfg), diffusion, profile.train)
    sampling = copy.deepcopy(module.net)
    compile_in_place(module.net, "aot_eager")
    optimizer = adamw(list(module.net.parameters()), module.optim)
    before = module.net.conv_out.weight.detach().clone()  # zero-initialised: the only weight a first step moves
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.model_step(torch.rand(2, 3, 32, 32) * 2 - 1).mean()
    loss.backward()
    assert all(p.grad is not None for p in module.net.parameters())  # the backward graph reaches every weight
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(module.net.conv_out.weight, before)
    compile_in_place(sampling, "aot_eager")
    with generate.autocast(profile.sample.precision, torch.device("cpu")):
        images = generate.sample(sampling, generate.plan(diffusion, "ddim", 1), 2)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.slow
def test_a_smoke_of_the_profile_trains_through_the_train_stage_code(profile, tmp_path):
    """The profile's model, diffusion and train sections (on the CPU, 3 steps of 2 images, traced with ``eager``)
    through :func:`ddpm.fit.train`: the metrics carry the compile seconds, and so does the logger."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = np.zeros(6, np.int64)
    train_set, val_set = data.ImageSet(images[:4], labels[:4], ["x"]), data.ImageSet(images[4:], labels[4:], ["x"])
    run = {"accelerator": "cpu", "batch_size": 2, "max_steps": 3, "warmup_steps": 1, "val_every": 3, "log_every": 1}
    cfg = TrainConfig.from_dict({**profile.train.to_dict(), **run, "checkpoint_every": None, "compile": "eager"})
    logger = CSVLogger(tmp_path / "logs", name="", version="")
    metrics = fit.train(
        train_set, val_set, profile.model, profile.diffusion, cfg, tmp_path, progress=False, logger=logger, resume=False
    )
    assert metrics["steps"] == 3 and np.isfinite(metrics["val_loss_ema"])
    assert metrics["compile_seconds"] >= 0
    logged = (tmp_path / "logs" / "metrics.csv").read_text()
    assert "train/compile_seconds" in logged.splitlines()[0]
    model = export.load_model(tmp_path / "model.pt")
    assert sum(p.numel() for p in model.net.parameters()) == CIFAR10_NET_PARAMETERS


# ---------------------------------------------------------------- fused AdamW


def test_adamw_is_fused_only_where_the_net_is_on_cuda(tiny_net_kwargs):
    net = UNet(UNetConfig(**tiny_net_kwargs))
    assert not adamw(list(net.parameters()), OptimConfig()).param_groups[0]["fused"]
    if torch.cuda.is_available():
        net.cuda()
        assert adamw(list(net.parameters()), OptimConfig()).param_groups[0]["fused"] is True


def test_a_fused_adamw_checkpoint_loads_into_ours_and_goes_on_alike(tiny_net_kwargs):
    """torch's fused AdamW (on the CPU here, as on a GPU) keeps the state entries of the default one; its state
    loads into :func:`adamw`'s optimizer, which then steps as the fused one does."""
    torch.manual_seed(0)
    a = UNet(UNetConfig(**tiny_net_kwargs))
    b = copy.deepcopy(a)
    o = OptimConfig(lr=1e-3)
    fused = torch.optim.AdamW(a.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, fused=True)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([3, 50, 200, 900])

    def step(net, optimizer) -> None:
        optimizer.zero_grad()
        net(x, t).square().mean().backward()
        optimizer.step()

    for _ in range(2):
        step(a, fused)
    b.load_state_dict(a.state_dict())
    ours = adamw(list(b.parameters()), o)
    state = fused.state_dict()
    plain = ours.state_dict()
    assert state["state"].keys() <= set(range(len(plain["param_groups"][0]["params"])))
    assert {k for s in state["state"].values() for k in s} == {"step", "exp_avg", "exp_avg_sq"}
    assert state["param_groups"][0].keys() == plain["param_groups"][0].keys()
    ours.load_state_dict(state)
    step(a, fused)
    step(b, ours)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p)


# ---------------------------------------------------------------- compile settings, cache and devices


def test_inductor_caches_in_the_users_cache_folder_unless_chosen(tiny_net_kwargs, tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ours = tmp_path / "ddpm-pipeline" / "inductor"
    monkeypatch.delenv(INDUCTOR_CACHE, raising=False)
    assert inductor_cache() == ours
    monkeypatch.setenv(INDUCTOR_CACHE, default_cache_dir())  # what importing torch._inductor.config writes
    net = compile_in_place(UNet(UNetConfig(**tiny_net_kwargs)), "reduce-overhead")  # compiled at its first call
    assert net._compiled_call_impl is not None
    assert os.environ[INDUCTOR_CACHE] == str(ours)
    monkeypatch.setenv(INDUCTOR_CACHE, str(tmp_path / "mine"))
    compile_in_place(UNet(UNetConfig(**tiny_net_kwargs)), True)
    assert inductor_cache() == tmp_path / "mine" and os.environ[INDUCTOR_CACHE] == str(tmp_path / "mine")


def test_the_accelerator_of_the_drawing_stages():
    assert device("cpu", "sample.accelerator") == torch.device("cpu")
    if torch.cuda.is_available():
        assert device("gpu", "sample.accelerator").type == device("auto", "sample.accelerator").type == "cuda"
    else:
        assert device("auto", "sample.accelerator") == torch.device("cpu")
        with pytest.raises(ConfigError, match=r"^sample.accelerator='gpu': torch sees no CUDA GPU.*auto or cpu$"):
            device("gpu", "sample.accelerator")


# ---------------------------------------------------------------- the flows' profile


def project_with(tmp_path: Path, files: dict[str, str]) -> Path:
    """A folder the flows accept as a DVC project (dvc.yaml, the real params.yaml) with ``files`` in it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_profile_goes_under_the_flow_overrides():
    overrides = {"train.max_steps": 10, "sample.n": 100}
    given = {"project": str(ROOT), "profile": PROFILE}
    opts = flows.options(flows.RetrainOptions, "retrain", {**given, "overrides": overrides})
    assert opts.points() == [{**dotted.read(ROOT / PROFILE), **overrides}]
    point = flows.options(flows.PointOptions, "sweep_point", {**given, "overrides": {}})
    assert point.points() == [dotted.read(ROOT / PROFILE)]


@pytest.mark.parametrize(
    ("profile", "text", "message"),
    [
        ("configs/nope.yaml", None, "no such file in the project "),
        ("../gpu.yaml", None, "outside the project "),
        ("configs/bad.yaml", "lr: 0.1\n", "keys must look like section.key, got ['lr']"),
        ("configs/bad.yaml", "train.lr: [\n", "not valid YAML"),
        ("configs/bad.yaml", "train.lr: -1\n", "train.lr=-1: Input should be greater than 0"),
    ],
)
def test_a_bad_profile_fails_in_one_line_naming_it(tmp_path, profile, text, message):
    project = project_with(tmp_path / "project", {} if text is None else {profile: text})
    (tmp_path / "gpu.yaml").write_text((ROOT / PROFILE).read_text())  # beside the project, not in it
    with pytest.raises(ConfigError) as e:
        flows.options(flows.RetrainOptions, "retrain", {"project": str(project), "profile": profile})
    assert str(e.value).startswith(f"retrain.profile={profile!r}: {message}") and "\n" not in str(e.value)


def test_deploy_checks_the_deployments_parameters(tmp_path):
    deployments.check_parameters(ROOT, ROOT / "prefect.yaml")
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert doc["deployments"][0]["parameters"]["profile"] == PROFILE
    doc["deployments"][0]["parameters"]["profile"] = "configs/gpu.yml"
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(doc))
    expected = r"^prefect.yaml deployment 'nightly-retrain': retrain.profile='configs/gpu.yml': no such file"
    with pytest.raises(ConfigError, match=expected):
        deployments.check_parameters(ROOT, tmp_path / "prefect.yaml")


# ---------------------------------------------------------------- the GPU benchmark


def test_the_gpu_benchmark_resolves_the_profile_without_running(capsys):
    gpu_profile.main(["--dry-run"])
    out = capsys.readouterr().out
    assert "channels=128, channel_mult=[1, 2, 2, 2]" in out and "block_out_channels=(128, 256, 256, 256)" in out
    assert "batch 512, precision bf16-mixed, compile True" in out and "compile 'reduce-overhead'" in out


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_harness_on_a_tiny_net(tmp_path):
    out = tmp_path / "profile.md"
    command = [sys.executable, "-m", "benchmarks.gpu_profile", "--quick", "--reps", "1", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    targets = text.split("## Targets", 1)[1].split("\n## ", 1)[0]
    assert "x diffusers eager (goal 2.0x: " in targets and "x diffusers eager (goal 3.0x: " in targets
    assert "of the bf16 matmul limit (goal 30%: " in targets and "Compile seconds" in targets
    rows = [line for line in text.split("## Rows", 1)[1].split("\n## ", 1)[0].splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1:3] for r in rows] == [[" train ", " ours "], [" train ", " diffusers "],
                                                 [" sample ", " ours "], [" sample ", " diffusers "]]  # fmt: skip
