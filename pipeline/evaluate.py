"""Stage ``evaluate``: FID and KID of the samples against the real reference split, with their protocol."""

import argparse
import json

from ddpm import data, featurizer, io, metrics
from pipeline import params


def score(fake, cfg) -> dict:
    """FID/KID of uint8 images ``fake`` against the reference split, with the protocol (see ddpm.metrics)."""
    out = params.OUT
    real = data.load_npz(out / "data" / f"{cfg.reference}.npz").images
    net = None
    if cfg.features == "classifier":
        net, _ = featurizer.load_featurizer(out / "featurizer" / "featurizer.pt")
    return metrics.evaluate(real, fake, cfg, featurizer=net)


def main(args: argparse.Namespace) -> None:
    cfg = params.load(args.params).evaluate
    out = params.OUT
    result = score(io.load_samples(out / "samples" / "samples.npz"), cfg)
    meta_path = out / "samples" / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        result.update({key: meta[key] for key in ("sampler", "steps", "nfe", "seed")})
    io.write_json(out / "metrics" / "evaluate.json", result)
    print(
        f"evaluate: FID {result['fid']:.3f}  KID {result['kid']:.5f}  ({result['n_gen']} vs {result['n_ref']} images)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(params.PARAMS))
    params.run_stage(main, parser)
