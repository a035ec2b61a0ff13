"""Dotted-key parameter overrides (``train.lr: 3e-4``): as ``dvc exp run -S`` flags, or merged into params.yaml.

python -m pipeline.overrides configs/smoke.yaml                        # print the -S flags
python -m pipeline.overrides configs/smoke.yaml --apply params.yaml    # merge into a params file
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from ddpm.config import ConfigError
from pipeline import params


def check_keys(keys: Iterable[str], where: str) -> None:
    """ConfigError unless every key looks like ``section.key``."""
    bad = [key for key in keys if not isinstance(key, str) or key.count(".") != 1]
    if bad:
        raise ConfigError(f"{where}: keys must look like section.key, got {bad}")


def read(path: str | Path) -> dict[str, Any]:
    """A YAML file of dotted keys and their values."""
    raw = params.read_yaml(path)
    check_keys(raw, str(path))
    return raw


def assignment(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value, as ``dvc exp run -S`` reads it (an argparse type)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, yaml.safe_load(value)


def lookup(base: dict[str, Any], key: str) -> Any:
    """The value of a dotted key in ``base`` (params sections); None when absent."""
    section, name = key.split(".")
    return (base.get(section) or {}).get(name)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` (params sections) with the dotted overrides applied."""
    merged = {section: dict(values or {}) for section, values in base.items()}
    for key, value in overrides.items():
        section, name = key.split(".")
        merged.setdefault(section, {})[name] = value
    return merged


def differences(base: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
    """``param key: old -> new`` for every override whose value differs from ``base``'s."""
    return [
        f"param {key}: {lookup(base, key)!r} -> {value!r}"
        for key, value in overrides.items()
        if lookup(base, key) != value
    ]


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", help="YAML file of section.key: value")
    parser.add_argument("--apply", metavar="PARAMS", help="merge into this params file instead of printing -S flags")
    params.run_stage(main, parser)
