"""Stage ``evaluate``: FID and KID of the samples against the real reference split, with their protocol.

With tracking on it logs ``fid/<sampler>_<steps>``, KID and the featurizer's accuracy into the pipeline's
MLflow run, uploads params.yaml and dvc.lock, registers the EMA model as a new version and applies the
champion rule; the decision goes to ``outputs/evaluate/registry.json``.
"""

import argparse
import json

from ddpm import data, featurizer, io, metrics, tracking
from pipeline import params
from pipeline import tracking as stage_tracking


def score(fake, cfg) -> dict:
    """FID/KID of uint8 images ``fake`` against the reference split, with the protocol (see ddpm.metrics)."""
    out = params.OUT
    real = data.load_npz(out / "data" / f"{cfg.reference}.npz").images
    net = None
    if cfg.features == "classifier":
        net, _ = featurizer.load_featurizer(out / "featurizer" / "featurizer.pt")
    return metrics.evaluate(real, fake, cfg, featurizer=net)


def track(run: tracking.Run, p: params.Params, result: dict, params_file: str) -> dict:
    """Log the scores into the run, register the EMA model and apply the champion rule; return the decision."""
    out = params.OUT
    key = f"{result.get('sampler')}_{result.get('steps')}"
    scores = {f"fid/{key}": result["fid"], f"kid/{key}": result["kid"]}
    featurizer_json = out / "metrics" / "featurizer.json"
    if featurizer_json.is_file():
        scores["featurizer/test_accuracy"] = json.loads(featurizer_json.read_text())["test_accuracy"]
    run.log_metrics(scores)
    run.log_new_params(tracking.flatten({"evaluate": p.evaluate.to_dict()}))
    run.set_tags({f"protocol.{k}": v for k, v in tracking.protocol_of(result).items()})
    run.log_artifacts([out / "metrics" / "evaluate.json"], "metrics")
    run.log_artifacts([params_file, "dvc.lock"], "config")
    name = tracking.model_name(p.tracking, p.data.dataset)
    version = tracking.register(run, name, result)
    return tracking.promote(run.uri, name, version)


def main(args: argparse.Namespace) -> None:
    p = params.load(args.params)
    cfg = p.evaluate
    out = params.OUT
    run = stage_tracking.reopen(p)
    result = score(io.load_samples(out / "samples" / "samples.npz"), cfg)
    meta_path = out / "samples" / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        result.update({key: meta[key] for key in ("sampler", "steps", "nfe", "seed")})
    io.write_json(out / "metrics" / "evaluate.json", result)
    decision = track(run, p, result, args.params) if run is not None else stage_tracking.OFF
    io.write_json(stage_tracking.REGISTRY_RECORD, decision)
    print(
        f"evaluate: FID {result['fid']:.3f}  KID {result['kid']:.5f}  ({result['n_gen']} vs {result['n_ref']} images)"
    )
    if decision["enabled"]:
        d = decision
        print(f"registry: {d['model_name']} v{d['version']} -> {d['alias']} ({d['reason']})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(params.PARAMS))
    params.run_stage(main, parser)
