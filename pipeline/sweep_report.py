"""Stage ``sweep_report``: tabulate the ``sweep`` runs of ``sweep.runs`` (FID against NFE) and plot them."""

import argparse
import json

from ddpm import io
from pipeline import params, paths
from pipeline import tracking as stage_tracking


def report(p: params.Params) -> None:
    rows = []
    for run in p.sweep.runs:
        r = json.loads((paths.SWEEP / f"{run}.json").read_text())
        rows.append([r["sampler"], r["steps"], r["nfe"], round(r["fid"], 4), round(r["kid"], 6), r["seconds"]])
    rows.sort(key=lambda r: (r[2], r[3]))
    header = ["sampler", "steps", "nfe", "fid", "kid", "seconds"]
    io.write_csv(paths.SWEEP_REPORT / "fid_vs_nfe.csv", header, rows)
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    best = min(rows, key=lambda r: r[3])
    table.append(f"\nBest FID: {best[0]} with {best[1]} steps ({best[2]} NFE): {best[3]}")
    with io.atomic_path(paths.SWEEP_REPORT / "table.md") as tmp:
        tmp.write_text("\n".join(table) + "\n")
    run_log = stage_tracking.reopen(p)
    if run_log is not None:
        run_log.log_artifacts([paths.SWEEP_REPORT / "table.md", paths.SWEEP_REPORT / "fid_vs_nfe.csv"], "sweep")
    print("\n".join(table))


def main(args: argparse.Namespace) -> None:
    report(params.load(args.params))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(params.PARAMS))
    params.run_stage(main, parser)
