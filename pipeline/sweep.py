"""Stage ``sweep``: FID against NFE for one sampler run (``RUN`` = sampler-steps); ``sweep_report`` tabulates them.

A class-conditional model is drawn with the sample section's ``labels`` and ``guidance``, as the sample stage.
"""

import argparse
import time

import numpy as np
import torch

from ddpm import data, export, generate, io, tracking
from ddpm.config import SweepConfig
from ddpm.runtime import device
from pipeline import params, paths, scoring
from pipeline import tracking as stage_tracking


def draw(model: export.Model, plan: generate.Plan, cfg: SweepConfig, labels: np.ndarray | None) -> tuple:
    """``cfg.n`` uint8 images drawn by ``plan`` from the noise of ``cfg.seed`` (of ``labels``), and the seconds."""
    started = time.perf_counter()
    chunks = generate.sample_batches(
        model.net,
        plan,
        cfg.n,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        labels=None if labels is None else torch.from_numpy(labels),
    )
    fake = np.concatenate([data.from_tensor(chunk) for chunk in chunks])
    return fake, time.perf_counter() - started


def run_one(p: params.Params, run: str) -> None:
    if run not in p.sweep.runs:
        raise ValueError(f"run {run!r} is not in sweep.runs {p.sweep.runs}")
    sampler, steps = p.sweep.parse(run)
    where = device(p.sample.accelerator, "sample.accelerator")
    run_log = stage_tracking.reopen(p)
    model = export.load_model(paths.MODEL)
    model.net.to(where)
    plan = generate.plan(model.config, sampler, steps, guidance=p.sample.guidance)
    labels = p.sample.label_array(p.sweep.n, model.net.config.num_classes)  # the sample stage's classes
    labels = None if labels is None else np.asarray(labels, dtype=np.int64)
    fake, seconds = draw(model, plan, p.sweep, labels)
    result = scoring.score(fake, p.evaluate, labels=labels)
    timing = {"sampler": sampler, "steps": steps, "nfe": plan.nfe, "seconds": round(seconds, 2)}
    io.write_json(paths.SWEEP / f"{run}.json", {**result, **timing})
    if run_log is not None:
        names = [k for k in ("fid", "kid", "label_accuracy") if k in result]
        scores = {tracking.metric_key(f"sweep/{k}", sampler, steps): result[k] for k in names}
        run_log.log_metrics(scores, step=plan.nfe)
    print(f"sweep {run}: FID {result['fid']:.3f} at {plan.nfe} NFE")


def main(args: argparse.Namespace) -> None:
    run_one(params.load(args.params), args.run)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", help="sampler-steps, one of sweep.runs")
    parser.add_argument("--params", default=str(params.PARAMS))
    params.run_stage(main, parser)
