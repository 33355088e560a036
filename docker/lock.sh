#!/usr/bin/env bash
# Regenerates docker/requirements.lock: every Python package of the orchestrator image except
# torch (installed from PyTorch's CUDA 12.8 index) and ai-runner (installed from its git tag with
# --no-deps), hash-pinned for CPython 3.11 on the base image's Ubuntu 22.04 (glibc 2.35).
# Inputs: livediff's dependencies with the `diffusion` extra (../pyproject.toml) and ai-runner
# v0.14.1's own pins (airunner-requirements.txt), resolved together so that one environment
# satisfies both. Needs uv (pip install uv) and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile pyproject.toml docker/airunner-requirements.txt \
    --extra diffusion \
    --override docker/lock-overrides.txt \
    --python-version 3.11 \
    --python-platform x86_64-manylinux_2_35 \
    --index-url https://pypi.org/simple \
    --generate-hashes \
    --custom-compile-command "docker/lock.sh" \
    --output-file docker/requirements.lock
