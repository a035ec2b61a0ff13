"""Stage ``featurizer``: train the seeded CNN classifier whose features define "classifier FID"."""

import argparse

from ddpm import data, featurizer, io
from pipeline import params


def main(args: argparse.Namespace) -> None:
    cfg = params.load(args.params).featurizer
    out = params.OUT
    train_set, test_set = data.load_npz(out / "data" / "train.npz"), data.load_npz(out / "data" / "test.npz")
    net, metrics = featurizer.train_featurizer(
        train_set.images, train_set.labels, test_set.images, test_set.labels, cfg
    )
    featurizer.save_featurizer(out / "featurizer" / "featurizer.pt", net, cfg)
    metrics = {**metrics, "weights_hash": featurizer.weights_hash(net)}
    io.write_json(out / "metrics" / "featurizer.json", metrics)
    print(f"featurizer: test accuracy {metrics['test_accuracy']:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(params.PARAMS))
    params.run_stage(main, parser)
