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
import torch
from tqdm.auto import tqdm

from ddpm import data, export, generate, io, registry, tracking
from ddpm.config import SampleConfig
from ddpm.runtime import compile_in_place, device
from pipeline import params, paths
from pipeline import tracking as stage_tracking


def parse_labels(text: str) -> str | list[int]:
    """``--labels``: ``balanced`` or comma-separated class indices (``7``, ``3,5,7``)."""
    if text.strip() == "balanced":
        return "balanced"
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"sample.labels={text!r} is invalid; allowed: class indices like 7 or 3,5,7, or balanced"
        ) from None


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


def labels_for(model: export.Model, cfg: SampleConfig) -> np.ndarray | None:
    """The class of each image to draw (``sample.labels`` against the model's classes), or None."""
    labels = cfg.label_array(cfg.n, model.net.config.num_classes)
    return None if labels is None else np.asarray(labels, dtype=np.int64)


def grid_classes(labels: np.ndarray, size: int) -> list[int]:
    """The classes of the grid's rows: the first ``size`` classes drawn, in order."""
    return list(dict.fromkeys(labels.tolist()))[:size]


def grid_images(first: list[np.ndarray], labels: np.ndarray | None, size: int) -> tuple[np.ndarray, int]:
    """The images of grid.png and its columns: the first ``size**2`` images, or with labels one row per class
    (:func:`grid_classes`; each row the first ``size`` images of its class)."""
    images = np.concatenate(first)
    if labels is None:
        return images[: size**2], size
    labels = labels[: len(images)]
    rows = [images[labels == k][:size] for k in grid_classes(labels, size)]
    columns = max(len(r) for r in rows)
    blank = np.full((1, *images.shape[1:]), 255, dtype=np.uint8)
    padded = [np.concatenate([r, *[blank] * (columns - len(r))]) for r in rows]
    return np.concatenate(padded), columns


def enough_for_grid(first: list[np.ndarray], labels: np.ndarray | None, size: int) -> bool:
    drawn = sum(len(f) for f in first)
    if labels is None:
        return drawn >= size**2
    seen = labels[:drawn]
    return all(int((seen == k).sum()) >= size for k in grid_classes(labels, size))


def write_samples(
    model: export.Model,
    plan: generate.Plan,
    cfg: SampleConfig,
    out_dir: Path,
    progress: bool,
    labels: np.ndarray | None = None,
) -> dict:
    """Draw ``cfg.n`` images into ``samples.npz`` (uint8 arr_0 [N, H, W, C], streamed; with ``labels``, the class
    of each image beside it as ``labels`` [N]), ``grid.png`` (one row per class with labels) and
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
        io.NpzWriter(
            out_dir / "samples.npz", (cfg.n, size, size, c), extra=None if labels is None else {"labels": labels}
        ) as writer,
    ):
        batches = generate.sample_batches(
            model.net,
            plan,
            cfg.n,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            labels=None if labels is None else torch.from_numpy(labels),
            callback=record,
        )
        for chunk in batches:
            images = data.from_tensor(chunk.float())
            writer.write(images)
            if not enough_for_grid(first, labels, cfg.grid_size):
                first.append(images)
    seconds = time.perf_counter() - started

    shown, columns = grid_images(first, labels, cfg.grid_size)
    io.save_png(out_dir / "grid.png", io.grid(shown, columns), scale=max(1, 256 // (cfg.grid_size * size)))
    strip = np.stack(trajectory, axis=1).reshape(-1, size, size, c)
    io.save_png(out_dir / "trajectory.png", io.grid(strip, len(trajectory)), scale=max(1, 64 // size))
    run = plan.config
    return {
        "n": cfg.n,
        "sampler": run.sampler,
        "steps": run.steps,
        "eta": run.eta if run.sampler == "ddim" else None,
        "labels": cfg.labels,
        "guidance": run.guidance if labels is not None else None,
        "nfe": plan.nfe,
        "seed": cfg.seed,
        "precision": cfg.precision,
        "seconds": round(seconds, 2),
        "images_per_second": round(cfg.n / seconds, 2),
    }


def main(args: argparse.Namespace) -> None:
    names = ("sampler", "steps", "eta", "n", "seed", "batch_size", "precision", "labels", "guidance")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    p = params.load(args.params, sample_overrides=overrides)
    cfg = p.sample
    where = device(cfg.accelerator, "sample.accelerator")
    run = stage_tracking.reopen(p) if args.track else None
    with tempfile.TemporaryDirectory() as tmp:
        model = export.load_model(resolve_model(args.model, p, tmp))
    model.net.to(where)
    plan = generate.plan(model.config, cfg.sampler, cfg.steps, cfg.eta, cfg.guidance)  # checked against the model
    labels = labels_for(model, cfg)
    out = Path(args.out)
    meta = write_samples(model, plan, cfg, out, progress=sys.stderr.isatty() and not args.quiet, labels=labels)
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
    drawn = "" if labels is None else f" of classes {cfg.labels}, guidance {meta['guidance']},"
    print(
        f"sample: {meta['n']} images{drawn} {meta['sampler']}, {meta['nfe']} NFE, {meta['precision']},"
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
    parser.add_argument(
        "--labels", type=parse_labels, help="override sample.labels: classes, e.g. 7 or 3,5,7, or balanced"
    )
    parser.add_argument("--guidance", type=float, help="override sample.guidance (classifier-free guidance scale)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--track", action="store_true", help="log into the pipeline's MLflow run (the DVC stage)")
    params.run_stage(main, parser)
