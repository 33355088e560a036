#!/usr/bin/env bash
# The one call on the lent GPU machine (README.md beside this file), from the repository root:
#
#   bash benchmarks/device/run.sh [--suite engine|next|models|video|compiled|frame]   # there, carry: [".whl"]
#   OUT=DIR bash benchmarks/device/run.sh --dry-run [--suite engine|next|models|video|compiled|frame]   # here
#
# Runs one suite's steps (suites.sh) in order, each under its own timeout, the whole within
# DEADLINE_S, and writes to $OUT (default /tmp/out) as it goes: run.txt (the machine, the plan,
# then a line per step as it ends), NAME.txt (each step's output) and NAME.json (each benchmark
# step's rows, rewritten after every row). Exits 1 when a step failed or ran out of time.
#
# --plan: only check that the suite's budgets fit the deadline (and write the plan to run.txt).
# --dry-run: the same steps on this machine's CPU with the tiny models at 64 px (the video suite's
# tiny Wan at 64x112 and 64x64), the current python
# (PYTHON, default python3; no .whl), the `eager` compile backend (traces and guards like inductor,
# generates no code) and FRAMES (default 4) frames per measurement.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1

#: The whole run ends within this many seconds (8 minutes less room to spare; a call may take 600).
DEADLINE_S=450
#: Installing the wheels (20 s at most) and reading the machine (10 s at most).
SETUP_BUDGET_S=30

usage() {
    echo "usage: [OUT=DIR] $0 [--suite engine|next|models|video|compiled|frame] [--dry-run] [--plan]" >&2
    exit 2
}

SUITE=engine
DRY_RUN=0
PLAN_ONLY=0
while (($#)); do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --plan) PLAN_ONLY=1 ;;
        --suite) (($# > 1)) || usage; SUITE=$2; shift ;;
        --suite=*) SUITE=${1#--suite=} ;;
        *) usage ;;
    esac
    shift
done

# shellcheck source=benchmarks/device/suites.sh
. benchmarks/device/suites.sh
declare -F "suite_$SUITE" >/dev/null || { echo "no suite '$SUITE' in suites.sh" >&2; usage; }

export OUT="${OUT:-/tmp/out}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"
RUN_LOG="$OUT/run.txt"
: >"$RUN_LOG"
FAILED=0

log() {
    echo "$*" | tee -a "$RUN_LOG"
}

# -- the plan: the suite's steps and budgets, checked against the deadline before anything runs
PLANNED_S=0
PLAN=()
# shellcheck disable=SC2329  # called by step
plan_step() {
    PLANNED_S=$((PLANNED_S + $2))
    PLAN+=("$1 ($2 s)")
}

# -- a step: COMMAND under timeout, output to $OUT/NAME.txt and the console, a line in run.txt
# shellcheck disable=SC2329  # called by step
run_step() {
    local name=$1 budget=$2 left started rc outcome
    shift 2
    left=$((DEADLINE_S - SECONDS))
    ((budget > left)) && budget=$left
    if ((budget <= 0)); then
        log "$(printf '%-22s not run: the run has used its %d s' "$name" "$DEADLINE_S")"
        FAILED=1
        return
    fi
    started=$SECONDS
    timeout --kill-after=10 "$budget" "$@" 2>&1 | tee "$OUT/$name.txt"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) outcome=ok ;;
        124 | 137) outcome="TIMED OUT (budget $budget s)" ;;
        *) outcome="FAILED (exit $rc)" ;;
    esac
    ((rc == 0)) || FAILED=1
    log "$(printf '%-22s budget %4d s  took %4d s  %s' "$name" "$budget" $((SECONDS - started)) \
        "$outcome")"
}

# suites.sh's steps call this: first to plan (MODE=plan), then to run (MODE=run).
MODE=plan
# shellcheck disable=SC2329  # called by the suite functions, which are called by name
step() {
    if [[ $MODE == plan ]]; then
        plan_step "$@"
    else
        run_step "$@"
    fi
}

# -- the machine
install_wheels() {
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        log "no wheels in .whl/: run benchmarks/device/wheels.sh here first, carry [\".whl\"]"
        exit 1
    fi
    timeout 20 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl >>"$RUN_LOG" 2>&1 || {
        log "installing the wheels failed (above)"
        exit 1
    }
    export PYTHONPATH="/tmp/site:$PWD/src:$PWD"
}

describe_machine() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$RUN_LOG"
    fi
    timeout 10 "$PYTHON" - >>"$RUN_LOG" 2>&1 <<'EOF'
import importlib.metadata as metadata
import platform

names = ["torch", "diffusers", "transformers", "huggingface-hub", "kornia", "pydantic"]
names += ["typing-extensions", "av", "pytest", "pytest-asyncio"]
versions = []
for name in names:
    try:
        versions.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        versions.append(f"{name} MISSING")
print(f"python {platform.python_version()}; " + ", ".join(versions))
EOF
}

if ((DRY_RUN)); then
    PYTHON=${PYTHON:-python3}
    PRESET=tiny SIZE=64 BACKEND=eager FRAMES=${FRAMES:-4}
    SDXL_PRESET=tiny-sdxl LARGE_SIZE=128
    VIDEO_PRESET=tiny VIDEO_WIDE_SIZE=64x112 VIDEO_SQUARE_SIZE=64x64
else
    PYTHON=python3
    PRESET=sd-turbo SIZE=512 BACKEND=inductor FRAMES=${FRAMES:-40}
    SDXL_PRESET=sdxl-turbo LARGE_SIZE=1024
    VIDEO_PRESET=wan-1.3b VIDEO_WIDE_SIZE=480x832 VIDEO_SQUARE_SIZE=512x512
fi
BENCH=("$PYTHON" benchmarks/gpu_engine.py --preset "$PRESET" --size "$SIZE" --frames "$FRAMES"
    --compile-backend "$BACKEND" --compile-mode reduce-overhead
    --compile-cache-dir /tmp/livediff-compile-cache --row-timeout "${ROW_TIMEOUT_S:-60}")
VIDEO=("$PYTHON" benchmarks/video.py --preset "$VIDEO_PRESET" --frames "$FRAMES"
    --row-timeout "${ROW_TIMEOUT_S:-60}")
PYTEST=("$PYTHON" -m pytest -m gpu -v -p no:cacheprovider -o addopts= --timeout=75 --durations=5)
mapfile -t GPU_TESTS < <(grep -rlE --include='*.py' 'pytest\.mark\.gpu' tests | sort)

if ((DRY_RUN)); then
    log "suite $SUITE, dry run on the CPU; deadline $DEADLINE_S s; $(date -u +%FT%TZ)"
else
    log "suite $SUITE; deadline $DEADLINE_S s; $(date -u +%FT%TZ)"
fi
"suite_$SUITE"
printf -v steps ', %s' "${PLAN[@]}"
log "plan: setup ($SETUP_BUDGET_S s)$steps: $((PLANNED_S + SETUP_BUDGET_S)) s"
if ((PLANNED_S + SETUP_BUDGET_S > DEADLINE_S)); then
    log "the suite's budgets add up to more than the deadline: shorten them in suites.sh"
    exit 1
fi
((${#GPU_TESTS[@]})) || { log "no gpu-marked tests under tests/"; exit 1; }
((PLAN_ONLY)) && exit 0

if ((DRY_RUN)); then
    export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    install_wheels
fi
describe_machine
MODE=run
"suite_$SUITE"
if ((FAILED)); then
    log "FAILED after $SECONDS s; in $OUT: $(cd "$OUT" && echo *)"
else
    log "ok in $SECONDS s; in $OUT: $(cd "$OUT" && echo *)"
fi
exit "$FAILED"
