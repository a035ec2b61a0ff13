"""Stage ``prepare``: load ``data.dataset`` and write deterministic train/test splits (uint8)."""

import argparse

from ddpm import data, datasets, io
from pipeline import params, paths


def main(args: argparse.Namespace) -> None:
    cfg = params.load(args.params).data
    train, test = datasets.split(datasets.load(cfg), cfg.test_fraction, cfg.seed, cfg.limit)
    data.save_npz(paths.split("train"), train)
    data.save_npz(paths.split("test"), test)
    io.write_json(
        paths.DATA_INFO,
        {
            "dataset": cfg.dataset,
            "n_train": len(train),
            "n_test": len(test),
            "shape": list(train.images.shape[1:]),
            "classes": list(train.classes),
            "train_hash": data.content_hash(train),
            "test_hash": data.content_hash(test),
        },
    )
    print(f"prepare: {cfg.dataset}: {len(train)} train / {len(test)} test images {list(train.images.shape[1:])}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(params.PARAMS))
    params.run_stage(main, parser)
