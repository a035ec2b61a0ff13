"""Stage ``featurizer``: train the seeded CNN classifier whose features define "classifier FID"."""

import argparse

from ddpm import featurizer, io
from pipeline import params, paths


def main(args: argparse.Namespace) -> None:
    cfg = params.load(args.params).featurizer
    train_set, test_set = paths.load_splits()
    net, metrics = featurizer.train_featurizer(
        train_set.images, train_set.labels, test_set.images, test_set.labels, cfg
    )
    featurizer.save_featurizer(paths.FEATURIZER, net, cfg)
    metrics = {**metrics, "weights_hash": featurizer.weights_hash(net)}
    io.write_json(paths.metrics_file("featurizer"), metrics)
    print(f"featurizer: test accuracy {metrics['test_accuracy']:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(params.PARAMS))
    params.run_stage(main, parser)
