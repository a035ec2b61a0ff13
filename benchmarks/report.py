"""The report's markdown: tables, numbers, the machine, and the document the measurements' sections make up."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

GPU_REPORTS = Path(__file__).resolve().parent / "gpu"


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def num(x: float) -> str:
    """x with thousands separators from 100 up, three significant digits below."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def percent(x: float) -> str:
    """x (a fraction) in percent: whole percents from 1%, two significant digits below."""
    return f"{100 * x:.0f}%" if x >= 0.01 else f"{100 * x:.2g}%"


def check(ok: bool) -> str:
    """A target's verdict."""
    return "**met**" if ok else "**not met**"


def machine(device: torch.device, diffusers: str | None) -> dict[str, Any]:
    """CPU model, cores, torch version, threads, the OpenMP wait (and the GPU, if one is used)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "(unset)"),
        "python": platform.python_version(),
        "diffusers": diffusers or "not installed",
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def gpu_figures(folder: Path = GPU_REPORTS) -> list[str]:
    """The targets and tables of the GPU reports kept in ``folder`` (a CPU run cannot measure them)."""
    files = sorted(f for f in folder.glob("*.md") if f.name != "README.md")
    if not files:
        return ["Not measured: this run had no GPU (the harness uses one when torch sees it)."]
    out = [
        "This run had no GPU. These figures come from the harness's reports of GPU runs in `benchmarks/gpu/`"
        f" ({', '.join(f.name for f in files)}; its README.md sums them up).",
    ]
    for f in files:
        text = f.read_text().splitlines()
        out += ["", f"### `{f.name}`: {text[0].lstrip('# ')}", ""]
        out += [line for line in text if line.startswith(("Command:", "`python -m"))][:1]
        if "## Targets" in text:
            start = text.index("## Targets") + 1
            end = next((i for i in range(start, len(text)) if text[i].startswith("## ")), len(text))
            out += text[start:end]
        else:
            for line in text:
                if line.startswith("Sampling:"):
                    out += ["", line, ""]
                elif line.startswith("|"):
                    out.append(line)
    return out


def document(command: str, minutes: float, mach: dict[str, Any], targets: list[str], sections: list[list[str]]) -> str:
    """The results as markdown: the command and machine, the targets, then each measurement's section."""
    gpu = mach.get("gpu")
    lines = [
        f"# Benchmark results: GPU ({gpu})" if gpu else "# Benchmark results",
        "",
        f"Command: `{command}` ({minutes:.1f} min). Machine: " + ", ".join(f"{k} {v}" for k, v in mach.items()),
        "",
        "Every row is the median of several timed repetitions after warm-up; the rows of a group took turns within",
        "each repetition (side by side, in the same run), so ratios hold even on a shared, noisy machine. The",
        "machine is shared with other work, whose load slows every row: compare rows within this file, not with",
        "another run.",
        "",
        "## Targets",
        "",
        *targets,
    ]
    for section in sections:
        if section:
            lines += ["", *section]
    if not gpu:
        lines += ["", "## GPU figures", "", *gpu_figures()]
    return "\n".join(lines) + "\n"
