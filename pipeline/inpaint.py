"""``make inpaint``: complete real images where a mask hides them, with the EMA model (RePaint).

The mask names the region to generate: a preset (``left``, ``right``, ``top``, ``bottom`` halves, or the
``center`` square of half the side) or a black-and-white PNG of the images' size whose white pixels are
generated and black pixels kept (the convention of image editors and diffusers' inpainting pipelines). The images
are the first ``--n`` of the test split, or of an ``--images`` npz. The sample section's sampler, steps, seed and
precision apply, and ``sample.repaint_jumps`` / ``sample.resample`` turn on RePaint's resampling. A
class-conditional model completes each image as its own class (the split's labels) with ``sample.guidance``.

Writes ``inpaint.png`` (rows: original, masked, completed), ``completions.npz`` (``arr_0`` the completions,
``original``, ``mask`` 1 where generated, and ``labels`` for a conditional model) and ``meta.json``. Outside the
mask the completions equal the originals. ``--track`` logs the mask and RePaint settings as ``inpaint.*`` params
and the picture into the pipeline's MLflow run.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm import data, export, generate, io
from ddpm.config import ConfigError
from ddpm.runtime import device
from pipeline import params, paths
from pipeline import tracking as stage_tracking
from pipeline.sample import resolve_model

PRESETS = ("left", "right", "top", "bottom", "center")
SHOWN = 16  # columns of inpaint.png at most


def preset_mask(name: str, size: int) -> np.ndarray:
    """The bool mask [size, size] of preset ``name``, True where the image is generated."""
    mask = np.zeros((size, size), dtype=bool)
    half, quarter = size // 2, size // 4
    regions = {
        "left": (slice(None), slice(0, half)),
        "right": (slice(None), slice(half, None)),
        "top": (slice(0, half), slice(None)),
        "bottom": (slice(half, None), slice(None)),
        "center": (slice(quarter, quarter + half), slice(quarter, quarter + half)),
    }
    mask[regions[name]] = True
    return mask


def png_mask(path: Path, size: int) -> np.ndarray:
    """The bool mask of a black-and-white PNG of ``size`` x ``size`` pixels, True where white (generated)."""
    if not path.is_file():
        raise FileNotFoundError(f"mask {path}: not found; allowed: {', '.join(PRESETS)} or a PNG file")
    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("L"))
    except Exception as e:
        raise ValueError(f"mask {path}: cannot read it as an image ({type(e).__name__}: {e})") from None
    if pixels.shape != (size, size):
        h, w = pixels.shape
        raise ConfigError(f"mask={path}: {w}x{h} pixels; allowed: a PNG of the model's {size}x{size} pixels")
    values = np.unique(pixels)
    if not set(values.tolist()) <= {0, 255}:
        raise ConfigError(
            f"mask={path}: gray levels {values[(values > 0) & (values < 255)][:4].tolist()}; allowed: "
            "black (0, kept) and white (255, generated) only"
        )
    return pixels == 255


def load_mask(mask: str, size: int) -> np.ndarray:
    """``--mask``: a preset name or a PNG path, as a bool mask [size, size] (True = generated)."""
    if mask in PRESETS:
        return preset_mask(mask, size)
    if not mask.lower().endswith(".png"):
        raise ConfigError(f"mask={mask!r} is invalid; allowed: {', '.join(PRESETS)} or a .png file")
    return png_mask(Path(mask), size)


def load_images(path: str | None, n: int, shape: tuple[int, int, int]) -> data.ImageSet:
    """The first ``n`` images (and labels) of ``path`` or the test split, which must have the model's shape."""
    source = paths.split("test") if path is None else Path(path)
    images = data.load_npz(source)
    if images.images.shape[1:] != shape:
        got = "x".join(map(str, images.images.shape[1:]))
        want = "x".join(map(str, shape))
        raise ConfigError(f"images={source}: images of {got} (HxWxC); allowed: the model's {want}")
    if len(images.images) < n:
        raise ConfigError(f"n={n}: {source} holds {len(images.images)} images; allowed: 1..{len(images.images)}")
    return data.ImageSet(images.images[:n], images.labels[:n], images.classes)


def inpaint_guidance(model: export.Model, guidance: float | None) -> float | None:
    """The guidance scale of an inpainting (the images' own classes are drawn), checked against the model."""
    key = "guidance" if guidance is None else f"guidance={guidance:g}"
    if guidance is None or guidance == 1:
        return guidance if model.net.config.num_classes is not None else None
    if guidance < 0:
        raise ConfigError(f"{key}: allowed: a scale >= 0")
    if model.net.config.num_classes is None:
        raise ConfigError(f"{key}: the model is unconditional (model.num_classes: null); allowed: 1 or unset")
    if model.config.p_uncond == 0:
        raise ConfigError(f"{key}: the model never trained its null class (train.label_dropout: 0); allowed: 1")
    return guidance


def masked_view(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The images with the generated region shown mid-gray: what the model is given."""
    shown = images.copy()
    shown[:, mask] = 128
    return shown


def picture(original: np.ndarray, completed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Three rows of up to :data:`SHOWN` images: original, masked, completed."""
    k = min(len(original), SHOWN)
    rows = np.concatenate([original[:k], masked_view(original[:k], mask), completed[:k]])
    return io.grid(rows, k)


def main(args: argparse.Namespace) -> None:
    names = ("sampler", "steps", "seed", "precision", "repaint_jumps", "resample")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    p = params.load(args.params, sample_overrides=overrides)
    cfg = p.sample
    if args.n < 1:
        raise ConfigError(f"n={args.n}: allowed: an integer >= 1")
    where = device(cfg.accelerator, "sample.accelerator")
    with tempfile.TemporaryDirectory() as tmp:
        model = export.load_model(resolve_model(args.model, p, tmp))
    model.net.to(where)
    size, channels = model.config.image_size, model.config.channels
    mask = load_mask(args.mask, size)
    images = load_images(args.images, args.n, (size, size, channels))
    conditional = model.net.config.num_classes is not None
    labels = None
    if conditional:
        labels = images.labels.astype(np.int64)
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= model.net.config.num_classes:
            raise ConfigError(
                f"images: labels {sorted(set(labels.tolist()))}; allowed: the model's classes "
                f"[0, {model.net.config.num_classes})"
            )
    guidance = inpaint_guidance(model, cfg.guidance if args.guidance is None else args.guidance)
    plan = generate.plan(model.config, cfg.sampler, cfg.steps, cfg.eta, guidance)
    run = stage_tracking.reopen(p) if args.track else None
    out = Path(args.out)
    known = data.to_tensor(images.images)
    keep = torch.from_numpy(~mask)[None, None]  # True where known
    started = time.perf_counter()
    with generate.autocast(cfg.precision, next(model.net.parameters()).device):
        chunks = generate.sample_batches(
            model.net,
            plan,
            args.n,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            labels=None if labels is None else torch.from_numpy(labels),
            known=known,
            mask=keep,
            jump_length=cfg.repaint_jumps,
            resample=cfg.resample,
        )
        completed = np.concatenate([data.from_tensor(chunk.float()) for chunk in chunks])
    seconds = time.perf_counter() - started
    extra = {"original": images.images, "mask": mask.astype(np.uint8)}
    if labels is not None:
        extra["labels"] = labels
    with io.NpzWriter(out / "completions.npz", completed.shape, extra=extra) as writer:
        writer.write(completed)
    io.save_png(out / "inpaint.png", picture(images.images, completed, mask), scale=max(1, 64 // size))
    meta = {
        "n": args.n,
        "mask": args.mask,
        "generated_share": round(float(mask.mean()), 4),
        "images": args.images or str(paths.split("test")),
        "sampler": plan.config.sampler,
        "steps": plan.config.steps,
        "repaint_jumps": cfg.repaint_jumps,
        "resample": cfg.resample,
        "guidance": plan.config.guidance if conditional else None,
        "seed": cfg.seed,
        "seconds": round(seconds, 2),
    }
    io.write_json(out / "meta.json", meta)
    if run is not None:
        keys = ("mask", "repaint_jumps", "resample", "guidance", "sampler", "steps")
        run.log_new_params({f"inpaint.{k}": str(meta[k]) for k in keys})
        run.log_artifacts([out / "inpaint.png", out / "meta.json"], "inpaint")
    print(
        f"inpaint: {args.n} images, mask {args.mask} ({meta['generated_share']:.0%} generated), {meta['sampler']} "
        f"{meta['steps']} steps, RePaint jumps {cfg.repaint_jumps} x {cfg.resample}, {meta['seconds']} s -> {out}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(params.PARAMS))
    parser.add_argument("--mask", required=True, help=f"region to generate: {', '.join(PRESETS)} or a PNG (white)")
    parser.add_argument("--n", type=int, default=8, help="images to complete (the first of the split)")
    parser.add_argument("--images", help="an npz of images (and labels) to complete; default: the test split")
    parser.add_argument("--model", default=str(paths.MODEL), help="model.pt, champion or an MLflow URI")
    parser.add_argument("--out", default=str(paths.OUT / "inpaint"), help="output folder")
    parser.add_argument("--sampler", help="override sample.sampler")
    parser.add_argument("--steps", type=int, help="override sample.steps")
    parser.add_argument("--seed", type=int, help="override sample.seed")
    parser.add_argument("--precision", help="override sample.precision")
    parser.add_argument("--guidance", type=float, help="override sample.guidance (conditional models)")
    parser.add_argument("--repaint-jumps", type=int, help="override sample.repaint_jumps")
    parser.add_argument("--resample", type=int, help="override sample.resample")
    parser.add_argument("--track", action="store_true", help="log into the pipeline's MLflow run")
    params.run_stage(main, parser)
