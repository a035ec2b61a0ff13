"""Stage ``ema``: the EMA model the later stages draw from, ``outputs/model/model.pt``.

With ``ema.std`` null it is the training run's own EMA (``outputs/train/model.pt``). With ``ema.std`` set it is
the EMA of that length rebuilt from the snapshots in ``outputs/train/ema`` (:func:`ddpm.ema.reconstruct`), so
``dvc exp run -S ema.std=0.08`` tries another length without training again. ``outputs/model/ema.json`` says which
model it is; with tracking on, a rebuilt model is logged as another Logged model of the pipeline's MLflow run,
whose id the evaluate stage registers.
"""

import argparse
import shutil

from ddpm import ema, export, io, tracking
from pipeline import params, paths
from pipeline import tracking as stage_tracking


def model_name(std: float) -> str:
    """The rebuilt EMA's Logged model name, ``model-ema-0_08`` for 0.08 (MLflow allows no dots in the name)."""
    return f"model-ema-{std:g}".replace(".", "_")


def main(args: argparse.Namespace) -> None:
    p = params.load(args.params)
    record = tracking.read_run(paths.RUN_RECORD)
    if p.ema.std is None:
        export.load_model(paths.TRAIN_MODEL)  # a readable model, or one line naming the file
        with io.atomic_path(paths.MODEL) as tmp:
            shutil.copyfile(paths.TRAIN_MODEL, tmp)
        made = {"std": None, "source": str(paths.TRAIN_MODEL), "model_id": record.get("model_id")}
        print(f"ema: the training run's own EMA ({paths.TRAIN_MODEL}) -> {paths.MODEL}")
    else:
        model, how = ema.reconstruct(paths.EMA_SNAPSHOTS, p.ema.std, p.ema.step)
        export.save_model(paths.MODEL, model.net, model.config, ema={"std": how.std, "step": how.step})
        made = {
            "std": how.std,
            "step": how.step,
            "profile_error": how.error,
            "snapshots": [f.name for f in how.files],
            "weights": how.weights,
            "source": str(paths.EMA_SNAPSHOTS),
            "model_id": None,
        }
        run = stage_tracking.reopen(p)
        if run is not None:
            about = {"ema.std": how.std, "ema.step": how.step, "ema.profile_error": round(how.error, 5)}
            made["model_id"] = run.log_model(paths.MODEL, step=how.step, name=model_name(how.std), params=about)
            run.log_new_params(tracking.flatten({"ema": p.ema.to_dict()}))
            run.log_metrics({"ema/profile_error": how.error}, step=how.step)
        print(f"ema: {how.summary()} -> {paths.MODEL}")
    io.write_json(paths.MODEL_RECORD, made)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(params.PARAMS))
    params.run_stage(main, parser)
