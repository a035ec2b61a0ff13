"""Stage ``sweep``: FID against NFE for one sampler run (``RUN`` = sampler-steps), or ``--report`` to tabulate."""

import argparse
import json
import time

import numpy as np

from ddpm import data, io, training
from pipeline import evaluate, params
from pipeline import tracking as stage_tracking

SWEEP = params.OUT / "sweep"
REPORT = params.OUT / "sweep_report"


def run_one(p: params.Params, run: str) -> None:
    if run not in p.sweep.runs:
        raise ValueError(f"run {run!r} is not in sweep.runs {p.sweep.runs}")
    sampler, steps = p.sweep.parse(run)
    run_log = stage_tracking.reopen(p)
    module = training.load_model(params.OUT / "train" / "model.pt")
    cfg = module.config.replace(sampler=sampler, steps=steps)
    started = time.perf_counter()
    chunks = module.sample_batches(
        p.sweep.n, sampler=sampler, steps=steps, seed=p.sweep.seed, batch_size=p.sweep.batch_size
    )
    fake = np.concatenate([data.from_tensor(chunk) for chunk in chunks])
    seconds = time.perf_counter() - started
    result = evaluate.score(fake, p.evaluate)
    timing = {"sampler": sampler, "steps": steps, "nfe": cfg.nfe(), "seconds": round(seconds, 2)}
    io.write_json(SWEEP / f"{run}.json", {**result, **timing})
    if run_log is not None:
        key = f"{sampler}_{steps}"
        run_log.log_metrics({f"sweep/fid/{key}": result["fid"], f"sweep/kid/{key}": result["kid"]}, step=cfg.nfe())
    print(f"sweep {run}: FID {result['fid']:.3f} at {cfg.nfe()} NFE")


def report(p: params.Params) -> None:
    rows = []
    for run in p.sweep.runs:
        r = json.loads((SWEEP / f"{run}.json").read_text())
        rows.append([r["sampler"], r["steps"], r["nfe"], round(r["fid"], 4), round(r["kid"], 6), r["seconds"]])
    rows.sort(key=lambda r: (r[2], r[3]))
    header = ["sampler", "steps", "nfe", "fid", "kid", "seconds"]
    io.write_csv(REPORT / "fid_vs_nfe.csv", header, rows)
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    best = min(rows, key=lambda r: r[3])
    table.append(f"\nBest FID: {best[0]} with {best[1]} steps ({best[2]} NFE): {best[3]}")
    with io.atomic_path(REPORT / "table.md") as tmp:
        tmp.write_text("\n".join(table) + "\n")
    run_log = stage_tracking.reopen(p)
    if run_log is not None:
        run_log.log_artifacts([REPORT / "table.md", REPORT / "fid_vs_nfe.csv"], "sweep")
    print("\n".join(table))


def main(args: argparse.Namespace) -> None:
    p = params.load(args.params)
    if args.report:
        report(p)
    elif args.run:
        run_one(p, args.run)
    else:
        raise ValueError("give a RUN (sampler-steps) or --report")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", nargs="?", help="sampler-steps, one of sweep.runs")
    parser.add_argument("--report", action="store_true", help="tabulate all runs of sweep.runs")
    parser.add_argument("--params", default=str(params.PARAMS))
    params.run_stage(main, parser)
