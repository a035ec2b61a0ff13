"""One benchmark job in a fresh process, which prints one JSON line, and :class:`Jobs`, which runs them.

    python -m benchmarks.job sample --n 10000 --batch-size 250 --model '{"channels": 32, ...}'
    python -m benchmarks.job train --batch-size 128 --precision bf16-mixed --model '{...}'
    python -m benchmarks.job steps --batch-size 128 --sample-batch 256 --model '{...}' [--keep-freed-memory]

``sample`` runs the sample stage's function (:func:`pipeline.sample.write_samples`, which streams the chunks into
the ``.npz``) with one step per image (a chunk's memory does not depend on the step count) and reports the peak
resident memory, at its end and after its first ``EARLY_CHUNKS`` chunks (so that what the rest of the images add is
measured within one process); ``train`` does the same for three training steps. The peak is the kernel's high-water
mark of the resident set (``VmHWM``), reset just before the job through ``/proc/self/clear_refs``; where that is
unavailable it is ``ru_maxrss`` of the whole process. ``steps`` times sampling steps (one network evaluation at the
sampling batch size, fp32) and training steps (bf16-mixed and 32-true) of our net and of the peer, and counts the
page faults, so that settings applied at process start (``--keep-freed-memory``, the OpenMP wait policy in the
environment) can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks.calls import TrainStep
from benchmarks.configs import PRECISIONS, ROOT, diffusion_config
from benchmarks.peer import PeerNet, peer_version
from benchmarks.timing import in_turns
from ddpm import export, generate
from ddpm.config import SampleConfig
from ddpm.module import DiffusionModule
from ddpm.nets import UNet, UNetConfig
from ddpm.runtime import keep_freed_memory

MB = 1e6
EARLY_CHUNKS = 4  # the sample job also reports its peak after this many chunks


class Jobs:
    """``python -m benchmarks.job JOB...`` in fresh processes, at most ``at_once`` of them running at a time.

    A job is its arguments, or (arguments, environment variables to set, names to unset); ``env`` is set in
    every job's environment. The jobs start from a thread, so this process goes on meanwhile.
    """

    def __init__(self, jobs: list[Any], at_once: int = 1, env: dict[str, str] | None = None) -> None:
        self.commands = []
        for job in jobs:
            args, env_set, env_unset = job if isinstance(job, tuple) else (job, {}, ())
            job_env = {k: v for k, v in os.environ.items() if k not in env_unset} | env_set | (env or {})
            self.commands.append(([sys.executable, "-m", "benchmarks.job", *args], job_env))
        self.pool = ThreadPoolExecutor(max_workers=at_once)
        self.outputs = [self.pool.submit(self._run, command, job_env) for command, job_env in self.commands]
        self.pool.shutdown(wait=False)

    @staticmethod
    def _run(command: list[str], env: dict[str, str]) -> dict[str, Any]:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def results(self) -> list[dict[str, Any]]:
        """Each job's JSON line, once it has finished (the first failure raises, naming its command)."""
        return [output.result() for output in self.outputs]


def _status(field: str) -> float | None:
    """A memory field of /proc/self/status in MB, or None where there is no procfs."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 / MB if match else None


def reset_peak() -> bool:
    """Reset the resident-set high-water mark (Linux >= 4.0); False where it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status("VmHWM") is not None


def peak_mb(reset: bool) -> float:
    """Peak RSS in MB since the reset (or over the process's life)."""
    if reset:
        return _status("VmHWM")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, in kB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", choices=["sample", "train", "steps"])
    parser.add_argument("--model", required=True, help="UNetConfig as JSON")
    parser.add_argument("--n", type=int, default=10_000, help="images to draw (sample)")
    parser.add_argument("--batch-size", type=int, required=True, help="chunk (sample) or training batch size")
    parser.add_argument("--sample-batch", type=int, default=256, help="sampling batch size (steps)")
    parser.add_argument("--sampler", default="dpmpp_2m", help="sampler (sample)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed", help="training precision (train)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (steps)")
    parser.add_argument("--keep-freed-memory", action="store_true", help="apply ddpm.runtime.keep_freed_memory")
    args = parser.parse_args(argv)

    kept = keep_freed_memory() if args.keep_freed_memory else False
    cfg = UNetConfig.from_dict(json.loads(args.model), "model")
    torch.manual_seed(0)
    module = DiffusionModule(UNet(cfg), diffusion_config(cfg))
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    result = {"job": args.job, "batch_size": args.batch_size, "keep_freed_memory": kept}
    if args.job == "steps":
        nets = {"ours": module.net} | ({"peer": PeerNet(cfg)} if peer_version() else {})
        x, t = torch.randn(args.sample_batch, *shape), torch.full((args.sample_batch,), 500)
        batch = torch.rand(args.batch_size, *shape) * 2 - 1
        calls = {}
        for name, net in nets.items():

            def sample_step(net: torch.nn.Module = net) -> None:
                with torch.inference_mode():
                    net.eval()(x, t)
                net.train()

            calls[f"{name} sample"] = sample_step
            calls[f"{name} train"] = TrainStep(module, net, batch, "bf16-mixed")
            calls[f"{name} train32"] = TrainStep(module, net, batch, "32-true")
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        result |= {
            "seconds": {k: statistics.median(v) for k, v in in_turns(calls, args.reps, warmup=2).items()},
            "sample_batch": args.sample_batch,
            "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
        }
        print(json.dumps(result))
        return
    if args.job == "sample":
        # imported here, after torch: the package sets the stages' OpenMP environment, which the ``steps`` jobs
        # choose themselves
        from pipeline.sample import write_samples

        sample = SampleConfig(n=args.n, sampler=args.sampler, steps=1, batch_size=args.batch_size)
        plan = generate.plan(module.config, sample.sampler, sample.steps)
        chunks, early = generate.sample_batches, []

        def counted(*a: object, **k: object):  # the chunks as the stage gets them; the peak once it has a few
            for i, chunk in enumerate(chunks(*a, **k)):
                yield chunk
                if i + 1 == EARLY_CHUNKS:
                    early.append(peak_mb(reset))

        generate.sample_batches = counted
        with tempfile.TemporaryDirectory() as out:
            before, reset = _status("VmRSS"), reset_peak()
            write_samples(export.Model(module.net.eval(), module.config), plan, sample, Path(out), progress=False)
            peak = peak_mb(reset)
        early_n = min(args.n, EARLY_CHUNKS * args.batch_size)
        image_mb = shape[0] * shape[1] * shape[2] / MB
        result |= {"n": args.n, "output_mb": round(args.n * image_mb, 2)}
        result |= {"early_n": early_n, "early_peak_mb": round(early[0] if early else peak, 1)}
    else:
        step = TrainStep(module, module.net, torch.rand(args.batch_size, *shape) * 2 - 1, args.precision)
        before, reset = _status("VmRSS"), reset_peak()
        for _ in range(3):
            step()
        peak = peak_mb(reset)
        result["precision"] = args.precision
    result |= {
        "before_mb": round(before or 0.0, 1),
        "peak_mb": round(peak, 1),
        "peak_source": "VmHWM" if reset else "ru_maxrss",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
