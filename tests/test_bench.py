"""The benchmark harness (``python -m benchmarks.bench``) on its quick configuration: it runs and writes the tables."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_native

ROOT = Path(__file__).resolve().parents[1]


def _table(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first markdown table after ``heading``."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[start:end]]
    return rows[2:]  # drop the header and the |---| line


def _number(cell: str) -> float:
    return float(cell.replace(",", "").replace("*", "").rstrip("x%"))


def test_the_throughput_only_run_times_ours_beside_the_peer_and_nothing_else(tmp_path):
    out = tmp_path / "throughput.md"
    command = [sys.executable, "-m", "benchmarks.bench", "--quick", "--reps", "1", "--throughput-only"]
    command += ["--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "--throughput-only" in text and "cpu " in text
    rows = _table(text, "## Throughput")
    assert {(r[1], r[2], r[3]) for r in rows} == {
        (task, precision, net)
        for task in ("train (img/s)", "sample (img-steps/s)")
        for precision in ("32-true", "bf16-mixed")
        for net in ("ours", "peer")
    }
    assert "## Memory" not in text and "## Levers" not in text  # the other sections did not run
    assert any(line.startswith("- Training, bf16-mixed:") for line in text.splitlines())


@pytest.mark.slow
def test_quick_bench_writes_well_formed_tables(tmp_path):
    out = tmp_path / "results.md"
    command = [sys.executable, "-m", "benchmarks.bench", "--quick", "--reps", "1", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert text.strip() in done.stdout  # the table is printed too
    assert "python -m benchmarks.bench --quick" in text and "cpu " in text and "torch " in text

    limits = _table(text, "## The machine's limit")
    assert {r[0] for r in limits} >= {"fp32 torch.mm", "bf16 torch.mm"}
    assert all(_number(r[1]) > 0 for r in limits)

    rows = _table(text, "## Throughput")
    precisions = ("32-true", "bf16-mixed")
    ours = [r for r in rows if r[3] == "ours"]
    peers = [r for r in rows if r[3] == "peer"]
    tasks = {(r[1], r[2]) for r in ours}
    assert len(ours) == len(tasks) == 4  # train and sample, fp32 and bf16-mixed
    assert {(r[1], r[2]) for r in peers} == tasks
    for r in ours:
        assert _number(r[4]) > 0 and _number(r[5]) > 0 and _number(r[6]) > 0 and r[7].endswith("%")
    if importlib.util.find_spec("diffusers") is None:
        assert all(r[4] == "not installed" for r in peers)
    else:
        for mine, peer in zip(ours, peers):
            assert abs(_number(peer[4]) / _number(mine[4]) - 1) <= 0.1  # the peer does the same work
            assert re.fullmatch(r"\*\*\d+\.\d\dx\*\*", mine[9])

    levers = _table(text, "## Levers")
    assert {r[0] for r in levers} >= {"channels_last", "decoder inputs as parts", "native GroupNorm+SiLU kernel"}
    assert {(r[1], r[2]) for r in levers} == {(t, p) for t in ("sampling step", "training step") for p in precisions}
    for r in levers:  # with and without the lever, and their ratio
        assert _number(r[3]) > 0 and _number(r[4]) > 0
        assert _number(r[5]) == pytest.approx(_number(r[3]) / _number(r[4]), rel=0.05, abs=0.01)
    described = text.split("What the levers do: ", 1)[1].split("\n", 1)[0]
    assert all(f"*{name}*: " in described for name in {r[0] for r in levers})
    memory = _table(text, "## Memory")
    samples = [r for r in memory if r[0].startswith("sample stage")]
    assert len(samples) >= 2 and any(r[0].startswith("training step") for r in memory)
    assert all(_number(r[4]) > 0 for r in memory)
    assert all(_number(r[3].split()[0]) > 0 for r in samples)  # the peak after the first chunks
    assert "Sampling memory (default malloc), chunks of 16: peak RSS" in text
    shares = _table(text, "## Where the time goes")
    nets = ("ours", "peer") if importlib.util.find_spec("diffusers") else ("ours",)
    expected = {(t, p, n) for t in ("train", "sample") for p in ("32-true", "bf16-mixed") for n in nets}
    assert len(shares) == len(expected) and {(r[0], r[1], r[2]) for r in shares} == expected
    for r in shares:
        assert _number(r[3]) > 0 and _number(r[4]) > 0  # time, and some of it in the convolutions
        assert abs(sum(_number(c) for c in r[4:]) - 100) <= 4  # the kinds add up (to rounding)
    # Fresh processes per start-up setting (allocator, OpenMP wait policy): a rate for every setting and row
    from benchmarks.process import PROCESS_SETTINGS, PROCESS_TASKS

    settings_rows = _table(text, "Settings applied at process start")
    names = [name for name, _, _ in PROCESS_SETTINGS]
    assert f"| net | img/s | {' | '.join(names)} |" in text
    assert {(r[0], r[1]) for r in settings_rows} == {(n, label) for n in nets for _, _, label in PROCESS_TASKS}
    assert all(_number(c) > 0 for r in settings_rows for c in r[2 : 2 + len(names)])
    phases = {r[0]: r for r in _table(text, "## Convolution phases")}
    assert list(phases) == ["forward", "input gradient", "weight gradient", "all"]
    assert all(_number(c) > 0 for r in phases.values() for c in r[1:])
    counts = {k: int(r[1]) for k, r in phases.items()}
    # every convolution has a forward and a weight gradient; all but the first (on the data) an input gradient
    assert counts["forward"] == counts["weight gradient"] == counts["input gradient"] + 1
    assert counts["all"] == sum(counts[k] for k in ("forward", "input gradient", "weight gradient"))
    assert re.search(r"would run at \d+% of the fp32 limit \(the whole step, measured above: \d+%\)", text)
    features = _table(text, "## Evaluation")
    assert features[0][0].startswith("classifier") and _number(features[0][1]) > 0


@pytest.mark.slow
def test_e2e_times_every_variant_of_the_stages_code(tmp_path, smoke_params):
    """``benchmarks.e2e --quick`` on the smoke configuration (8x8 digits): 3 steps and 16 images per variant,
    compiled variants traced with ``eager``, two variants at a time (the rows keep the variants' order)."""
    params, out = tmp_path / "params.yaml", tmp_path / "e2e.md"
    params.write_text(smoke_params)
    command = [sys.executable, "-m", "benchmarks.e2e", "--quick", "--params", str(params), "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    training, sampling = _table(text, "Each variant in a fresh process."), _table(text, "Sampling: ")
    assert [(r[0], r[1]) for r in training] == [("bf16-mixed", "false"), ("bf16-mixed", "eager"), ("32-true", "false")]
    assert [(r[0], r[1]) for r in sampling] == [
        ("32-true", "false"),
        ("bf16-mixed", "false"),
        ("32-true", "eager"),
        ("bf16-mixed", "eager"),
    ]
    for row in training:
        assert _number(row[2]) > 0 and _number(row[3]) > 0 and 0 < _number(row[4]) < 10
    for row in sampling:
        assert _number(row[2]) > 0 and _number(row[3]) > _number(row[2])  # img-steps/s = img/s x NFE
    assert "2 variants ran at a time, sharing the cores: these rates do not compare." in text


def test_flop_counts_of_both_nets_are_equal_with_our_native_kernels_on():
    """Same architecture, same FLOPs: the count must not miss the work of our native attention kernel, which the
    flop counter does not know (it counts the net's arithmetic through PyTorch's attention)."""
    pytest.importorskip("diffusers")
    import torch
    from benchmarks.calls import sample_step_flops
    from benchmarks.configs import tiny_model
    from benchmarks.peer import PeerNet

    from ddpm import kernels
    from ddpm.nets import UNet

    cfg = tiny_model()
    assert cfg.attn_resolutions and kernels.enabled()
    ours, peer = (sample_step_flops(net, cfg, torch.device("cpu")) for net in (UNet(cfg), PeerNet(cfg)))
    assert ours == peer > 0


def test_every_kernel_setting_is_a_lever_of_the_bench():
    """The lever rows take each fast path away through the kernel settings: every setting is measured, and every
    lever's change is one that ``ddpm.kernels.using`` takes."""
    import dataclasses

    from benchmarks.levers import LEVERS

    from ddpm import kernels

    changed = set()
    for lever in LEVERS:
        with kernels.using(**lever.without):
            changed |= {name for name, value in lever.without.items() if value != getattr(kernels.Settings(), name)}
    assert changed == {f.name for f in dataclasses.fields(kernels.Settings)}
    assert kernels.settings == kernels.Settings()


def test_op_kinds_count_every_convolution_path():
    from benchmarks.shares import op_kind

    for name in ("aten::mkldnn_convolution", "aten::convolution_backward", "ddpm::winograd_conv3x3", "_Conv3x3"):
        assert op_kind(name) == "convolutions"
    # ATen's im2col convolutions: bf16 autocast on a CPU without oneDNN's bf16 path (AVX2 only) runs them
    assert op_kind("aten::_slow_conv2d_forward") == op_kind("aten::_slow_conv2d_backward") == "convolutions"
    assert op_kind("aten::addmm") == "matmuls" and op_kind("aten::_convert_indices_from_coo_to_csr") == "other"


@pytest.mark.slow
def test_the_conditional_bench_compares_both_arms_under_one_protocol(tmp_path):
    out = tmp_path / "conditional.md"
    command = [sys.executable, "-m", "benchmarks.conditional", "--quick", "--scales", "0,1,2", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    rows = _table(out.read_text(), "# Conditional or unconditional default")
    assert [r[0] for r in rows][:1] == ["unconditional"] and len(rows) == 4
    assert [r[2] for r in rows] == ["-", "0", "1", "2"]
    assert all(_number(r[3]) > 0 and _number(r[5]) > 0 for r in rows)
    assert all(0 <= _number(r[4]) <= 100 for r in rows[1:])
    assert re.search(r"the (un)?conditional model has the lower FID", out.read_text())


@pytest.mark.slow
def test_time_to_fid_scores_ema_snapshots_along_each_recipe(smoke_repro, tmp_path):
    import torch

    from ddpm import export
    from test_pipeline import clone_project

    project = clone_project(smoke_repro[0], tmp_path / "project")  # its featurizer stage ran
    out, csv_dir, png = tmp_path / "ttf.md", tmp_path / "curves", tmp_path / "ttf.png"
    command = [sys.executable, "-m", "benchmarks.time_to_fid", "--quick", "--project", str(project)]
    command += ["--recipes", "ddpm,edm", "--minutes", "0.1", "--every", "0.04", "--ema-stds", "0.05,0.2"]
    command += ["--out", str(out), "--csv-dir", str(csv_dir), "--png", str(png), "--keep", str(tmp_path / "kept")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    for name in ("ddpm", "edm"):  # the final EMAs as model files
        files = ["model.pt", "model-ema_std-0.05.pt", "model-ema_std-0.2.pt"]
        models = [export.load_model(tmp_path / "kept" / name / f) for f in files]
        assert {m.config.preconditioning for m in models} == {name}
        weights = [torch.cat([p.flatten() for p in m.net.parameters()]) for m in models]
        assert not any(torch.equal(weights[i], weights[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
    for name in ("ddpm", "edm"):
        lines = (csv_dir / f"{name}.csv").read_text().splitlines()
        assert lines[0] == "minutes,step,images,fid,kid,confidence"
        table = [[float(v) for v in line.split(",")] for line in lines[1:]]
        assert len(table) >= 2
        minutes, steps = [r[0] for r in table], [r[1] for r in table]
        assert minutes == sorted(minutes) and steps == sorted(set(steps)) and steps[0] >= 1
        assert minutes[-2] < 0.1  # the budget stops training at the first logged step past 0.1 min
        assert all(r[2] == r[1] * 128 for r in table)  # images = steps x configs/ddpm.yaml's batch
        assert all(r[3] > 0 and 0 < r[5] <= 1 for r in table)
        assert len({r[3] for r in table}) == len(table)  # each snapshot holds other weights
    rows = _table(out.read_text(), "# Time to FID")
    assert [r[0] for r in rows if r[0]] == ["ddpm", "edm"]
    assert [r[9] for r in rows if r[0]] == ["dpmpp_2m, 15 steps"] * 2  # configs/ddpm.yaml's, not params.yaml's
    assert png.stat().st_size > 1000
    emas = _table(out.read_text(), "## The EMA's length")
    assert [r[:2] for r in emas] == [
        [name, "the run's own"] if i == 0 else ["", f"sigma_rel {std}"]
        for name in ("ddpm", "edm")
        for i, std in enumerate(["", "0.05", "0.2"])
    ]
    last_fid, name = {}, ""
    for row in rows:
        name = row[0] or name
        last_fid[name] = row[6]
    for name, first in (("ddpm", 0), ("edm", 3)):
        assert emas[first][2] == last_fid[name]  # the run's own EMA: its curve's last point
        fids = [_number(r[2]) for r in emas[first : first + 3]]
        assert all(f > 0 for f in fids) and len(set(fids)) == 3  # three EMA lengths, three sets of weights


def test_time_to_fid_refuses_an_unknown_recipe():
    command = [sys.executable, "-m", "benchmarks.time_to_fid", "--recipes", "ddpm,fast"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--recipes: unknown ['fast']" in done.stderr


@needs_native
def test_the_native_bench_times_every_kernel_arm_against_pytorchs_ops(tmp_path):
    from benchmarks import native

    from ddpm import kernels

    before = os.environ.get(kernels.ENV)
    out = tmp_path / "native.md"
    native.main(["--quick", "--out", str(out)])
    text = out.read_text()
    rows = _table(text, "# Native kernels on this CPU")
    assert [row[0] for row in rows] == list(native.ARMS)
    assert rows[0][2] == rows[0][4] == "1.00x"
    assert all(_number(cell) > 0 for row in rows for cell in row[1:])
    assert re.search(r"native kernels: (avx512|avx2|portable) vector path", text) and ".so" not in text
    assert os.environ.get(kernels.ENV) == before and kernels.settings == kernels.Settings()
