"""Stage ``sample``: draw ``sample.n`` images from the EMA model (``make sample`` redraws with overrides).

``--model`` takes a local ``model.pt`` or an MLflow URI: ``champion`` (the registry's champion of
``tracking.registered_model``), ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or ``runs:/<run id>``.
As the DVC stage (``--track``) it logs the sampling time, NFE and the grid into the pipeline's MLflow run.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ddpm import data, export, generate, io, registry, tracking
from ddpm.config import SampleConfig
from ddpm.runtime import compile_in_place
from pipeline import params, paths
from pipeline import tracking as stage_tracking


def resolve_model(model: str, p: params.Params, tmp: str) -> Path:
    """A local model.pt for a path, ``champion`` or an MLflow ``models:/`` / ``runs:/`` URI (the file of the
    registered version's Logged model, which the caller reads with ``weights_only=True``)."""
    name = registry.model_name(p.tracking, p.data.dataset)
    if model == "champion":
        model = f"models:/{name}@{registry.CHAMPION}"
    if model.startswith(("models:/", "runs:/")):
        path = registry.download_model(model, tracking.resolve_uri(p.tracking), tmp)
        print(f"sample: model {model} -> {path}")
        return path
    return Path(model)


def write_samples(model: export.Model, plan: generate.Plan, cfg: SampleConfig, out_dir: Path, progress: bool) -> dict:
    """Draw ``cfg.n`` images into ``samples.npz`` (uint8 arr_0 [N, H, W, C], streamed), ``grid.png`` and
    ``trajectory.png`` (rows: images, columns: steps from noise to image); return the run's metadata."""
    c, size = model.config.channels, model.config.image_size
    keep = min(cfg.trajectory_samples, cfg.n)
    marks = set(np.linspace(0, plan.steps - 1, cfg.trajectory_points).round().astype(int).tolist())
    trajectory: list[np.ndarray] = []

    def record(info: dict[str, Any]) -> None:
        bar.update(info["x"].shape[0])
        if info["start"] == 0 and info["i"] in marks:
            trajectory.append(data.from_tensor(info["x"][:keep].float().cpu()))

    first: list[np.ndarray] = []
    compile_in_place(model.net, cfg.compile)  # compiled at the first chunk
    started = time.perf_counter()
    with (
        generate.autocast(cfg.precision, next(model.net.parameters()).device),
        tqdm(total=cfg.n * plan.steps, unit="img-step", disable=not progress, desc="sample") as bar,
        io.NpzWriter(out_dir / "samples.npz", (cfg.n, size, size, c)) as writer,
    ):
        batches = generate.sample_batches(
            model.net, plan, cfg.n, seed=cfg.seed, batch_size=cfg.batch_size, callback=record
        )
        for chunk in batches:
            images = data.from_tensor(chunk.float())
            writer.write(images)
            if sum(len(f) for f in first) < cfg.grid_size**2:
                first.append(images)
    seconds = time.perf_counter() - started

    shown = np.concatenate(first)[: cfg.grid_size**2]
    io.save_png(out_dir / "grid.png", io.grid(shown, cfg.grid_size), scale=max(1, 256 // (cfg.grid_size * size)))
    strip = np.stack(trajectory, axis=1).reshape(-1, size, size, c)
    io.save_png(out_dir / "trajectory.png", io.grid(strip, len(trajectory)), scale=max(1, 64 // size))
    run = plan.config
    return {
        "n": cfg.n,
        "sampler": run.sampler,
        "steps": run.steps,
        "eta": run.eta if run.sampler == "ddim" else None,
        "nfe": plan.nfe,
        "seed": cfg.seed,
        "precision": cfg.precision,
        "seconds": round(seconds, 2),
        "images_per_second": round(cfg.n / seconds, 2),
    }


def main(args: argparse.Namespace) -> None:
    names = ("sampler", "steps", "eta", "n", "seed", "batch_size", "precision")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    p = params.load(args.params, sample_overrides=overrides)
    cfg = p.sample
    run = stage_tracking.reopen(p) if args.track else None
    with tempfile.TemporaryDirectory() as tmp:
        model = export.load_model(resolve_model(args.model, p, tmp))
    plan = generate.plan(model.config, cfg.sampler, cfg.steps, cfg.eta)  # checked against the model's config
    out = Path(args.out)
    meta = write_samples(model, plan, cfg, out, progress=sys.stderr.isatty() and not args.quiet)
    run_cfg = plan.config
    io.write_json(out / "meta.json", meta)
    if run is not None:
        seconds = meta["seconds"]
        scores = {"seconds": seconds, "nfe": meta["nfe"], "images_per_second": meta["n"] / max(seconds, 1e-9)}
        run.log_metrics(
            {tracking.metric_key(f"sample/{k}", run_cfg.sampler, run_cfg.steps): v for k, v in scores.items()}
        )
        run.log_new_params(tracking.flatten({"sample": cfg.to_dict()}))
        run.log_artifacts(
            [out / "grid.png", out / "trajectory.png"], tracking.metric_key("samples", run_cfg.sampler, run_cfg.steps)
        )
    print(
        f"sample: {meta['n']} images, {meta['sampler']}, {meta['nfe']} NFE, {meta['precision']},"
        f" {meta['seconds']} s -> {args.out}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(params.PARAMS))
    parser.add_argument(
        "--model",
        default=str(paths.MODEL),
        help="exported EMA model: a model.pt path, champion, models:/<name>@<alias>, models:/<name>/<v>, runs:/<id>",
    )
    parser.add_argument("--out", default=str(paths.SAMPLES), help="output folder")
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
