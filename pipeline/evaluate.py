"""Stage ``evaluate``: FID and KID of the samples against the real reference split, with their protocol.

With tracking on it logs ``fid/<sampler>_<steps>`` and KID into the pipeline's MLflow run, linked to the
run's Logged model (the EMA model) and the reference split's dataset, the featurizer's confidence on the samples
and, for samples drawn for requested classes, the label accuracy (both ``<name>/<sampler>_<steps>``), and the
featurizer's test accuracy; uploads
params.yaml and dvc.lock, registers the Logged model as a new version and applies the champion rule; the
decision goes to ``outputs/evaluate/registry.json``.
"""

import argparse
import json

from ddpm import io, registry, tracking
from pipeline import params, paths, scoring
from pipeline import tracking as stage_tracking


def track(run: tracking.Run, p: params.Params, result: dict, params_file: str, model_record: dict) -> dict:
    """Log the scores into the run and its Logged model, register that model and apply the champion rule;
    return the decision."""
    sampler, steps = result.get("sampler"), result.get("steps")
    names = [name for name in ("fid", "kid", "confidence", "label_accuracy") if name in result]
    scores = {tracking.metric_key(name, sampler, steps): result[name] for name in names}
    model_id = model_record.get("model_id") or run.logged_model_id()  # the ema stage's model, which was sampled
    run.log_metrics(scores, model_id=model_id, dataset=run.dataset(p.evaluate.reference))
    featurizer_json = paths.metrics_file("featurizer")
    if featurizer_json.is_file():
        run.log_metrics({"featurizer/test_accuracy": json.loads(featurizer_json.read_text())["test_accuracy"]})
    run.log_new_params(tracking.flatten({"evaluate": p.evaluate.to_dict()}))
    run.set_tags({f"protocol.{k}": v for k, v in registry.protocol_of(result).items()})
    run.log_artifacts([paths.metrics_file("evaluate")], "metrics")
    run.log_artifacts([params_file, "dvc.lock"], "config")
    name = registry.model_name(p.tracking, p.data.dataset)
    version = registry.register(run, name, result, model_id)
    return registry.promote(run.uri, name, version)


def main(args: argparse.Namespace) -> None:
    p = params.load(args.params)
    run = stage_tracking.reopen(p)
    samples = io.load_samples(paths.SAMPLES_NPZ)
    result = scoring.score(samples, p.evaluate, labels=io.load_labels(paths.SAMPLES_NPZ))
    if paths.SAMPLES_META.is_file():
        meta = json.loads(paths.SAMPLES_META.read_text())
        result.update({key: meta.get(key) for key in ("sampler", "steps", "nfe", "seed", "labels", "guidance")})
    io.write_json(paths.metrics_file("evaluate"), result)
    model_record = json.loads(paths.MODEL_RECORD.read_text()) if paths.MODEL_RECORD.is_file() else {}
    decision = track(run, p, result, args.params, model_record) if run is not None else stage_tracking.OFF
    io.write_json(paths.REGISTRY_RECORD, decision)
    accuracy = f"  label accuracy {result['label_accuracy']:.1%}" if "label_accuracy" in result else ""
    print(
        f"evaluate: FID {result['fid']:.3f}  KID {result['kid']:.5f}  confidence {result['confidence']:.3f}{accuracy}"
        f"  ({result['n_gen']} vs {result['n_ref']} images)"
    )
    if decision["enabled"]:
        d = decision
        print(f"registry: {d['model_name']} v{d['version']} -> {d['alias']} ({d['reason']})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(params.PARAMS))
    params.run_stage(main, parser)
