"""Shared fixtures: a tiny 8x8 U-Net, a deterministic toy image set, and the smoke DVC project.

The plain helpers (``TINY_NET_KWARGS``, ``make_toy_images``) are also imported by the
``tests/ddp_fit.py`` script, which runs outside pytest. The DVC project helpers live in ``test_pipeline.py``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Under pytest-xdist (`make test`) each worker, and every process it starts, takes its share of the cores: two
# workers whose torch each ran a thread per core would oversubscribe them, and OpenMP's threads wait on each other.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, share)))

# OpenMP as every pipeline process runs it, here and in every subprocess: importing `pipeline` sets it
# (pipeline.bound_openmp_spin) before torch loads libgomp below.
import pipeline  # noqa: F401

# the team stack fixture (tests/teamstack.py), shared by test_stack.py and test_team.py
pytest_plugins = ["teamstack"]

# No telemetry from any tool the tests (or their subprocesses) may import.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import ci_skips  # noqa: E402
from ci_skips import (  # noqa: E402, F401 (the CI skip policy, and the kernels' line from xdist workers)
    pytest_runtest_makereport,
    pytest_sessionfinish,
    pytest_terminal_summary,
    pytest_testnodedown,
)

# Tests of the native kernels (ddpm.kernels) run on Linux where a C++ compiler can build them, and fail if the
# build fails. Under CI=true only the platform's skip is allowed (tests/ci_skips.py): CI must have the compiler.
LINUX = sys.platform.startswith("linux")
needs_native = pytest.mark.skipif(
    not LINUX or shutil.which("c++") is None,
    reason="no C++ compiler to build the kernel" if LINUX else ci_skips.NOT_LINUX,
)


@pytest.fixture(autouse=True)
def _kernel_tests_use_the_kernels(request, monkeypatch):
    """The kernel and benchmark tests run the kernels whatever their vector path (``DDPM_NATIVE_KERNELS=1``): by
    default a CPU with neither AVX-512 nor AVX2 runs PyTorch's ops instead of their portable loops
    (``kernels.enabled``)."""
    if request.module.__name__.startswith(("test_kernels", "test_bench")):
        monkeypatch.setenv("DDPM_NATIVE_KERNELS", "1")


needs_procfs = pytest.mark.skipif(not LINUX or not Path("/proc/self/status").exists(), reason=ci_skips.NO_PROCFS)

TINY_NET_KWARGS = {
    "channels": 16,
    "channel_mult": (1, 2),
    "attn_resolutions": (4,),
    "num_heads": 2,
    "norm_groups": 8,
    "dropout": 0.0,
    "image_size": 8,
    "in_channels": 1,
}


def make_toy_images(n: int = 256, seed: int = 0, size: int = 8) -> torch.Tensor:
    """``n`` images [n, 1, size, size] in [-1, 1]: a bar or a square blob on a dark background.

    Pattern k = i % 3 (horizontal bar, vertical bar, 3x3 blob) at a seeded random position,
    plus a little Gaussian noise; the same (n, seed, size) always gives the same tensor.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 1, size, size), -1.0)
    pos = torch.randint(0, size - 2, (n, 2), generator=g)
    for i in range(n):
        r, c = int(pos[i, 0]), int(pos[i, 1])
        kind = i % 3
        if kind == 0:
            x[i, 0, r, :] = 1.0
        elif kind == 1:
            x[i, 0, :, c] = 1.0
        else:
            x[i, 0, r : r + 3, c : c + 3] = 1.0
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    return x.clamp(-1.0, 1.0)


@pytest.fixture(scope="session")
def tiny_net_kwargs() -> dict:
    """Keyword arguments of a tiny 8x8 one-channel UNet (shared: extend with ``{**kwargs, ...}``)."""
    return dict(TINY_NET_KWARGS)


@pytest.fixture(scope="session")
def toy_images() -> torch.Tensor:
    """256 deterministic 8x8 toy images in [-1, 1] (do not modify in place)."""
    return make_toy_images(256, seed=0)


@pytest.fixture(scope="session")
def toy_image_sets(toy_images):
    """The toy images as uint8 ImageSets [N, H, W, 1]: (192 training, 64 validation images), one class."""
    from ddpm import data

    images = ((toy_images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    labels = np.zeros(len(images), np.int64)
    return data.ImageSet(images[:192], labels[:192], ["toy"]), data.ImageSet(images[192:], labels[192:], ["toy"])


@pytest.fixture(scope="session")
def smoke_params(tmp_path_factory) -> str:
    """The project's params.yaml with configs/smoke.yaml applied by ``python -m pipeline.overrides --apply``."""
    from test_pipeline import ROOT, run

    params_file = tmp_path_factory.mktemp("smoke_params") / "params.yaml"
    shutil.copy2(ROOT / "params.yaml", params_file)
    run([sys.executable, "-m", "pipeline.overrides", "configs/smoke.yaml", "--apply", str(params_file)], ROOT)
    return params_file.read_text()


def once_per_run(tmp_path_factory, name: str, build):
    """``build(folder)``'s JSON-able result, built in ``folder`` once per pytest run: under pytest-xdist the first
    worker to ask builds it (the others wait on a lock) in the run's temp root, which all workers share."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return build(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent
    done = root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            folder = root / name
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed building it left it
            folder.mkdir()
            done.write_text(json.dumps(build(folder)))
        return json.loads(done.read_text())


@pytest.fixture(scope="session")
def smoke_repro(smoke_params, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A temp git repo copy of the project on the smoke configuration after one real ``dvc repro`` (every
    stage ran), and that repro's result; one per test run, shared by the test files and the xdist workers: never
    modify it, work on a ``test_pipeline.clone_project`` copy (its outputs, dvc.lock and DVC cache, without the
    MLflow store; the copies are never made from that store, which a copy's sample and evaluate stages may log
    into).
    """
    from test_pipeline import copy_project, run

    def build(folder: Path) -> dict:
        project = copy_project(folder, smoke_params)
        result = run(["dvc", "repro"], project)
        return {"project": str(project), "stdout": result.stdout, "stderr": result.stderr}

    built = once_per_run(tmp_path_factory, "smoke", build)
    return Path(built["project"]), subprocess.CompletedProcess(["dvc", "repro"], 0, built["stdout"], built["stderr"])


@pytest.fixture(scope="module")
def restore_threads():
    """Restore torch's intra-op thread count after a module whose runs set one thread (``fault_train.run``)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """train.npz (360) and test.npz (40) of scikit-learn's 8x8 digits (``fault_train.save_digits``)."""
    import fault_train

    return fault_train.save_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server for the session (prefect_test_harness), shared by the flow and deployment tests."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-storage")  # failed runs' exceptions, not ~/.prefect/storage
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}), prefect_test_harness(server_startup_timeout=120):
        yield


# `make test` runs the suite on two pytest-xdist workers (most of a serial run's time is spent waiting on servers
# and subprocesses, with one core idle). Each test file is one unit of work, so a module's fixtures are built
# once; the files of the team stack (one PostgreSQL, object store, MLflow and Prefect for the session) are one
# unit. The units go out heaviest first, with a light one third: it is the team unit's worker's second unit,
# which waits until the team files are done.
TEAM_FILES = {"test_stack", "test_team", "test_workers"}
FIRST_UNITS = ["team", "test_tracking", "test_io", "test_bench", "test_flows", "test_nodes", "test_pipeline",
               "test_conditional", "test_readme", "test_registry", "test_tracking_auth"]  # fmt: skip


def _unit(nodeid: str) -> str:
    name = Path(nodeid.split("::", 1)[0]).stem
    return "team" if name in TEAM_FILES else name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' collection order is the order the units go out in
        rank = {unit: i for i, unit in enumerate(FIRST_UNITS)}
        items.sort(key=lambda item: rank.get(_unit(item.nodeid), len(FIRST_UNITS)))  # stable: files keep order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadscope`` (``make test``) with this suite's units as its scopes, in the workers' order."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    config.option.loadscopereorder = False  # not by size: FIRST_UNITS orders them
    return Units(config, log)
