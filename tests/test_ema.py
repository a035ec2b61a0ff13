"""The power-function EMA (ddpm.ema, EDM2 Sec. 3.1): its exponent, its decay and the average it keeps."""

import math

import numpy as np
import pytest
import torch

from ddpm import ema


@pytest.mark.parametrize("std", [0.01, 0.05, 0.09, 0.1, 0.15, 0.25, 0.28])
def test_gamma_and_std_are_inverse(std):
    gamma = ema.gamma_from_std(std)
    assert gamma > 0
    assert ema.std_from_gamma(gamma) == pytest.approx(std, rel=1e-9)


def test_gamma_of_the_papers_profiles():
    """EDM2 names sigma_rel 0.05 and 0.10 by gamma 16.97 and 6.94."""
    assert ema.gamma_from_std(0.05) == pytest.approx(16.97, abs=0.005)
    assert ema.gamma_from_std(0.10) == pytest.approx(6.94, abs=0.005)


@pytest.mark.parametrize("std", [0.0, -0.1, ema.STD_MAX, 0.3, math.inf])
def test_a_std_outside_the_profiles_fails_naming_it(std):
    with pytest.raises(ValueError, match=rf"ema std \(sigma_rel\)={std}: allowed 0 < std < 0.2887"):
        ema.gamma_from_std(std)


def test_the_first_update_copies_and_the_decay_grows_towards_one():
    gamma = ema.gamma_from_std(0.1)
    assert ema.power_decay(1, gamma) == 0.0
    decays = [ema.power_decay(t, gamma) for t in range(1, 5000)]
    assert decays == sorted(decays) and decays[-1] < 1


@pytest.mark.parametrize("std", [0.05, 0.15])
def test_the_ema_is_the_power_weighted_average_of_the_updates(std):
    """After t updates the EMA is sum_tau w_tau x_tau, w_tau = (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1): density ~ tau^g,
    whose standard deviation relative to t is sigma_rel."""
    gamma, t = ema.gamma_from_std(std), 4000
    x = np.random.default_rng(0).normal(size=(t, 3))
    average = np.zeros(3)
    for tau in range(1, t + 1):
        beta = ema.power_decay(tau, gamma)
        average = beta * average + (1 - beta) * x[tau - 1]
    tau = np.arange(1, t + 1, dtype=np.float64)
    w = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / t ** (gamma + 1)
    np.testing.assert_allclose(average, w @ x, rtol=1e-9, atol=1e-12)
    mean = (w * tau / t).sum()
    assert np.sqrt((w * (tau / t - mean) ** 2).sum()) == pytest.approx(std, rel=0.01)


# -- choosing the length after training: snapshots and their least-squares combination ---------------------------


def discrete_profile(gamma: float, t: int, horizon: int) -> np.ndarray:
    """The weights of updates 1..horizon in the power-function EMA at update t (zero after t)."""
    tau = np.arange(1, horizon + 1, dtype=np.float64)
    w = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / t ** (gamma + 1)
    return np.where(tau <= t, w, 0.0)


def test_the_overlaps_are_the_inner_products_of_the_profiles():
    """The closed form against the sum over the updates of the exact discrete weights (times t: densities)."""
    horizon = 20_000
    cases = [(16.97, 20_000), (6.94, 20_000), (6.94, 12_000), (40.0, 5_000), (1.5, 20_000)]
    gammas, steps = np.array([c[0] for c in cases]), np.array([c[1] for c in cases])
    closed = ema.overlaps(gammas, steps, gammas, steps)
    profiles = np.stack([discrete_profile(g, t, horizon) for g, t in cases])
    np.testing.assert_allclose(closed, profiles @ profiles.T, rtol=2e-3)
    # long runs and steep profiles stay finite
    big = ema.overlaps(np.array([200.0]), np.array([10**9]), np.array([3.0]), np.array([10**7]))
    assert np.isfinite(big).all() and big[0, 0] >= 0


def test_a_snapshot_of_the_asked_profile_gets_all_the_weight():
    gamma = ema.gamma_from_std(0.05)
    gammas = np.array([gamma, ema.gamma_from_std(0.1)] * 3)
    steps = np.array([400, 400, 800, 800, 1200, 1200])
    weights, error = ema.coefficients(gammas, steps, gamma, 800)
    np.testing.assert_allclose(weights, [0, 0, 1, 0, 0, 0], atol=1e-6)
    assert error < 1e-6


@pytest.mark.parametrize("std", [0.03, 0.07, 0.15])
def test_snapshots_of_two_profiles_rebuild_an_ema_of_another_length(std):
    """EMAs of sigma_rel 0.05 and 0.10 of a drifting sequence, snapshot every 100 of 1,200 updates, rebuild the
    EMA of another length: far closer to the EMA kept directly than the nearest snapshot is."""
    t, every, dim = 1200, 100, 64
    rng = np.random.default_rng(1)
    x = np.cumsum(rng.normal(size=(t, dim)), axis=0) + 0.05 * np.arange(t)[:, None] ** 1.5
    kept = {s: np.zeros(dim) for s in (0.05, 0.10, std)}
    states, gammas, steps = [], [], []
    for tau in range(1, t + 1):
        for s in kept:
            beta = ema.power_decay(tau, ema.gamma_from_std(s))
            kept[s] = beta * kept[s] + (1 - beta) * x[tau - 1]
        if tau % every == 0:
            for s in (0.05, 0.10):
                states.append({"w": torch.from_numpy(kept[s].copy()), "n": torch.tensor(tau)})
                gammas.append(ema.gamma_from_std(s))
                steps.append(tau)
    weights, error = ema.coefficients(np.array(gammas), np.array(steps), ema.gamma_from_std(std), t)
    rebuilt = ema.combine(states, weights)
    assert rebuilt["w"].dtype == torch.float64 and rebuilt["n"].item() == t  # counters come from the last state
    gap = np.linalg.norm(rebuilt["w"].numpy() - kept[std])
    nearest = min(np.linalg.norm(kept[s] - kept[std]) for s in (0.05, 0.10))
    assert gap < 0.05 * nearest, (gap, nearest)
    assert error < (0.01 if 0.05 < std < 0.10 else 0.1)  # between the two profiles, or beyond them
    assert weights.sum() == pytest.approx(1.0, abs=0.02)  # the profiles are densities: weights sum to about one


def test_a_run_writes_snapshots_that_rebuild_a_model_of_any_length(toy_image_sets, tmp_path, capsys):
    from ddpm import export, fit
    from ddpm.config import TrainConfig

    model = {"channels": 8, "channel_mult": [1, 2], "attn_resolutions": [], "norm_groups": 4}
    diffusion = {"T": 50, "steps": 4, "sampler": "ddim"}
    train = {"max_steps": 7, "batch_size": 16, "warmup_steps": 1, "val_every": 7, "log_every": 1}
    train_set, val_set = toy_image_sets
    out = tmp_path / "train"
    stale = ema.snapshot_path(out / fit.SNAPSHOTS, 0.2, 5)  # an earlier run's: the next finished run replaces it
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    cfg = TrainConfig(**train, accelerator="cpu", ema_snapshot_stds=[0.05, 0.1], ema_snapshot_every=3)
    fit.train(train_set, val_set, model, diffusion, cfg, out, progress=False, resume=False)
    files = ema.snapshot_files(out / "ema")
    assert [f.name for f in files] == [
        f"std{s}-step{t:07d}.pt"
        for s in ("0.05", "0.1")
        for t in (3, 6, 7)  # every 3 updates and the last
    ]
    # each snapshot is a model file
    last = export.load_model(ema.snapshot_path(out / "ema", 0.05, 7))
    # the length of a snapshot's profile: the snapshot itself
    rebuilt, how = ema.reconstruct(out / "ema", 0.05)
    assert how.step == 7 and how.stds == [0.05, 0.1] and how.error < 1e-6
    for k, v in rebuilt.net.state_dict().items():
        torch.testing.assert_close(v, last.net.state_dict()[k], rtol=1e-4, atol=1e-6, msg=k)
    # another length, at an earlier step: only the snapshots up to it take part
    _, early = ema.reconstruct(out / "ema", 0.08, step=6)
    assert [f.name for f in early.files] == [
        "std0.05-step0000003.pt",
        "std0.05-step0000006.pt",
        "std0.1-step0000003.pt",
        "std0.1-step0000006.pt",
    ]
    # the command writes a model that make sample can draw from
    ema.main([str(out / "ema"), "--std", "0.08", "--out", str(tmp_path / "m.pt")])
    assert "EMA sigma_rel 0.08 at step 7 from 6 snapshots (sigma_rel 0.05, 0.1)" in capsys.readouterr().out
    made = export.load_model(tmp_path / "m.pt")
    assert made.config == last.config
    assert any(not torch.equal(v, last.net.state_dict()[k]) for k, v in made.net.state_dict().items())
    with pytest.raises(SystemExit, match=r"ema step=8: allowed 1 <= step <= 7"):
        ema.main([str(out / "ema"), "--std", "0.08", "--step", "8", "--out", str(tmp_path / "x.pt")])
    with pytest.raises(SystemExit, match=r"no EMA snapshots in .*: train with train.ema_snapshot_stds set"):
        ema.main([str(tmp_path), "--std", "0.08", "--out", str(tmp_path / "x.pt")])
    assert not (tmp_path / "x.pt").exists()
    # a new run without snapshots leaves none of the last run's
    fit.train(
        train_set,
        val_set,
        model,
        diffusion,
        cfg.model_copy(update={"ema_snapshot_stds": None}),
        out,
        progress=False,
        resume=False,
    )
    assert ema.snapshot_files(out / "ema") == []


@pytest.mark.parametrize(
    ("stds", "message"),
    [
        ([0.05, 0.3], "0.3 is not a profile's sigma_rel: allowed 0 < std < 0.2887"),
        ([0.05, 0.05], "each std may be listed once"),
        ([], "at least 1 item"),
    ],
)
def test_snapshot_stds_outside_the_profiles_fail_naming_the_key(stds, message):
    from ddpm.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=rf"train.*ema_snapshot_stds.*{message}"):
        TrainConfig.from_dict({"ema_snapshot_stds": stds}, "train")
