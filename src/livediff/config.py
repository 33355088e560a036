"""Settings: the one place where tunables live.

Every field can be set from the environment as ``LIVEDIFF_<FIELD>`` (lists as JSON, e.g.
``LIVEDIFF_CORS_ORIGINS='["https://example.com"]'``) and most from ``livediff serve`` options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

H264Preset = Literal[
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"
]
VideoCodecName = Literal["vp8", "h264"]
DiffusionDtype = Literal["auto", "float16", "bfloat16", "float32"]
#: Guidance whose frame graphs may be planned: ``self`` (or none: no extra UNet rows), and the
#: kinds that add rows of the negative prompt.
FrameGraphGuidance = Literal["self", "initialize", "full"]


def _self_guidance() -> list[FrameGraphGuidance]:
    return ["self"]


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
UnetQuantization = Literal["none", "fp8"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
VideoTextDevice = Literal["auto", "cpu"]

#: The diffusion model and VAE a fresh install serves (the one place these names are written).
DEFAULT_MODEL = "stabilityai/sd-turbo"
DEFAULT_VAE = "madebyollin/taesd"
#: Most denoising steps one frame may take (each one is a row of the UNet batch).
MAX_STEPS = 4
#: The safety filter's NSFW classifier: Livepeer's StreamDiffusion default (an EVA-02 at 448 px
#: with the levels neutral, low, medium, high; transformers loads it through timm).
DEFAULT_SAFETY_MODEL = "Freepik/nsfw_image_detector"
#: The Tiny AutoEncoder of the SDXL family's latents: the default VAE stands for it when the
#: model is of that family (its UNet's config says so).
DEFAULT_SDXL_VAE = "madebyollin/taesdxl"


class Settings(BaseSettings):
    """Service configuration, read from ``LIVEDIFF_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="LIVEDIFF_", extra="ignore")

    # -- serving ---------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    pipeline: str = Field(
        "passthrough",
        description="Transform name (passthrough, diffusion, ...) or 'package.module:Class'.",
    )
    width: int = Field(512, ge=64, le=2048, multiple_of=8, description="Default output width.")
    height: int = Field(512, ge=64, le=2048, multiple_of=8, description="Default output height.")
    max_sessions: int = Field(4, ge=1, description="Sessions served at once; more get 503.")
    token: SecretStr | None = Field(
        None, description="When set, session endpoints require 'Authorization: Bearer <token>'."
    )
    cors_origins: list[str] = Field(default_factory=list)
    ice_servers: list[str] = Field(
        default_factory=list, description="STUN/TURN URLs, e.g. stun:stun.example.org:3478."
    )
    ice_username: str | None = None
    ice_credential: SecretStr | None = None
    web_dir: str | None = Field(None, description="Folder of the demo page; default: bundled.")
    log_level: LogLevel = "info"
    log_format: LogFormat = Field(
        "text",
        description="text, or json: one JSON object a line (ts, level, logger, msg, session_id).",
    )
    debug_endpoints: bool = Field(
        False, description="Serve GET /v1/debug/stats (memory, threads, fds, tasks, sessions)."
    )
    shutdown_timeout_s: float = Field(
        5.0, gt=0, le=600, description="On SIGTERM, open HTTP requests get this long to finish."
    )
    tls_cert: str | None = Field(
        None,
        description="PEM certificate (chain) file: with tls_key, serve HTTPS instead of HTTP on"
        " the same port (page, API, WHIP/WHEP); browsers give the camera only to https pages"
        " away from localhost. `livediff tls-cert` writes a self-signed pair.",
    )
    tls_key: str | None = Field(
        None, description="PEM private key file of tls_cert (unencrypted); set both or neither."
    )

    @field_validator("tls_cert", "tls_key")
    @classmethod
    def _check_tls_file(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).expanduser().is_file():
            raise ValueError(
                f"no file at {path!r}: give the path of a PEM file (`livediff tls-cert` writes a"
                " self-signed certificate and key)"
            )
        return path

    @model_validator(mode="after")
    def _check_tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                "tls_cert and tls_key go together: give both (--tls-cert and --tls-key, or"
                " LIVEDIFF_TLS_CERT and LIVEDIFF_TLS_KEY) to serve HTTPS, or neither for HTTP"
            )
        return self

    # -- limits (reliability and security) ---------------------------------------------------
    max_input_pixels: int = Field(
        1920 * 1080,
        ge=64 * 64,
        description="Input frames with more pixels are scaled down (aspect kept) on the worker"
        " thread before the transform.",
    )
    max_decode_pixels: int = Field(
        4096 * 2304,
        ge=64 * 64,
        description="Incoming video whose coded frame size (read from the VP8 key frame or"
        " H.264 SPS, before decoding) has more pixels is not decoded: its frames are dropped,"
        " and a session that keeps sending it is ended.",
    )
    max_sdp_bytes: int = Field(
        64 * 1024, ge=1024, le=1 << 20, description="Larger SDP offers get 400."
    )
    max_sdp_media: int = Field(
        3, ge=1, le=64, description="Offers with more m-lines get 400 (before they are parsed)."
    )
    session_rate_per_min: float = Field(
        60.0,
        ge=0,
        description="Sessions and WHEP viewers one client IP may open per minute (token bucket"
        " refill; 0 = no limit); more get 429 with Retry-After.",
    )
    session_burst: int = Field(
        10, ge=1, description="Sessions and viewers one client IP may open at once (bucket size)."
    )
    max_viewers: int = Field(
        8, ge=0, le=1000, description="WHEP viewers per session; more get 503 with Retry-After."
    )
    allow_models: list[str] = Field(
        default_factory=list,
        description="Model ids (hub ids or folders) params may name besides the configured"
        " model and vae; any other gets 422.",
    )
    ended_session_ttl_s: float = Field(
        60.0,
        ge=0,
        description="How long GET /v1/sessions/{id} still answers (state closed, end_reason)"
        " for a session the server ended.",
    )
    worker_restarts: int = Field(
        3,
        ge=0,
        le=100,
        description="Restarts of a failed worker (out of memory, died, hung) allowed in 10"
        " minutes; beyond them its sessions end and /health stays ERROR (after a hang, the"
        " service exits non-zero instead).",
    )
    batch_timeout_factor: float = Field(
        10.0,
        ge=0,
        description="Watchdog: a batch running longer than this many times the slowest batch"
        " seen since the worker started (at least batch_timeout_min_s) is hung; 0 = no limit.",
    )
    batch_timeout_min_s: float = Field(
        10.0, gt=0, description="Watchdog: the least time a batch may run before it is hung."
    )
    batch_timeout_first_s: float = Field(
        600.0,
        ge=0,
        description="Watchdog: the limit of a batch with a session or params that the worker"
        " has not run yet (the first batch after a load, which may still compile); 0 = none.",
    )
    load_timeout_s: float = Field(
        3600.0,
        ge=0,
        description="Watchdog: the limit of a load with its warm-up and of any other call on"
        " the worker thread (which may reload a model); 0 = no limit.",
    )

    # -- engine ----------------------------------------------------------------------------
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    max_batch: int = Field(4, ge=1, le=64, description="Frames of several sessions per batch.")
    transform_error_limit: int = Field(
        30, ge=1, description="Consecutive failed frames after which a session is ended."
    )
    stats_window_s: float = Field(5.0, gt=0, description="Window for fps and latency figures.")
    warmup_frames: int = Field(
        8, ge=1, le=64, description="Most test frames fed at warm-up until the transform answers."
    )
    pinned_buffers: int = Field(
        8, ge=1, le=64, description="Pinned host buffers per direction per worker (CUDA copies)."
    )
    batches_in_flight: int = Field(
        0,
        ge=0,
        le=2,
        description="Batches the worker launches before it waits for the oldest one's outputs:"
        " 2 overlaps launching the next batch with the device computing this one; 0 = auto (2"
        " where the transform computes on CUDA, 1 elsewhere, where process() is synchronous).",
    )

    # -- peers -----------------------------------------------------------------------------
    connect_timeout_s: float = Field(
        30.0, gt=0, description="A peer not connected within this time is closed."
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get 413.")
    max_json_depth: int = Field(
        32, ge=2, le=128, description="JSON bodies nesting arrays and objects deeper get 400."
    )
    body_drain_factor: int = Field(
        16, ge=1, description="An oversized body is read and dropped up to this many limits."
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 503 when full.")

    # -- video encoder (replaces aiortc's module constants) --------------------------------
    video_codecs: list[VideoCodecName] = Field(
        default_factory=lambda: list[VideoCodecName](["vp8", "h264"]),
        description="Preference order for the answer.",
    )
    video_bitrate_min: int = Field(300_000, ge=50_000)
    video_bitrate_start: int = Field(1_500_000, ge=50_000)
    video_bitrate_max: int = Field(4_000_000, ge=50_000)
    keyframe_interval_s: float = Field(2.0, gt=0, le=60)
    h264_preset: H264Preset = "veryfast"
    encoder_threads: int = Field(0, ge=0, description="0 = choose from the frame size.")
    nominal_fps: int = Field(
        30, ge=1, le=240, description="Frame rate encoders plan rate control and GOPs for."
    )

    # -- diffusion (--pipeline diffusion; livediff.transforms.diffusion) --------------------
    model: str = Field(
        DEFAULT_MODEL,
        description="Diffusers model: hub id or local folder (SD 1.5 / 2.1 / sd-turbo, SDXL).",
    )
    vae: str = Field(
        DEFAULT_VAE,
        description="Tiny AutoEncoder (hub id or folder), or 'full' for the model's own VAE.",
    )
    model_dir: str | None = Field(
        None,
        validation_alias=AliasChoices("model_dir", "LIVEDIFF_MODEL_DIR", "MODEL_DIR"),
        description="Hub download cache (LIVEDIFF_MODEL_DIR or MODEL_DIR); default: HF's cache.",
    )
    dtype: DiffusionDtype = Field(
        "auto", description="Weights and activations; auto = float16 on CUDA, float32 on CPU."
    )
    compile: bool = Field(False, description="torch.compile the UNet and the VAE at load.")
    compile_mode: CompileMode = Field(
        "max-autotune", description="torch.compile mode (max-autotune uses CUDA graphs)."
    )
    unet_quantization: UnetQuantization = Field(
        "none",
        description="fp8: the UNet's linear layers and 1x1 convolutions run as FP8 products"
        " (torchao, per-channel weight and per-row input scales; CUDA capability 8.9+, e.g."
        " Hopper, or the CPU's reference kernel; needs dtype bfloat16). See docs/diffusion.md.",
    )

    @field_validator("unet_quantization")
    @classmethod
    def _check_quantization_dtype(cls, value: str, info: ValidationInfo) -> str:
        if value == "fp8" and info.data.get("dtype") != "bfloat16":
            raise ValueError(
                "unet_quantization 'fp8' needs dtype 'bfloat16' (rowwise-scaled FP8 products"
                " write bfloat16)"
            )
        return value

    depth_model: str = Field(
        "depth-anything/Depth-Anything-V2-Small-hf",
        description="Depth model of the 'depth' ControlNet preprocessor (hub id or folder).",
    )
    safety_checker: bool = Field(
        False,
        description="Default of the use_safety_checker param: replace the output frames the"
        " NSFW classifier flags (off for serve; the orchestrator image turns it on).",
    )
    safety_model: str = Field(
        DEFAULT_SAFETY_MODEL,
        description="NSFW image classifier of the safety filter (hub id or folder; loaded with"
        " transformers' AutoModelForImageClassification).",
    )
    ip_adapter_model: str = Field(
        "h94/IP-Adapter",
        description="IP-Adapter weights in h94/IP-Adapter's layout (hub id or folder): the default"
        " of the ip_adapter.ipadapter_model_path param, allowed without --allow-model.",
    )
    style_image_max_bytes: int = Field(
        10_000_000, ge=1, description="Largest IP-Adapter style image fetched (bytes)."
    )
    style_image_timeout_s: float = Field(
        10.0, gt=0, description="Longest fetch of an IP-Adapter style image (seconds)."
    )
    style_image_allow_private: bool = Field(
        False,
        description="Fetch IP-Adapter style images from private, loopback and link-local"
        " addresses too (off: such URLs get 422; tests serving from 127.0.0.1 turn it on).",
    )
    prompt_cache_size: int = Field(64, ge=1, description="Prompt embeddings kept per worker.")
    compile_backend: str = Field(
        "inductor",
        description="torch.compile backend: inductor (kernels, CUDA graphs) or e.g. eager/aot_eager"
        " (tracing only: checks shapes and graph breaks fast, on any machine).",
    )
    compile_cache_dir: str | None = Field(
        None,
        description="Where compiled kernels are kept across restarts; default: MODEL_DIR/"
        "livediff-compile-cache when a model dir is set (else torch's own cache).",
    )
    batch_buckets: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8],
        description="Batch sizes (UNet rows, VAE frames) every call is padded to: each compiles"
        " once at load, and sessions joining or leaving pick one instead of recompiling.",
    )
    frame_graph: bool = Field(
        True,
        description="Run a batch that needs no ControlNet, feature bank or IP-Adapter as one"
        " function (encode, stream-batch steps, UNet, decode): under --compile, one compiled"
        " graph (one CUDA graph) per bucket of frames. Off: every batch runs in stages.",
    )
    frame_graph_steps: list[int] = Field(
        default_factory=lambda: [1],
        description="Under --compile, the step counts (len(t_index_list)) whose frame graphs are"
        " planned at load, at every bucket, for each of frame_graph_guidance; a batch of another"
        " step count or guidance runs in stages, compiled too.",
    )
    frame_graph_guidance: list[FrameGraphGuidance] = Field(
        default_factory=_self_guidance,
        description="Under --compile, the guidance whose frame graphs are planned (with each of"
        " frame_graph_steps): self (also no guidance), initialize, full. Each planned pair costs"
        " one compile per bucket at load.",
    )
    vae_dtype: DiffusionDtype = Field(
        "auto",
        description="VAE dtype; auto = the model dtype, but bfloat16 (or float32 where the device"
        " lacks bf16) for a full VAE that overflows in float16.",
    )
    compile_cache_size: int = Field(
        64, ge=8, description="Compiled graphs torch keeps per function (dynamo cache limit)."
    )
    similarity_max_skip: int = Field(
        10, ge=1, description="Most frames in a row the similarity filter may skip."
    )

    @field_validator("frame_graph_steps")
    @classmethod
    def _check_frame_graph_steps(cls, steps: list[int]) -> list[int]:
        if any(count < 1 or count > MAX_STEPS for count in steps):
            raise ValueError(f"frame_graph_steps must be 1 to {MAX_STEPS} steps each")
        return sorted(set(steps))

    @field_validator("batch_buckets")
    @classmethod
    def _check_buckets(cls, buckets: list[int]) -> list[int]:
        if not buckets or any(size < 1 or size > 256 for size in buckets):
            raise ValueError("batch_buckets must be 1 to 256 rows each, and at least one")
        return sorted(set(buckets))

    # -- video (--pipeline video; livediff.transforms.video) --------------------------------
    video_checkpoint: str | None = Field(
        None,
        description="Causal checkpoint (Self-Forcing / StreamDiffusionV2 / CausVid, original Wan"
        " names) loaded over the video model's transformer: a local .pt or .safetensors file, or"
        " a hub file as repo_id:path/in/repo (e.g. jerryfeng/StreamDiffusionV2:"
        "wan_causal_dmd_v2v/model.pt); prepare-models --pipeline video fetches it.",
    )
    video_text_device: VideoTextDevice = Field(
        "auto",
        description="Where the video pipeline's UMT5 text encoder runs: auto = the model's"
        " device, cpu = host memory (only the prompt embeddings move to the device).",
    )

    # -- orchestrator runner contract (livediff runner; livediff.livepeer.native) ----------------
    runner_pipeline: str = Field(
        "live-video-to-video",
        validation_alias=AliasChoices("runner_pipeline", "LIVEDIFF_RUNNER_PIPELINE", "PIPELINE"),
        description="Pipeline name /version and /hardware/info report (go-livepeer's PIPELINE).",
    )
    runner_model_id: str = Field(
        "livediff",
        validation_alias=AliasChoices("runner_model_id", "LIVEDIFF_RUNNER_MODEL_ID", "MODEL_ID"),
        description="model_id a stream request must name (go-livepeer's MODEL_ID).",
    )
    runner_auth_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices(
            "runner_auth_token", "LIVEDIFF_RUNNER_AUTH_TOKEN", "AUTH_TOKEN"
        ),
        description="When set, stream requests need 'Authorization: Bearer <it>' (AUTH_TOKEN).",
    )
    runner_status_interval_s: float = Field(
        10.0, gt=0, le=25, description="Seconds between status events (gateways stop at 30)."
    )
    runner_input_timeout_s: float = Field(
        60.0, gt=0, description="A stream whose input sends nothing for this long is stopped."
    )
    trickle_retries: int = Field(
        5, ge=0, le=100, description="Tries again a failed trickle request before giving up."
    )
    trickle_retry_delay_s: float = Field(
        0.5, ge=0, le=30, description="Seconds between tries of a failed trickle request."
    )
    trickle_wait_s: float = Field(
        20.0, gt=0, description="A trickle GET waiting longer for its segment is made again."
    )
    trickle_verify_tls: bool = Field(
        False,
        description="Verify trickle servers' TLS certificates (orchestrators use self-signed).",
    )

    # -- the Live Runner door (go-livepeer >= 0.9): registers itself with an orchestrator ------
    live_runner_orch: str | None = Field(
        None,
        description="The orchestrator's runner-facing URL (its -liveRunnerAddr); set to register.",
    )
    live_runner_secret: SecretStr | None = Field(
        None, description="The orchestrator's -orchSecret, to bootstrap the registration."
    )
    live_runner_url: str | None = Field(
        None, description="Where the orchestrator reaches this service (e.g. http://10.0.0.5:8000)."
    )
    live_runner_app: str = Field(
        "live-video-to-video/livediff", description="The app name discovery lists (pipeline/model)."
    )
    live_runner_id: str | None = Field(
        None, description="A runner id to propose at registration (default: the orchestrator's)."
    )
    live_runner_price: float | None = Field(
        None, gt=0, description="Price in USD per unit (needed on-chain; offchain: leave unset)."
    )
    live_runner_price_unit: Literal["hour", "720p", "fixed"] = Field(
        "hour", description="What live_runner_price is per: hour, 720p (at 30 fps) or fixed."
    )
    live_runner_gpu: int = Field(
        0, ge=-1, description="The CUDA device index reported in the registration (-1: none)."
    )
    live_runner_retry_max_s: float = Field(
        30.0, gt=0, description="Longest wait between tries while the orchestrator is unreachable."
    )

    @model_validator(mode="after")
    def _check_live_runner(self) -> Settings:
        if self.live_runner_orch and not (self.live_runner_url and self.live_runner_secret):
            raise ValueError(
                "registering with an orchestrator (live_runner_orch) needs live_runner_url "
                "(where the orchestrator reaches this service) and live_runner_secret (its "
                "-orchSecret)"
            )
        return self

    @model_validator(mode="after")
    def _check_bitrates(self) -> Settings:
        if not self.video_bitrate_min <= self.video_bitrate_start <= self.video_bitrate_max:
            raise ValueError(
                "video bitrates must satisfy video_bitrate_min <= video_bitrate_start"
                " <= video_bitrate_max"
            )
        return self
