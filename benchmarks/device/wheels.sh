#!/usr/bin/env bash
# Run here (the CPU machine), from anywhere in the checkout: downloads into .whl/ every wheel that
# the lent GPU machine lacks, for its Python 3.12 (see /work/.library/device/KINDS.md: it has
# torch 2.11, transformers, huggingface-hub 1.33, safetensors, numpy, pillow, pytest, zipp; not
# PyAV, diffusers, pydantic, kornia, pytest-asyncio or torchao, and a typing-extensions of its own).
# .whl/ is ignored by git and travels with `carry: [".whl"]`; run.sh installs it into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/../.."

# One version of each (two stop the whole install there). Requirements, from each wheel's
# METADATA: diffusers needs importlib-metadata (zipp is there), huggingface-hub>=1.32 and
# safetensors>=0.8 (there); pydantic 2.14 needs typing-extensions>=4.16; kornia needs kornia-rs.
# torchao (unet_quantization fp8, 3.3 MiB) needs nothing but torch>=2.11 (there).
WHEELS=(
    av==18.1.0
    diffusers==0.42.1
    importlib-metadata==10.2.0
    pydantic==2.14.4
    pydantic-core==2.50.5
    pydantic-settings==2.16.3
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    python-dotenv==1.2.4
    kornia==0.9.0
    kornia-rs==0.2.0
    pytest-asyncio==1.5.0
    torchao==0.18.0
)
#: The most the wheels may weigh, in MiB...
LIMIT_MIB=60
#: ...and the working tree that travels with them (tracked and untracked files git does not
#: ignore, and the carried .whl/).
TRAVEL_LIMIT_MIB=64

mkdir -p .whl
rm -f .whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
size_mib=$(du -sm .whl | cut -f1)
ls -1 .whl
echo "${size_mib} MiB in .whl (limit ${LIMIT_MIB})"
if ((size_mib > LIMIT_MIB)); then
    echo "the wheels weigh more than ${LIMIT_MIB} MiB" >&2
    exit 1
fi
tree_bytes=$(git ls-files -z --cached --others --exclude-standard |
    du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
travel_mib=$((tree_bytes / 1048576 + size_mib))
echo "${travel_mib} MiB would travel with carry: [\".whl\"] (limit ${TRAVEL_LIMIT_MIB})"
if ((travel_mib > TRAVEL_LIMIT_MIB)); then
    echo "too much would travel: ignore or move the largest untracked files:" >&2
    git ls-files -z --others --exclude-standard | du -b --files0-from=- 2>/dev/null |
        sort -rn | head -n 5 >&2
    exit 1
fi
