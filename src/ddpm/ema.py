"""The power-function EMA of the weights (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2, Sec. 3.1).

After ``t`` updates it averages the weights of updates ``tau <= t`` with a density proportional to
``tau**gamma``, so its length grows with the run. ``sigma_rel``, the standard deviation of that density relative
to ``t``, names the profile whatever the run's length: with ``sigma_rel`` 0.1, a run of 600 or of 60,000 steps
averages weights spread over a tenth of the run, centred a ninth of it before the end. The exponential EMA's
``(1 + n) / (10 + n)`` warmup (decay ``1 - 9 / (10 + n)``) is close to ``gamma = 8``, ``sigma_rel`` 0.09, for as
long as the warmup is below ``ema_decay``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddpm import export, io
from ddpm.config.train import EMA_STD_MAX as STD_MAX  # sigma_rel of gamma = 0, the flat average of the whole run


def gamma_from_std(std: float) -> float:
    """The exponent gamma whose profile has relative standard deviation ``std`` (EDM2, eq. 3).

    ``std**2 = (gamma + 1) / ((gamma + 2)**2 (gamma + 3))``: the largest real root of the cubic
    ``gamma**3 + 7 gamma**2 + (16 - std**-2) gamma + 12 - std**-2``.
    """
    if not 0 < std < STD_MAX:
        raise ValueError(f"ema std (sigma_rel)={std}: allowed 0 < std < {STD_MAX:.4f} (gamma > 0)")
    a = std**-2
    roots = np.roots([1.0, 7.0, 16.0 - a, 12.0 - a])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-6 * max(1.0, abs(r.real))))


def std_from_gamma(gamma: float) -> float:
    """The relative standard deviation of the profile ``tau**gamma`` (EDM2, eq. 3)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_decay(t: int, gamma: float) -> float:
    """Decay of update ``t`` (1 for the first): ``(1 - 1/t)**(gamma + 1)``; the first update copies the weights."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


@torch.no_grad()
def update(average: nn.Module, net: nn.Module, decay: float) -> None:
    """``average <- decay * average + (1 - decay) * net`` for the parameters; buffers are copied from ``net``."""
    torch._foreach_lerp_(list(average.parameters()), list(net.parameters()), 1.0 - decay)
    for kept, buffer in zip(average.buffers(), net.buffers()):
        kept.copy_(buffer)


# -- Choosing the length after training (EDM2, Sec. 3.2 and App. C.3) --------------------------------------------
#
# Over the updates tau of a run, the power-function EMA with exponent gamma at update t weights update tau by
# (tau**(gamma+1) - (tau-1)**(gamma+1)) / t**(gamma+1): the density p(tau) = (gamma+1) tau**gamma / t**(gamma+1)
# but for the first few updates. Snapshots of EMAs of a few exponents taken along the run span many other profiles:
# the least-squares combination of their densities that is closest (in L2) to the density of the profile asked for
# gives the coefficients with which to combine their weights.


def overlaps(gammas_a: np.ndarray, steps_a: np.ndarray, gammas_b: np.ndarray, steps_b: np.ndarray) -> np.ndarray:
    """The L2 inner products of the profiles ``(gammas_a[i], steps_a[i])`` and ``(gammas_b[j], steps_b[j])``.

    With ``m = min(t_a, t_b)``, the integral over ``[0, m]`` of the product of the two densities is
    ``(g_a+1)(g_b+1) / ((g_a+g_b+1) m) * (m/t_a)**(g_a+1) * (m/t_b)**(g_b+1)``, written with ratios below one so that
    large exponents and long runs do not overflow.
    """
    ga, ta = (np.asarray(x, dtype=np.float64)[:, None] for x in (gammas_a, steps_a))
    gb, tb = (np.asarray(x, dtype=np.float64)[None, :] for x in (gammas_b, steps_b))
    m = np.minimum(ta, tb)
    return (ga + 1) * (gb + 1) / ((ga + gb + 1) * m) * (m / ta) ** (ga + 1) * (m / tb) ** (gb + 1)


def coefficients(gammas: np.ndarray, steps: np.ndarray, gamma: float, step: int) -> tuple[np.ndarray, float]:
    """Weights of the snapshots ``(gammas[i], steps[i])`` whose combination best matches the profile
    ``(gamma, step)``, and the relative L2 error of that match (0: exact)."""
    gammas, steps = np.asarray(gammas, dtype=np.float64), np.asarray(steps, dtype=np.float64)
    gram = overlaps(gammas, steps, gammas, steps)
    target = overlaps(gammas, steps, np.array([gamma]), np.array([step]))[:, 0]
    x = np.linalg.lstsq(gram, target, rcond=None)[0]
    norm = overlaps(np.array([gamma]), np.array([step]), np.array([gamma]), np.array([step]))[0, 0]
    residual = max(float(x @ gram @ x - 2 * x @ target + norm), 0.0)
    return x, math.sqrt(residual / norm)


def combine(states: list[dict[str, torch.Tensor]], weights: np.ndarray) -> dict[str, torch.Tensor]:
    """``sum_i weights[i] * states[i]`` for the floating-point tensors (in float64, cast back); the others (counters)
    from the last state."""
    out = {}
    for name, last in states[-1].items():
        if last.is_floating_point():
            total = sum(float(w) * s[name].double() for w, s in zip(weights, states))
            out[name] = total.to(last.dtype)
        else:
            out[name] = last.clone()
    return out


# -- Snapshots: files of the power-function EMAs along a run, and the model of any length made from them ---------

SNAPSHOT_KEYS = {"format", "net", "config", "state_dict", "ema"}


def snapshot_path(folder: str | Path, std: float, step: int) -> Path:
    """The file of the EMA of relative length ``std`` at update ``step``: a model file ``make sample`` can draw from."""
    return Path(folder) / f"std{std:g}-step{step:07d}.pt"


def snapshot_files(folder: str | Path) -> list[Path]:
    """The snapshot files in ``folder``, in name order."""
    return sorted(Path(folder).glob("std*-step*.pt"))


def clear_snapshots(folder: str | Path) -> None:
    """Remove the snapshot files of an earlier run from ``folder``, so that a new run's never mix with them."""
    for path in snapshot_files(folder):
        path.unlink()


def publish_snapshots(partial: str | Path, folder: str | Path) -> None:
    """Move a finished run's snapshots from ``partial`` into ``folder``, replacing the ones there.

    A run writes its snapshots to ``partial`` while it trains, so that a run which fails or is stopped leaves
    the previous run's snapshots in ``folder`` as they were (and its own in ``partial``, for its resume).
    """
    partial, folder = Path(partial), Path(folder)
    clear_snapshots(folder)
    if partial.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        for path in snapshot_files(partial):
            os.replace(path, folder / path.name)
        shutil.rmtree(partial)


@dataclass(frozen=True)
class Reconstruction:
    """How a model was made from snapshots: the target profile, the snapshots used and their weights."""

    std: float
    step: int
    stds: list[float]  # the snapshots' profiles
    files: list[Path]
    weights: list[float]
    error: float  # relative L2 distance between the target profile and the combination of the snapshots'

    def summary(self) -> str:
        return (
            f"EMA sigma_rel {self.std:g} at step {self.step} from {len(self.files)} snapshots (sigma_rel "
            f"{', '.join(f'{s:g}' for s in self.stds)}); relative profile error {self.error:.2%}"
        )


def reconstruct(folder: str | Path, std: float, step: int | None = None) -> tuple[export.Model, Reconstruction]:
    """The EMA model of relative length ``std`` at update ``step`` (default: the last snapshot's), as the least-
    squares combination of the snapshots in ``folder`` up to that step (EDM2's post-hoc EMA)."""
    folder = Path(folder)
    gamma = gamma_from_std(std)
    files = snapshot_files(folder)
    if not files:
        raise FileNotFoundError(f"no EMA snapshots in {folder}: train with train.ema_snapshot_stds set")
    payloads = {f: io.load_payload(f, "EMA snapshot", SNAPSHOT_KEYS) for f in files}
    last = max(payloads.values(), key=lambda p: p["ema"]["step"])["ema"]["step"]
    step = last if step is None else step
    if not 1 <= step <= last:
        raise ValueError(f"ema step={step}: allowed 1 <= step <= {last}, the last snapshot's in {folder}")
    used = [f for f, p in payloads.items() if p["ema"]["step"] <= step]
    first = payloads[used[0]]
    for f in used[1:]:
        if (payloads[f]["net"], payloads[f]["config"]) != (first["net"], first["config"]):
            raise ValueError(f"{f}: another run's snapshot (its net or config differs from {used[0]}'s)")
    gammas = [payloads[f]["ema"]["gamma"] for f in used]
    weights, error = coefficients(np.array(gammas), np.array([payloads[f]["ema"]["step"] for f in used]), gamma, step)
    model = export.load_model(used[0])
    io.load_state(model.net, combine([payloads[f]["state_dict"] for f in used], weights), used[0], "EMA snapshot")
    stds = sorted({float(payloads[f]["ema"]["std"]) for f in used})
    return model, Reconstruction(float(std), int(step), stds, used, [float(w) for w in weights], error)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ddpm.ema", description="Write the model of an EMA length chosen after training."
    )
    parser.add_argument("folder", help="the run's snapshots (outputs/train/ema)")
    parser.add_argument("--std", type=float, required=True, help="sigma_rel of the EMA, e.g. 0.08")
    parser.add_argument("--step", type=int, default=None, help="the update it ends at (default: the last)")
    parser.add_argument("--out", required=True, help="model file to write (make sample MODEL=...)")
    args = parser.parse_args(argv)
    try:
        model, how = reconstruct(args.folder, args.std, args.step)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"ddpm.ema: {e}") from None
    export.save_model(args.out, model.net, model.config, ema={"std": how.std, "step": how.step, "error": how.error})
    print(f"{how.summary()}: wrote {args.out}")


if __name__ == "__main__":
    main()
