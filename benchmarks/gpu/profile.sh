#!/usr/bin/env bash
# The GPU profile (configs/gpu.yaml) against its goals on this machine's GPU, in one process: the bf16 matmul limit,
# training and sampling of our net as the profile runs it against diffusers' UNet2DModel run eagerly, compile
# seconds and host-device synchronisations. Writes benchmarks/gpu/profile.md (--out to change); arguments go to
# `python -m benchmarks.gpu_profile` (--help). Run it from anywhere, with the project's .venv (or PYTHON=...).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" -m benchmarks.gpu_profile "$@"
