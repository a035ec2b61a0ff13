"""Stage ``guidance``: the classifier-free guidance trade-off of a class-conditional model.

For every scale of ``sweep.guidance`` it draws ``sweep.n`` images of ``sample.labels`` (``balanced`` when that is
null) with the sampler and steps of ``sweep.guidance_run`` (null: the model's defaults) from the same noise, and
scores them: FID against the
reference split and the featurizer's label accuracy and confidence. Low scales draw varied but less recognisable
digits, high scales sharp digits of less variety: the curve shows where FID is best and what label accuracy
that scale gives. Writes ``fid_vs_guidance.csv`` (a DVC plot), ``table.md`` and ``guidance.png``, and logs the
curve into the pipeline's MLflow run (``guidance/<score>/<sampler>_<steps>`` at step = 100 x the scale). An
unconditional model, or one trained without label dropout (no null class), has no guidance: the stage writes a
header-only table and says so.
"""

import argparse

import numpy as np

from ddpm import export, generate, io, tracking
from ddpm.runtime import device
from pipeline import params, paths, scoring, sweep
from pipeline import tracking as stage_tracking

HEADER = ["guidance", "fid", "kid", "label_accuracy", "confidence", "nfe", "seconds"]


def scale_step(guidance: float) -> int:
    """The MLflow step of a guidance scale on the logged curve (MLflow steps are integers)."""
    return round(100 * guidance)


def run_of(p: params.Params) -> tuple[str | None, int | None]:
    """The sampler and steps of the guidance stage (None: the model's default)."""
    return p.sweep.parse(p.sweep.guidance_run) if p.sweep.guidance_run else (None, None)


def curve(p: params.Params, model: export.Model) -> list[list]:
    """One row of :data:`HEADER` per scale of ``sweep.guidance``."""
    cfg = p.sample if p.sample.labels is not None else p.sample.replace(labels="balanced")
    labels = np.asarray(cfg.label_array(p.sweep.n, model.net.config.num_classes), dtype=np.int64)
    rows = []
    for w in p.sweep.guidance:
        plan = generate.plan(model.config, *run_of(p), guidance=w)
        fake, seconds = sweep.draw(model, plan, p.sweep, labels)
        r = scoring.score(fake, p.evaluate, labels=labels)
        rows.append([w, r["fid"], r["kid"], r["label_accuracy"], r["confidence"], plan.nfe, round(seconds, 2)])
        print(f"guidance {w:g}: FID {r['fid']:.3f}  label accuracy {r['label_accuracy']:.1%}  at {plan.nfe} NFE")
    return rows


def without_guidance(model: export.Model) -> str | None:
    """Why ``model`` has no guidance curve, or None when it has one."""
    if model.net.config.num_classes is None:
        return "The model is unconditional (model.num_classes: null): it has no guidance."
    if model.config.p_uncond == 0:
        return "The model never trained its null class (train.label_dropout: 0): it has no guidance."
    return None


def table(rows: list[list], drawn: str, reason: str | None = None) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |" for r in rows]
    if not rows:
        return "\n".join([*lines, "", reason or "No guidance scales."])
    best = min(rows, key=lambda r: r[1])
    return "\n".join(
        [*lines, "", f"{drawn}. Best FID at guidance {best[0]:g}: {best[1]:.4g}, label accuracy {best[3]:.1%}"]
    )


def plot(rows: list[list], png: str) -> None:
    """FID and label accuracy against the guidance scale, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, fid, accuracy = [r[0] for r in rows], [r[1] for r in rows], [r[3] for r in rows]
    fig, (ax_fid, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2), constrained_layout=True)
    if not rows:
        fig.suptitle("no guidance: an unconditional model, or one trained without label dropout")
    ax_fid.plot(w, fid, marker="o")
    ax_fid.set(xlabel="guidance scale", ylabel="FID", title="FID (lower is better)")
    ax_acc.plot(w, accuracy, marker="o", color="tab:green")
    ax_acc.set(xlabel="guidance scale", ylabel="label accuracy", title="classified as asked", ylim=(0, 1.02))
    fig.savefig(png, dpi=100, format="png")
    plt.close(fig)


def report(p: params.Params) -> None:
    model = export.load_model(paths.MODEL)
    model.net.to(device(p.sample.accelerator, "sample.accelerator"))
    reason = without_guidance(model)
    rows = curve(p, model) if reason is None else []
    plan = generate.plan(model.config, *run_of(p))
    sampler, steps = plan.config.sampler, plan.config.steps
    drawn = f"{p.sweep.n} images of classes {p.sample.labels or 'balanced'}, {sampler} with {steps} steps"
    io.write_csv(paths.GUIDANCE / "fid_vs_guidance.csv", HEADER, rows)
    with io.atomic_path(paths.GUIDANCE / "table.md") as tmp:
        tmp.write_text(table(rows, drawn, reason) + "\n")
    with io.atomic_path(paths.GUIDANCE / "guidance.png") as tmp:
        plot(rows, str(tmp))
    files = [paths.GUIDANCE / name for name in ("table.md", "fid_vs_guidance.csv", "guidance.png")]
    run_log = stage_tracking.reopen(p)
    if run_log is not None:
        for r in rows:
            scores = {"fid": r[1], "label_accuracy": r[3], "confidence": r[4]}
            keys = {tracking.metric_key(f"guidance/{k}", sampler, steps): v for k, v in scores.items()}
            run_log.log_metrics(keys, step=scale_step(r[0]))
        run_log.log_artifacts(files, "guidance")
    print(table(rows, drawn, reason))


def main(args: argparse.Namespace) -> None:
    report(params.load(args.params))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(params.PARAMS))
    params.run_stage(main, parser)
