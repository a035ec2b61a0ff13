"""The native kernels' build, the switch and the settings that choose them (``ddpm.kernels``); each kernel against
PyTorch's ops in test_kernels_group_norm.py, test_kernels_attention.py and test_kernels_winograd.py, the
convolution layers' fast paths in test_kernels_conv.py."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_native
from ddpm import kernels
from ddpm.nets import UNet, group_norm
from kernel_inputs import CL, inputs


@needs_native
def test_the_kernel_builds_on_this_machine():
    ext = kernels.extension()
    assert ext is not None, kernels.build._error
    assert ext.vector_isa in ("avx512", "avx2", "portable")
    assert kernels.applies(torch.randn(2, 8, 3, 3).contiguous(memory_format=CL))


def _cpu_flags() -> set[str]:
    """The CPU's flags as Linux lists them (the kernels are built on Linux only)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@needs_native
def test_the_kernels_take_the_widest_vector_path_of_this_cpu_and_run_by_default_where_they_measured_faster(
    monkeypatch,
):
    """Built with -march=native, the kernels name the path the CPU's flags allow. Unset, DDPM_NATIVE_KERNELS runs
    all three on the AVX-512 path, GroupNorm and Winograd on the AVX2 path (not the attention, slower there than
    PyTorch's), none on the portable one; 1 runs them all, 0 none."""
    ext = kernels.extension()
    assert ext is not None, kernels.build._error
    flags = _cpu_flags()
    if platform.machine() in ("x86_64", "AMD64") and {"avx512f", "avx512bw", "avx512vl"} <= flags:
        expected = "avx512"
    elif platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= flags:
        expected = "avx2"
    else:
        expected = "portable"
    assert ext.vector_isa == expected, flags
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.enabled() == (expected != "portable")
    on = {k for k in kernels.build.KERNELS if kernels.enabled(k)}
    assert on == {"avx512": {"group_norm", "attention", "winograd"}, "avx2": {"group_norm", "winograd"}}.get(
        expected, set()
    )
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=CL)
    assert kernels.applies(x) == kernels.ops.conv3x3_applies(x, torch.randn(16, 16, 3, 3)) == (expected != "portable")
    summary = kernels.build.summary()
    assert summary.startswith(f"native kernels: {expected} vector path (")
    assert ("PyTorch's ops run for: attention" in summary) == (expected == "avx2"), summary
    monkeypatch.setenv(kernels.ENV, "0")
    assert not any(kernels.enabled(k) for k in (None, *kernels.build.KERNELS))
    assert "not used (DDPM_NATIVE_KERNELS=0)" in kernels.build.summary()
    monkeypatch.setenv(kernels.ENV, "1")
    assert all(kernels.enabled(k) for k in (None, *kernels.build.KERNELS))
    with pytest.raises(ValueError, match="unknown native kernel 'conv'; allowed: group_norm, attention, winograd"):
        kernels.enabled("conv")


@needs_native
def test_a_process_with_another_ninja_first_on_path_reuses_the_build(tmp_path):
    """Every process builds with the ``ninja`` package's tool, whatever ``ninja`` comes first on its PATH: ninja
    versions keep their logs in different formats, and one that finds another's log rebuilds from scratch."""
    pytest.importorskip("ninja")
    ext = kernels.extension()
    assert ext is not None, kernels.build._error
    log = Path(ext.__file__).with_name(".ninja_log")
    before = log.read_bytes()
    impostor = tmp_path / "bin" / "ninja"  # a system ninja of another version, as far as the build can tell
    impostor.parent.mkdir()
    impostor.write_text(f"#!/bin/sh\ntouch {tmp_path / 'called'}\nexit 1\n")
    impostor.chmod(0o755)
    env = {**os.environ, "PATH": f"{impostor.parent}{os.pathsep}{os.environ['PATH']}"}
    code = "from ddpm.kernels import build; e = build.extension(); print(e.__file__ if e else build._error)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == ext.__file__, done.stdout + done.stderr
    assert not (tmp_path / "called").exists(), "the ninja first on PATH ran"
    assert log.read_bytes() == before, "nothing was rebuilt"


def test_an_environment_reached_through_a_link_builds_in_its_own_folder(monkeypatch, tmp_path):
    """The build commands name torch's headers by the path this process imports torch from: a ``.venv`` linked
    from another checkout sharing the original's folder made each path's processes rebuild the other's build."""
    monkeypatch.setenv("DDPM_KERNELS_DIR", str(tmp_path / "kernels"))
    real = Path(torch.__file__).resolve().parent
    link = tmp_path / "linked-site-packages"
    link.symlink_to(real.parent, target_is_directory=True)
    here = kernels.build.build_directory("k")
    monkeypatch.setattr(torch, "__file__", str(link / real.name / "__init__.py"))
    linked = kernels.build.build_directory("k")
    assert linked != here and linked.parent.parent == here.parent.parent
    assert kernels.build.build_directory("k") == linked  # the same path keeps its folder


@needs_native
def test_the_net_with_the_kernel_matches_the_net_without_it():
    """The whole U-Net, forward and backward, with the kernel and with PyTorch's GroupNorm and SiLU."""
    torch.manual_seed(0)
    net = UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(14,), norm_groups=4, dropout=0.0)
    for p in net.parameters():  # no zero-initialised layers: every path carries signal
        p.data.add_(torch.randn_like(p) * 0.05)
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([3, 300, 900])
    outs, grads = [], []
    for native in (True, False):
        net.zero_grad()
        # the 3x3 convolutions of 16 and 32 channels run Winograd's kernel
        with kernels.using(native_group_norm=native, native_attention=native, winograd=native):
            out = net(x, t)
            out.square().mean().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert (grads[0] - grads[1]).abs().max() / grads[1].abs().max() < 1e-4


def test_the_switch_and_the_layouts_it_does_not_take(monkeypatch):
    x, weight, bias = inputs((2, 8, 4, 4), torch.float32, 2)
    nchw = x.contiguous()
    assert not kernels.applies(nchw) and not kernels.applies(x.double())
    monkeypatch.setenv(kernels.ENV, "0")
    assert not kernels.applies(x)
    # PyTorch's ops run instead, with the same values
    torch.testing.assert_close(
        kernels.group_norm(nchw, 2, weight, bias, silu=True), F.silu(F.group_norm(nchw, 2, weight, bias))
    )
    norm = group_norm(8, 2, silu=True)
    assert "silu=True" in repr(norm) and set(norm.state_dict()) == {"weight", "bias"}


def test_a_failed_build_warns_once_and_pytorch_runs(monkeypatch, tmp_path):
    """No compiler (here: a builder that fails): one warning naming the cause, then PyTorch's ops, same values."""
    from torch.utils import cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(kernels.build, "_extension", None)
    monkeypatch.setattr(kernels.build, "_error", None)
    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setenv("DDPM_KERNELS_DIR", str(tmp_path))
    x, weight, bias = inputs((2, 8, 4, 4), torch.float32, 2)
    with pytest.warns(RuntimeWarning, match="could not be built.*command not found"):
        assert kernels.extension() is None
    assert not kernels.applies(x)
    out = kernels.group_norm(x, 2, weight, bias, silu=True)
    torch.testing.assert_close(out, F.silu(F.group_norm(x, 2, weight, bias)))


def test_using_sets_the_settings_for_its_block_and_restores_them():
    before = kernels.Settings()
    assert kernels.settings == before  # every path on by default
    with kernels.using(winograd=False, winograd_tile=2) as settings:
        assert settings is kernels.settings and not settings.winograd and settings.winograd_tile == 2
        with pytest.raises(RuntimeError, match="inside"), kernels.using(native_attention=False):
            assert not kernels.settings.native_attention
            raise RuntimeError("inside")
        assert kernels.settings.native_attention
    assert kernels.settings == before
    with pytest.raises(TypeError, match=r"unknown kernel settings \['native'\]; allowed: .*'winograd'"):
        kernels.using(native=False).__enter__()
    assert kernels.settings == before
