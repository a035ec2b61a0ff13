"""Multi-node training: the train stage as two ``torchrun`` nodes on 127.0.0.1 (gloo, one process and one thread
each), each in its own workspace as on two machines.

Two nodes of one process each must train the same model as one node of two processes (Lightning's own DDP
launcher) with the same seed and global batch. With two ranks the gradient all-reduce is one addition, and
floating-point addition is commutative, so the reduction order cannot change a bit: the weights must be equal,
not merely close. A node that dies or hangs ends the other within ``train.ddp_timeout`` with one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from pipeline import overrides as dotted
from pipeline import params, train
from pipeline.stack import free_port

from ddpm.config import ConfigError
from test_pipeline import clone_project, stage_env

MULTI_NODE = {"train.num_nodes": 2, "train.devices": 1, "train.strategy": "ddp", "train.accelerator": "cpu"}
SMALL = {"tracking.enabled": False, "train.max_steps": 30, "train.precision": "32-true"}


def workspace(smoke_repro, dest: Path, settings: dict) -> Path:
    """A copy of the smoke project (its prepared data) with ``settings`` in params.yaml and no train outputs."""
    project = clone_project(smoke_repro[0], dest)
    raw = params.read_yaml(project / "params.yaml")
    (project / "params.yaml").write_text(yaml.safe_dump(dotted.merge(raw, settings), sort_keys=False))
    for name in ("last.ckpt", "model.pt", "resume.ckpt", "curves.csv", "run.json"):
        (project / "outputs" / "train" / name).unlink(missing_ok=True)
    return project


def start_node(project: Path, rank: int, port: int, log: Path) -> subprocess.Popen:
    """``make train-node NODE_RANK=rank MASTER_ADDR=127.0.0.1 MASTER_PORT=port`` (the stage execs torchrun)."""
    env = stage_env(DDPM_NODE_RANK=str(rank), DDPM_MASTER_ADDR="127.0.0.1", DDPM_MASTER_PORT=str(port),
                    OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.train"], cwd=project, env=env,
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_two_nodes_train_what_one_node_with_two_processes_trains(smoke_repro, tmp_path):
    nodes = [workspace(smoke_repro, tmp_path / f"node{r}", {**SMALL, **MULTI_NODE}) for r in (0, 1)]
    port = free_port()
    procs = [start_node(node, r, port, tmp_path / f"node{r}.log") for r, node in enumerate(nodes)]
    codes = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f"node{r}.log").read_text() for r in (0, 1)]
    assert codes == [0, 0], logs
    for r, log in enumerate(logs):
        assert f"--nnodes=2 --node-rank={r} --nproc-per-node=1" in log
        assert f"GLOBAL_RANK: {r}, MEMBER: {r + 1}/2" in log
    assert not (nodes[1] / "outputs" / "train" / "model.pt").exists()  # node 0 writes the outputs

    one_node = workspace(
        smoke_repro, tmp_path / "one", {**SMALL, **MULTI_NODE, "train.num_nodes": 1, "train.devices": 2}
    )
    env = stage_env(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    result = subprocess.run([sys.executable, "-m", "pipeline.train"], cwd=one_node, env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.distributed.run" not in result.stdout  # Lightning launched the second process itself

    two, one = state(nodes[0] / "outputs/train/model.pt"), state(one_node / "outputs/train/model.pt")
    assert two.keys() == one.keys()
    differ = [k for k in two if not torch.equal(two[k], one[k])]
    assert not differ, differ
    # ... and they trained: the EMA moved away from a run of fewer steps
    assert any(not torch.equal(two[k], state(smoke_repro[0] / "outputs/train/model.pt")[k]) for k in two)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_dead_node_ends_the_other_with_one_line(smoke_repro, tmp_path, fault):
    settings = {**SMALL, **MULTI_NODE, "train.max_steps": 100_000, "train.ddp_timeout": 10}
    nodes = [workspace(smoke_repro, tmp_path / f"node{r}", settings) for r in (0, 1)]
    port = free_port()
    procs = [start_node(node, r, port, tmp_path / f"node{r}.log") for r, node in enumerate(nodes)]
    resume = nodes[0] / "outputs" / "train" / "resume.ckpt"
    try:
        for _ in range(1200):  # until node 0 has written a resume checkpoint (smoke: every 20 steps)
            if resume.exists() or procs[0].poll() is not None:
                break
            time.sleep(0.1)
        assert resume.exists(), (tmp_path / "node0.log").read_text()
        node1 = psutil.Process(procs[1].pid)
        for p in [node1, *node1.children(recursive=True)]:  # the whole machine: torchrun and its worker
            p.send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        # torch's default DDP timeout is 30 min: without train.ddp_timeout a hung node would exceed this wait
        code = procs[0].wait(timeout=240)
    finally:
        for p in procs:
            try:
                node = psutil.Process(p.pid)
                for q in [node, *node.children(recursive=True)]:
                    q.kill()
            except psutil.NoSuchProcess:
                pass
    log = (tmp_path / "node0.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert code != 0
    assert len(errors) == 1, log[-3000:]
    assert "rank 0 lost a DDP peer at step" in errors[0]
    assert "train.ddp_timeout=10 s" in errors[0] and "start every node again to resume" in errors[0]
    assert ("Timed out" in errors[0]) == (fault == "hung"), errors[0]
    assert resume.exists()  # kept: the nodes resume from it
    assert not (nodes[0] / "outputs" / "train" / "model.pt").exists()


def test_node_settings_fail_in_one_line(smoke_params):
    raw = dotted.merge(yaml.safe_load(smoke_params), MULTI_NODE)
    p = params.validate(raw)
    command = train.torchrun_command(p, "params.yaml", {"DDPM_NODE_RANK": "1", "DDPM_MASTER_ADDR": "gpu-0"})
    assert command[1:4] == ["-m", "torch.distributed.run", "--nnodes=2"]
    assert "--node-rank=1" in command and "--master-addr=gpu-0" in command and "--master-port=29500" in command
    for env, key in (({"DDPM_NODE_RANK": "2"}, "DDPM_NODE_RANK='2'"), ({"DDPM_MASTER_PORT": "0"}, "DDPM_MASTER_PORT")):
        with pytest.raises(ConfigError, match=key):
            train.torchrun_command(p, "params.yaml", env)
    for bad, allowed in (
        ({"train.strategy": "fsdp"}, "needs strategy ddp"),
        ({"train.devices": "auto"}, "needs devices as a count"),
    ):
        with pytest.raises(ConfigError, match=f"train: num_nodes=2 {allowed}"):
            params.validate(dotted.merge(raw, bad))
    assert os.environ.get("TORCHELASTIC_RUN_ID") is None and not train.under_torchrun()
