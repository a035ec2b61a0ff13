"""Stage ``train``: fit the diffusion model; write the resumable checkpoint, the EMA model and the curves."""

import argparse
import sys

from ddpm import data, io, training
from pipeline import params


def main(args: argparse.Namespace) -> None:
    p = params.load(args.params)
    out = params.OUT
    train_set, test_set = data.load_npz(out / "data" / "train.npz"), data.load_npz(out / "data" / "test.npz")
    progress = sys.stderr.isatty()
    metrics = training.train(train_set, test_set, p.model, p.diffusion, p.train, out / "train", progress=progress)
    io.write_json(out / "metrics" / "train.json", metrics)
    print(f"train: {metrics}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(params.PARAMS))
    params.run_stage(main, parser)
