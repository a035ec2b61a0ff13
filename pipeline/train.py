"""Stage ``train``: fit the diffusion model; write the resumable checkpoint, the EMA model and the curves.

With tracking on, the stage opens the pipeline execution's MLflow run (params, source tags, the data splits
as dataset inputs), streams Lightning's metrics into it, logs the EMA model as the run's Logged model,
uploads the checkpoint, the curves and the loss plot, and records the run in ``outputs/train/run.json`` for
the later stages.

With ``train.num_nodes`` > 1 the stage runs under ``torchrun`` (static rendezvous), one process per device on
each node: started by DVC (``dvc repro``) or by hand it execs ``torchrun --nnodes N --node-rank R ...`` on
itself, with the node's rank and the rendezvous address from ``DDPM_NODE_RANK``, ``DDPM_MASTER_ADDR`` and
``DDPM_MASTER_PORT`` (``make train-node``). Node 0 writes the outputs; the other nodes only train.
"""

import argparse
import dataclasses
import os
import signal
import sys
import tempfile
from pathlib import Path

from pytorch_lightning.utilities import rank_zero_only

from ddpm import checkpoints, data, fit, io, tracking
from ddpm.config import ConfigError
from ddpm.logger import BufferedMLFlowLogger
from pipeline import params, paths
from pipeline import tracking as stage_tracking

TRACKED_SECTIONS = ("data", "featurizer", "model", "diffusion", "train", "sample", "evaluate")
ENTRY_POINT = "pipeline.train"  # the run's source in MLflow


def open_run(
    p: params.Params, raw: dict, splits: dict[str, data.ImageSet], resume: checkpoints.Resume | None
) -> tuple[dict, BufferedMLFlowLogger | None]:
    """(run.json record, logger or None); fails before training if the server is unreachable or refuses us.

    A training that resumes an interrupted one continues the interrupted run (same run id, metrics from the
    resumed step on) instead of forking a new run.
    """
    if not p.tracking.enabled or rank_zero_only.rank != 0:
        return stage_tracking.OFF, None
    record = continued_run(p, resume)
    if record is None:
        hashes = {name: data.content_hash(split) for name, split in splits.items()}
        tags = tracking.run_tags(p.data.dataset, hashes["train"], ENTRY_POINT)
        inputs = stage_tracking.dataset_inputs(p.data.dataset, splits, hashes)
        record = tracking.start_run(p.tracking, stage_tracking.sections(raw, TRACKED_SECTIONS), tags, datasets=inputs)
    logger = BufferedMLFlowLogger(tracking_uri=record["tracking_uri"], run_id=record["run_id"])
    return record, logger


def continued_run(p: params.Params, resume: checkpoints.Resume | None) -> dict | None:
    """The interrupted run's record when this training resumes it (its checkpoint names the run), else None."""
    if resume is None or resume.logger_version is None:
        return None
    uri = tracking.resolve_uri(p.tracking)
    record = {"enabled": True, "tracking_uri": uri, "run_id": resume.logger_version}
    run = tracking.Run(record)  # checks the server and that it still knows the run
    experiment_id = run.client.get_run(run.run_id).info.experiment_id
    run.client.update_run(run.run_id, status="RUNNING")
    run.set_tags({"resumed_from_step": str(resume.step)})
    print(f"tracking: continuing run {run.run_id} from step {resume.step}")
    return {**record, "experiment_id": experiment_id, "run_url": tracking.run_url(uri, experiment_id, run.run_id)}


def upload(record: dict, p: params.Params, out: Path, metrics: dict, params_file: str) -> str:
    """Final metrics; the EMA model as the run's Logged model (the registry's source), linked to the final
    metrics; the checkpoint, curves and loss plot as artifacts. Returns the Logged model's id."""
    run = tracking.Run(record)
    step = int(metrics["steps"])
    run.log_metrics({f"final/{k}": v for k, v in metrics.items()}, step=step)
    model_id = run.log_model(out / "model.pt", step=step)
    if p.tracking.log_checkpoint:
        run.log_artifacts([out / "last.ckpt"], "checkpoints")
    with tempfile.TemporaryDirectory() as tmp:
        plot = Path(tmp) / "loss.png"
        tracking.loss_plot(out / "curves.csv", plot)
        run.log_artifacts([plot, out / "curves.csv"], "plots")
    run.log_artifacts([params_file], "config")
    run.client.set_terminated(run.run_id, "FINISHED")
    return model_id


def interrupt_as_preemption() -> None:
    """Ctrl-C, or the SIGINT of an orchestrator's timeout, stops training like a preemption (SIGTERM): the
    resume checkpoint is written at the current step and the stage exits with status 143."""
    signal.signal(signal.SIGINT, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))


def torchrun_command(p: params.Params, params_file: str, env: dict[str, str]) -> list[str]:
    """The ``torchrun`` command that runs this stage as one node of ``train.num_nodes`` (static rendezvous)."""

    def setting(name: str, default: str, valid, allowed: str) -> str:
        value = env.get(name, default)
        if not valid(value):
            raise ConfigError(f"{name}={value!r}: expected {allowed}")
        return value

    nodes = p.train.num_nodes
    rank = setting("DDPM_NODE_RANK", "0", lambda v: v.isdigit() and int(v) < nodes, f"a node rank in [0, {nodes})")
    port = setting("DDPM_MASTER_PORT", "29500", lambda v: v.isdigit() and 0 < int(v) < 65536, "a TCP port")
    addr = setting("DDPM_MASTER_ADDR", "127.0.0.1", bool, "node 0's host name or address")
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nodes}", f"--node-rank={rank}", f"--nproc-per-node={p.train.devices}",
        f"--master-addr={addr}", f"--master-port={port}",
        "-m", ENTRY_POINT, "--params", params_file,
    ]  # fmt: skip


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def main(args: argparse.Namespace) -> None:
    raw = params.read_yaml(args.params)
    p = params.validate(raw)
    if p.train.num_nodes > 1 and not under_torchrun():
        command = torchrun_command(p, args.params, dict(os.environ))
        print("train: $ " + " ".join(command[1:]), flush=True)
        os.execv(command[0], command)  # torchrun forwards SIGTERM/SIGINT to this node's processes
    interrupt_as_preemption()
    if p.train.precision == "auto":
        p = dataclasses.replace(p, train=fit.resolve_precision(p.train))
        raw = {**raw, "train": {**(raw.get("train") or {}), "precision": p.train.precision}}  # tracked as run
        print(f"train: precision auto -> {p.train.precision}", flush=True)
    train_set, test_set = paths.load_splits()
    model = params.resolved_model(p.model, len(train_set.classes))
    resume = fit.resume_checkpoint(paths.TRAIN, train_set, test_set, model, p.diffusion, p.train)
    record, logger = open_run(p, raw, {"train": train_set, "test": test_set}, resume)
    metrics = fit.train(
        train_set,
        test_set,
        model,
        p.diffusion,
        p.train,
        paths.TRAIN,
        logger=logger,
        keep_resume=True,  # removed below, once train.json and run.json are written
    )
    if rank_zero_only.rank == 0:
        if record["enabled"]:
            logger.flush(p.tracking.wait_seconds)  # metrics buffered during a server outage
            record = {**record, "model_id": upload(record, p, paths.TRAIN, metrics, args.params)}
            print(f"tracking: {record['run_url']}")
        io.write_json(paths.metrics_file("train"), metrics)
        io.write_json(paths.RUN_RECORD, record)  # after training: a killed stage leaves the old one
        paths.EMA_SNAPSHOTS.mkdir(exist_ok=True)  # a DVC out, empty without train.ema_snapshot_stds
        (paths.TRAIN / checkpoints.RESUME).unlink(missing_ok=True)
    print(f"train: {metrics}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(params.PARAMS))
    params.run_stage(main, parser)
