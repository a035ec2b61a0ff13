"""Stage ``sample``: draw ``sample.n`` images from the EMA model (``make sample`` redraws with overrides).

``--model`` takes a local ``model.pt`` or an MLflow URI: ``champion`` (the registry's champion of
``tracking.registered_model``), ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or ``runs:/<run id>``.
As the DVC stage (``--track``) it logs the sampling time, NFE and the grid into the pipeline's MLflow run.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from ddpm import io, sampling, tracking, training
from pipeline import params
from pipeline import tracking as stage_tracking


def resolve_model(model: str, p: params.Params, tmp: str) -> Path:
    """A local model.pt for a path, ``champion`` or an MLflow ``models:/`` / ``runs:/`` URI."""
    name = tracking.model_name(p.tracking, p.data.dataset)
    if model == "champion":
        model = f"models:/{name}@{tracking.CHAMPION}"
    if model.startswith(("models:/", "runs:/")):
        path = tracking.download_model(model, tracking.resolve_uri(p.tracking), tmp)
        print(f"sample: model {model} -> {path}")
        return path
    return Path(model)


def main(args: argparse.Namespace) -> None:
    names = ("sampler", "steps", "eta", "n", "seed", "batch_size", "precision")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    p = params.load(args.params, sample_overrides=overrides)
    cfg = p.sample
    run = stage_tracking.reopen(p) if args.track else None
    with tempfile.TemporaryDirectory() as tmp:
        module = training.load_model(resolve_model(args.model, p, tmp))
    module.config.sampler_fn(cfg.sampler, cfg.steps, cfg.eta)  # the model's config accepts these settings
    meta = sampling.draw(module, cfg, args.out, progress=sys.stderr.isatty() and not args.quiet)
    io.write_json(Path(args.out) / "meta.json", meta)
    if run is not None:
        key = f"{meta['sampler']}_{meta['steps']}"
        run.log_metrics(
            {
                f"sample/seconds/{key}": meta["seconds"],
                f"sample/nfe/{key}": meta["nfe"],
                f"sample/images_per_second/{key}": meta["n"] / max(meta["seconds"], 1e-9),
            }
        )
        run.log_new_params(tracking.flatten({"sample": cfg.to_dict()}))
        run.log_artifacts([Path(args.out) / "grid.png", Path(args.out) / "trajectory.png"], f"samples/{key}")
    print(
        f"sample: {meta['n']} images, {meta['sampler']}, {meta['nfe']} NFE, {meta['precision']},"
        f" {meta['seconds']} s -> {args.out}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(params.PARAMS))
    parser.add_argument(
        "--model",
        default=str(params.OUT / "train" / "model.pt"),
        help="exported EMA model: a model.pt path, champion, models:/<name>@<alias>, models:/<name>/<v>, runs:/<id>",
    )
    parser.add_argument("--out", default=str(params.OUT / "samples"), help="output folder")
    parser.add_argument("--sampler", help="override sample.sampler")
    parser.add_argument("--steps", type=int, help="override sample.steps")
    parser.add_argument("--eta", type=float, help="override sample.eta")
    parser.add_argument("--n", type=int, help="override sample.n")
    parser.add_argument("--seed", type=int, help="override sample.seed")
    parser.add_argument("--batch-size", type=int, help="override sample.batch_size")
    parser.add_argument("--precision", help="override sample.precision (32-true | bf16-mixed)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--track", action="store_true", help="log into the pipeline's MLflow run (the DVC stage)")
    params.run_stage(main, parser)
