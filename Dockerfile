# livediff as a Livepeer live pipeline, in one of three modes (LIVEDIFF_RUNNER, read by
# docker/entrypoint.sh): "ai-runner" (default), ai-runner hosting livediff's diffusion transform;
# "native", livediff answering go-livepeer's live runner contract itself (trickle in and out); or
# "live-runner", livediff serve as a go-livepeer >= 0.9 Live Runner (registers itself when
# LIVEDIFF_LIVE_RUNNER_ORCH, _URL and _SECRET are set).
# Build, prepare models, list in aiModels.json and check it: docs/orchestrator.md.
#
#   docker build -t livediff-livepeer .
#   docker run --rm --gpus all -v ./models:/models -e PREPARE_MODELS=1 livediff-livepeer
#   docker run --rm --gpus all -v ./models:/models -p 8000:8000 livediff-livepeer
#   docker run --rm --gpus all -v ./models:/models -p 8000:8000 -e LIVEDIFF_RUNNER=native livediff-livepeer
#   docker run --rm --gpus all -v ./models:/models --network host -e LIVEDIFF_RUNNER=live-runner \
#       -e LIVEDIFF_LIVE_RUNNER_ORCH=... -e LIVEDIFF_LIVE_RUNNER_URL=... \
#       -e LIVEDIFF_LIVE_RUNNER_SECRET=... livediff-livepeer
#   docker run --rm --gpus all -v ./models:/models --network host livediff-livepeer livediff serve
#
# The base image brings CUDA 12.8, FFmpeg 7.1 (NVENC/NVDEC) under /usr/local, uv, git and a C
# toolchain, but no Python 3.11: uv installs one below.
FROM livepeer/ai-runner:live-base-v0.14.1

# ai-runner release (git tag of livepeer/ai-runner; v0.14.1 is commit 50a742ce).
ARG AI_RUNNER_REF=v0.14.1
# The CUDA 12.8 build of torch, as ai-runner's own live pipelines use on this base.
ARG TORCH_VERSION=2.7.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# torchvision of that torch, and timm: the safety filter's classifier (Freepik/nsfw_image_detector,
# an EVA-02) loads through transformers' timm wrapper, and timm imports torchvision.
ARG TORCHVISION_VERSION=0.22.1
ARG TIMM_VERSION=1.0.31
ARG PYTHON_VERSION=3.11

WORKDIR /app

# PyAV 14.4.0 has no CPython 3.11 wheel for this platform: it builds from source against the base
# image's FFmpeg 7.1, found through /usr/local/lib/pkgconfig.
ENV PKG_CONFIG_PATH=/usr/local/lib/pkgconfig \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    VIRTUAL_ENV=/app/.venv \
    PATH=/app/.venv/bin:$PATH

RUN uv venv --python "${PYTHON_VERSION}" /app/.venv

# 1. torch for CUDA 12.8 (with its CUDA libraries and triton) from PyTorch's index; first, so
#    that this multi-GB layer stays cached while the lock below changes.
# hadolint ignore=DL3059
RUN uv pip install --no-cache --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}+cu128"

# 1b. torchvision (PyTorch's index, like torch) and timm for the safety filter; no dependencies
#     of their own here: torch is above, numpy, Pillow, PyYAML and the hub come with the lock.
# hadolint ignore=DL3059
RUN uv pip install --no-cache --no-deps --index-url "${TORCH_INDEX}" \
        "torchvision==${TORCHVISION_VERSION}+cu128" \
    && uv pip install --no-cache --no-deps "timm==${TIMM_VERSION}"

# 2. Every other dependency of livediff and of ai-runner, exactly as locked (hash-checked;
#    docker/lock.sh makes the lock, which is complete but for torch).
COPY docker/requirements.lock docker/requirements.lock
RUN uv pip install --no-cache --no-deps --require-hashes -r docker/requirements.lock

# 3. ai-runner at its release tag; its dependencies came with the lock.
# hadolint ignore=DL3059
RUN uv pip install --no-cache --no-deps \
    "ai-runner @ git+https://github.com/livepeer/ai-runner@${AI_RUNNER_REF}#subdirectory=runner"

# 4. livediff itself; its wheel carries the demo page (src/livediff/web links to web/).
COPY pyproject.toml README.md ./
COPY src/ src/
COPY web/ web/
RUN uv pip install --no-cache --no-deps . \
    && python -c "import livediff.livepeer.airunner.pipeline, livediff.livepeer.native.app, runner.app, timm"

# 5. The entry point that picks the mode (LIVEDIFF_RUNNER); executable in the repository.
COPY docker/entrypoint.sh /usr/local/bin/livediff-entrypoint

# Orchestrators mount the models at /models and run this image offline; prepare mode
# (PREPARE_MODELS=1) goes online by itself. LIVEDIFF_* settings configure the transform,
# e.g. LIVEDIFF_MODEL, LIVEDIFF_VAE, LIVEDIFF_COMPILE (see docs/orchestrator.md). torch.compile's
# caches live in /models too, so what prepare mode compiled is reused when serving. The safety
# filter is on by default here (LIVEDIFF_SAFETY_CHECKER, the use_safety_checker param's default,
# as in Livepeer's StreamDiffusion pipeline); prepare mode fetches its classifier.
ENV MODEL_DIR=/models \
    HUGGINGFACE_HUB_CACHE=/models \
    HF_HUB_OFFLINE=1 \
    TORCHINDUCTOR_CACHE_DIR=/models/livediff--torch-compile \
    TRITON_CACHE_DIR=/models/livediff--torch-compile/triton \
    LIVEDIFF_PIPELINE=diffusion \
    LIVEDIFF_DEVICE=cuda \
    LIVEDIFF_HOST=0.0.0.0 \
    LIVEDIFF_H264_PRESET=superfast \
    LIVEDIFF_SAFETY_CHECKER=1 \
    LIVEDIFF_RUNNER=ai-runner \
    PIPELINE=live-video-to-video \
    MODEL_ID=livediff

ARG VERSION=undefined
ENV VERSION=${VERSION}

EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/livediff-entrypoint"]
CMD ["livediff-airunner"]
