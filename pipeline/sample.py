"""Stage ``sample``: draw ``sample.n`` images from the EMA model (``make sample`` redraws with overrides)."""

import argparse
import sys
from pathlib import Path

from ddpm import io, sampling, training
from pipeline import params


def main(args: argparse.Namespace) -> None:
    names = ("sampler", "steps", "eta", "n", "seed", "batch_size")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    cfg = params.load(args.params, sample_overrides=overrides).sample
    module = training.load_model(args.model)
    module.config.sampler_fn(cfg.sampler, cfg.steps, cfg.eta)  # the model's config accepts these settings
    meta = sampling.draw(module, cfg, args.out, progress=sys.stderr.isatty() and not args.quiet)
    io.write_json(Path(args.out) / "meta.json", meta)
    print(f"sample: {meta['n']} images, {meta['sampler']}, {meta['nfe']} NFE, {meta['seconds']} s -> {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(params.PARAMS))
    parser.add_argument("--model", default=str(params.OUT / "train" / "model.pt"), help="exported EMA model")
    parser.add_argument("--out", default=str(params.OUT / "samples"), help="output folder")
    parser.add_argument("--sampler", help="override sample.sampler")
    parser.add_argument("--steps", type=int, help="override sample.steps")
    parser.add_argument("--eta", type=float, help="override sample.eta")
    parser.add_argument("--n", type=int, help="override sample.n")
    parser.add_argument("--seed", type=int, help="override sample.seed")
    parser.add_argument("--batch-size", type=int, help="override sample.batch_size")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    params.run_stage(main, parser)
