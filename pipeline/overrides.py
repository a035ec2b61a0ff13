"""Dotted-key parameter overrides (``train.lr: 3e-4``): as ``dvc exp run -S`` flags, or merged into params.yaml."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from pipeline import params


def read(path: str | Path) -> dict[str, Any]:
    """A mapping of dotted keys to values."""
    raw = params.read_yaml(path)
    bad = [key for key in raw if key.count(".") != 1]
    if bad:
        raise ValueError(f"{path}: keys must look like section.key, got {bad}")
    return raw


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` (params sections) with the dotted overrides applied."""
    merged = {section: dict(values or {}) for section, values in base.items()}
    for key, value in overrides.items():
        section, name = key.split(".")
        merged.setdefault(section, {})[name] = value
    return merged


def set_flags(overrides: dict[str, Any]) -> list[str]:
    """``-S key=value`` arguments for ``dvc exp run``."""
    return [arg for key, value in overrides.items() for arg in ("-S", f"{key}={json.dumps(value)}")]


def main(args: argparse.Namespace) -> None:
    overrides = read(args.overrides)
    if args.apply:
        merged = merge(params.read_yaml(args.apply), overrides)
        params.validate(merged)
        Path(args.apply).write_text(yaml.safe_dump(merged, sort_keys=False))
    else:
        print(shlex.join(set_flags(overrides)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("overrides", help="YAML file of section.key: value")
    parser.add_argument("--apply", metavar="PARAMS", help="merge into this params file instead of printing -S flags")
    params.run_stage(main, parser)
