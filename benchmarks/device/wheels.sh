#!/usr/bin/env bash
# Run here (the CPU machine), from the repository root: downloads into .whl/ the wheels that the
# lent GPU machine lacks (it has Python 3.12, torch, transformers, numpy, no diffusers, no PyAV,
# no pydantic). .whl/ is ignored by git and travels with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
rm -f .whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    av==18.1.0 diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 \
    python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5 importlib-metadata==10.2.0
du -sh .whl
