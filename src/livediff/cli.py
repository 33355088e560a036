"""The ``livediff`` command: ``livediff serve`` runs the service; ``livediff runner`` answers
go-livepeer's live runner contract itself (trickle in and out, no ai-runner);
``livediff prepare-models`` downloads the diffusion model that ``serve`` will need;
``livediff tls-cert`` writes a self-signed certificate for ``serve --tls-cert/--tls-key``;
``livediff bench NAME`` runs a benchmark of a source checkout.

Every option falls back to its ``LIVEDIFF_<NAME>`` environment variable, then to the default in
:class:`~livediff.config.Settings`.
"""

from __future__ import annotations

import argparse
import logging
import ssl
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from livediff import __version__
from livediff.config import Settings
from livediff.logs import configure_logging


def choices_of(field: str) -> list[str]:
    """The values a Literal-typed Settings field takes (one source for the CLI and Settings)."""
    return [str(value) for value in get_args(Settings.model_fields[field].annotation)]


#: model options of serve and prepare-models: (flag, Settings field, argparse keyword arguments)
MODEL_OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "--model",
        "model",
        {"help": "diffusion model: hub id or local folder"},
    ),
    (
        "--vae",
        "vae",
        {"help": "Tiny AutoEncoder hub id or folder, or 'full'"},
    ),
    ("--model-dir", "model_dir", {"help": "hub download cache (default: MODEL_DIR or HF cache)"}),
    (
        "--video-checkpoint",
        "video_checkpoint",
        {
            "metavar": "FILE_OR_REPO:PATH",
            "help": "--pipeline video: a causal checkpoint (.pt or .safetensors, original Wan"
            " names) loaded over the model's transformer, a file or a hub repo_id:path",
        },
    ),
]

#: serve options: (flag, Settings field, argparse keyword arguments)
SERVE_OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    *MODEL_OPTIONS,
    ("--dtype", "dtype", {"choices": choices_of("dtype")}),
    ("--compile", "compile", {"action": "store_true", "help": "torch.compile the model at load"}),
    ("--compile-mode", "compile_mode", {"choices": choices_of("compile_mode")}),
    ("--host", "host", {"help": "address to listen on"}),
    ("--port", "port", {"type": int, "help": "port to listen on"}),
    (
        "--tls-cert",
        "tls_cert",
        {
            "metavar": "PATH",
            "help": "serve HTTPS on the port with this PEM certificate (needs --tls-key;"
            " `livediff tls-cert` writes a self-signed pair)",
        },
    ),
    ("--tls-key", "tls_key", {"metavar": "PATH", "help": "the certificate's PEM private key"}),
    ("--pipeline", "pipeline", {"help": "transform: passthrough, diffusion or module:Class"}),
    ("--width", "width", {"type": int, "help": "default output width"}),
    ("--height", "height", {"type": int, "help": "default output height"}),
    ("--max-sessions", "max_sessions", {"type": int, "help": "sessions at once"}),
    ("--max-batch", "max_batch", {"type": int, "help": "frames per transform call"}),
    ("--device", "device", {"help": "auto, cpu, cuda or cuda:N"}),
    (
        "--video-text-device",
        "video_text_device",
        {
            "choices": choices_of("video_text_device"),
            "help": "--pipeline video: where UMT5 runs (cpu: host memory, embeddings moved)",
        },
    ),
    ("--token", "token", {"help": "require 'Authorization: Bearer TOKEN' on session endpoints"}),
    (
        "--cors-origin",
        "cors_origins",
        {
            "nargs": "+",
            "metavar": "ORIGIN",
            "help": "origins allowed to call the API from a browser",
        },
    ),
    (
        "--ice-server",
        "ice_servers",
        {"nargs": "+", "metavar": "URL", "help": "STUN/TURN server URLs"},
    ),
    ("--web-dir", "web_dir", {"help": "serve the demo page from this folder"}),
    ("--log-level", "log_level", {"choices": choices_of("log_level")}),
    ("--log-format", "log_format", {"choices": choices_of("log_format")}),
    (
        "--debug-endpoints",
        "debug_endpoints",
        {"action": "store_true", "help": "serve GET /v1/debug/stats (memory, threads, tasks)"},
    ),
    (
        "--allow-model",
        "allow_models",
        {
            "action": "append",
            "metavar": "MODEL",
            "help": "a model id params may name besides --model and --vae (repeatable)",
        },
    ),
    (
        "--max-input-pixels",
        "max_input_pixels",
        {"type": int, "help": "larger input frames are scaled down before the transform"},
    ),
    ("--max-viewers", "max_viewers", {"type": int, "help": "WHEP viewers per session"}),
    (
        "--max-decode-pixels",
        "max_decode_pixels",
        {"type": int, "help": "larger video (coded size) is refused before it is decoded"},
    ),
    (
        "--session-rate",
        "session_rate_per_min",
        {"type": float, "help": "sessions and viewers one client IP may open a minute (0: any)"},
    ),
    (
        "--session-burst",
        "session_burst",
        {"type": int, "help": "sessions and viewers one client IP may open at once"},
    ),
]

#: The Live Runner door (go-livepeer >= 0.9): with --live-runner-orch, serve registers itself.
LIVE_RUNNER_OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("--live-runner-orch", "live_runner_orch", {"help": "orchestrator URL to register with"}),
    (
        "--live-runner-secret",
        "live_runner_secret",
        {"help": "the orchestrator's -orchSecret (better: LIVEDIFF_LIVE_RUNNER_SECRET)"},
    ),
    (
        "--live-runner-url",
        "live_runner_url",
        {"help": "where the orchestrator reaches this service, e.g. http://10.0.0.5:8000"},
    ),
    ("--live-runner-app", "live_runner_app", {"help": "the app name discovery lists"}),
    (
        "--live-runner-price",
        "live_runner_price",
        {"type": float, "help": "USD per --live-runner-price-unit (on-chain orchestrators)"},
    ),
    (
        "--live-runner-price-unit",
        "live_runner_price_unit",
        {"choices": ["hour", "720p", "fixed"], "help": "what the price is per"},
    ),
]
SERVE_OPTIONS += LIVE_RUNNER_OPTIONS


def with_default(field: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` whose help ends with the Settings default (the environment may override it)."""
    default = Settings.model_fields[field].get_default(call_default_factory=True)
    if default in (None, False, "", []) or "help" not in kwargs:
        return kwargs
    return {**kwargs, "help": f"{kwargs['help']} (default {default})"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livediff", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"livediff {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the service (HTTP API, WebRTC, WHIP, page)")
    for flag, field, kwargs in SERVE_OPTIONS:
        serve.add_argument(flag, dest=field, default=None, **with_default(field, kwargs))
    add_runner_parser(commands)
    prepare = commands.add_parser(
        "prepare-models", help="download the diffusion model and VAE that serve will load"
    )
    for flag, field, kwargs in MODEL_OPTIONS:
        prepare.add_argument(flag, dest=field, default=None, **with_default(field, kwargs))
    prepare.add_argument(
        "--pipeline",
        dest="pipeline",
        default=None,
        choices=["diffusion", "video"],
        help="video: fetch the causal video pipeline's Wan model (--model, default"
        " Wan-AI/Wan2.1-T2V-1.3B-Diffusers) instead of the diffusion model",
    )
    prepare.add_argument(
        "--controlnet",
        dest="controlnets",
        action="append",
        default=[],
        metavar="ID",
        help="also fetch this ControlNet (hub id; repeat for several) and the depth model",
    )
    prepare.add_argument(
        "--lora",
        dest="loras",
        action="append",
        default=[],
        metavar="ID",
        help="also fetch this LoRA (hub id of a repo with a LoRA safetensors file; repeat for"
        " several), e.g. latent-consistency/lcm-lora-sdv1-5 for use_lcm_lora",
    )
    prepare.add_argument(
        "--ip-adapter",
        dest="ip_adapter",
        nargs="?",
        const="",
        default=None,
        metavar="ID",
        help="also fetch the IP-Adapter of the model's family and its image encoder (default"
        f" {Settings.model_fields['ip_adapter_model'].default}, h94's layout)",
    )
    prepare.add_argument(
        "--ip-adapter-faceid",
        dest="ip_adapter_faceid",
        nargs="?",
        const="",
        default=None,
        metavar="ID",
        help="also fetch IP-Adapter FaceID for the model's family (default"
        " h94/IP-Adapter-FaceID) and its face model (insightface's buffalo_l from the hub"
        " mirror public-data/insightface)",
    )
    prepare.add_argument(
        "--depth-model",
        dest="depth_model",
        default=None,
        help="the depth preprocessor's model to fetch (default "
        f"{Settings.model_fields['depth_model'].default})",
    )
    prepare.add_argument(
        "--safety-model",
        dest="safety_model",
        default=None,
        help="the safety filter's NSFW classifier to fetch (fetched anyway when"
        f" LIVEDIFF_SAFETY_CHECKER is on; default {Settings.model_fields['safety_model'].default})",
    )
    add_tls_cert_parser(commands)
    add_bench_parser(commands)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the options given on the command line."""
    given = {
        field: getattr(args, field)
        for _, field, _ in SERVE_OPTIONS
        if getattr(args, field, None) is not None
    }
    return Settings(**given)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from livediff.server.app import create_app

    settings = settings_from_args(args)
    tls = tls_options(settings)  # a bad certificate or key fails here, before anything starts
    app = create_app(settings)  # a bad pipeline fails here, before logging is taken over
    configure_logging(settings.log_level, settings.log_format)
    run_uvicorn(uvicorn, app, settings, tls)
    return 0


def run_uvicorn(uvicorn: Any, app: Any, settings: Settings, tls: dict[str, str]) -> None:
    """Serve ``app`` until SIGTERM or SIGINT; then open requests get ``shutdown_timeout_s`` and
    the app's lifespan closes every session. uvicorn logs through livediff's handler. ``tls``
    (from :func:`tls_options`) makes it HTTPS."""
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        **tls,
    )


class TLSSetupError(ValueError):
    """The TLS certificate and key cannot serve HTTPS."""


def tls_options(settings: Settings) -> dict[str, str]:
    """uvicorn's ``ssl_certfile`` and ``ssl_keyfile`` for ``tls_cert`` and ``tls_key`` (none
    for plain HTTP), once they are known to load as a certificate and its unencrypted key."""
    if settings.tls_cert is None or settings.tls_key is None:
        return {}
    cert, key = (str(Path(path).expanduser()) for path in (settings.tls_cert, settings.tls_key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:  # a password callback, so that an encrypted key is refused, not asked for on a tty
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        if "PEM lib" in why:  # OpenSSL's word for a file it could not read as PEM
            why = "a file that is not PEM, or an encrypted key"
        raise TLSSetupError(
            f"cannot serve HTTPS with certificate {cert} and key {key} ({why}): both must be"
            " PEM files, the key unencrypted and the certificate's own; `livediff tls-cert`"
            " writes a matching pair"
        ) from exc
    return {"ssl_certfile": cert, "ssl_keyfile": key}


# -- livediff runner: the native runner contract (livediff.livepeer.native) ------------------------
def add_runner_parser(commands: Any) -> None:
    runner_parser = commands.add_parser(
        "runner",
        help="answer go-livepeer's live runner contract (trickle media, no ai-runner)",
        description="Serve GET /health, /hardware/info, /version and POST /live-video-to-video "
        "for a go-livepeer orchestrator; media and params travel over the stream's trickle "
        "channels. Also LIVEDIFF_RUNNER_* and the orchestrator's PIPELINE, MODEL_ID, AUTH_TOKEN.",
    )
    for flag, field, kwargs in SERVE_OPTIONS:
        runner_parser.add_argument(flag, dest=field, default=None, **with_default(field, kwargs))


def runner(args: argparse.Namespace) -> int:
    import uvicorn

    from livediff.livepeer.native.app import create_runner_app

    settings = settings_from_args(args)
    tls = tls_options(settings)
    app = create_runner_app(settings)
    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per trickle request
    run_uvicorn(uvicorn, app, settings, tls)
    return 0


def prepare_models(args: argparse.Namespace) -> int:
    from livediff.transforms.diffusion.models import (
        download,
        is_sdxl,
        locate_controlnet,
        locate_depth_model,
        locate_ip_adapter,
        locate_lora,
        locate_safety_model,
    )

    settings = settings_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if settings.pipeline == "video":
        return prepare_video_model(settings)
    paths = download(settings.model, settings.vae, settings.model_dir)
    print(f"model: {paths.model}\nvae:   {paths.vae}")
    for model_id in args.controlnets:
        print(f"controlnet: {locate_controlnet(model_id, settings.model_dir, download=True)}")
    if args.controlnets or args.depth_model:
        depth = args.depth_model or settings.depth_model
        print(f"depth: {locate_depth_model(depth, settings.model_dir, download=True)}")
    if settings.safety_checker or args.safety_model:
        safety = args.safety_model or settings.safety_model
        print(f"safety: {locate_safety_model(safety, settings.model_dir, download=True)}")
    for lora_id in args.loras:
        print(f"lora: {locate_lora(lora_id, settings.model_dir, download=True)}")
    if args.ip_adapter is not None:
        repo = args.ip_adapter or settings.ip_adapter_model
        sdxl = is_sdxl(paths.model)
        print(f"ip-adapter: {locate_ip_adapter(repo, settings.model_dir, sdxl, download=True)}")
    if args.ip_adapter_faceid is not None:
        prepare_faceid(args.ip_adapter_faceid, settings.model_dir, is_sdxl(paths.model))
    return 0


def prepare_faceid(repo: str, model_dir: str | None, sdxl: bool) -> None:
    """Fetch IP-Adapter FaceID (``repo``, default h94's) and its face model."""
    from livediff.transforms.diffusion.ip_adapter_params import FACE_MODEL_REPO, FACEID_REPO
    from livediff.transforms.diffusion.models import locate_face_model, locate_faceid_adapter

    adapter = locate_faceid_adapter(repo or FACEID_REPO, model_dir, sdxl, download=True)
    print(f"ip-adapter-faceid: {adapter}")
    print(f"face model: {locate_face_model(FACE_MODEL_REPO, model_dir, download=True)}")


def prepare_video_model(settings: Settings) -> int:
    """``prepare-models --pipeline video``: fetch the Wan model (transformer, VAE, UMT5 and
    tokenizer) and the causal checkpoint when one is configured."""
    from livediff.transforms.video.checkpoint import locate_checkpoint
    from livediff.transforms.video.models import locate, video_model

    print(f"video model: {locate(video_model(settings.model), settings.model_dir, download=True)}")
    if settings.video_checkpoint is not None:
        path = locate_checkpoint(settings.video_checkpoint, settings.model_dir, download=True)
        print(f"video checkpoint: {path}")
    return 0


# -- livediff tls-cert: a self-signed pair for serve --tls-cert/--tls-key -------------------------
def add_tls_cert_parser(commands: Any) -> None:
    tls_parser = commands.add_parser(
        "tls-cert",
        help="write a self-signed certificate and key for serve --tls-cert/--tls-key",
        description="Write a self-signed certificate (ECDSA P-256) valid for localhost, the "
        "loopback addresses, this machine's host name and every --host, and its private key "
        "(readable by you only), so that `livediff serve` can serve the studio over HTTPS to "
        "other machines. Browsers warn about a self-signed certificate until you trust it.",
    )
    tls_parser.add_argument("--cert", default="livediff-cert.pem", help="certificate file")
    tls_parser.add_argument("--key", default="livediff-key.pem", help="private key file")
    tls_parser.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        metavar="NAME",
        help="another DNS name or IP address browsers will use (repeatable), e.g. the LAN IP",
    )
    tls_parser.add_argument("--days", type=int, default=365, help="valid this many days")
    tls_parser.add_argument("--force", action="store_true", help="replace existing files")


def tls_cert(args: argparse.Namespace) -> int:
    from livediff.server.tls import default_hosts, write_self_signed

    try:
        made = write_self_signed(
            Path(args.cert), Path(args.key), default_hosts(args.hosts), args.days, force=args.force
        )
    except (OSError, ValueError) as exc:
        print(f"livediff: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {made.cert} and {made.key}: self-signed for {', '.join(made.hosts)},"
        f" valid {args.days} days\n"
        f"SHA-256 fingerprint: {made.fingerprint}\n"
        f"public key (SPKI) SHA-256: {made.spki_sha256}\n"
        f"serve: livediff serve --host 0.0.0.0 --tls-cert {made.cert} --tls-key {made.key}"
    )
    return 0


# -- livediff bench: benchmarks/<name>.py of a checkout (they are not part of the package) -----
#: Benchmark names that differ from their script's.
BENCH_ALIASES = {"worker": "diffusion_worker"}
#: Scripts in benchmarks/ that are not benchmarks.
BENCH_HELPERS = frozenset({"common", "baseline_server", "engine_cases"})


def bench_folders() -> list[Path]:
    """Where a checkout's benchmarks/ may be: beside the source tree of an editable install,
    then under the current directory."""
    return [Path(__file__).resolve().parents[2] / "benchmarks", Path.cwd() / "benchmarks"]


def find_benchmarks() -> Path | None:
    return next((folder for folder in bench_folders() if folder.is_dir()), None)


def bench_names(folder: Path) -> list[str]:
    scripts = {path.stem for path in folder.glob("*.py") if not path.stem.startswith("_")}
    scripts -= BENCH_HELPERS
    aliases = {alias for alias, script in BENCH_ALIASES.items() if script in scripts}
    return sorted((scripts - set(BENCH_ALIASES.values())) | aliases)


def add_bench_parser(commands: Any) -> None:
    folder = find_benchmarks()
    found = ", ".join(bench_names(folder)) if folder else "none: no benchmarks/ folder found"
    bench_parser = commands.add_parser(
        "bench",
        help="run a benchmark from a livediff checkout (benchmarks/<name>.py)",
        description="Run benchmarks/<name>.py of a livediff source checkout with this Python; "
        "the arguments after the name go to the benchmark (livediff bench NAME --help). "
        "Benchmarks are not part of the installed package.",
        epilog=f"benchmarks: {found}",
    )
    bench_parser.add_argument("name", help="the benchmark (see below)")
    bench_parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="its arguments")


def bench(args: argparse.Namespace) -> int:
    folder = find_benchmarks()
    if folder is None:
        looked = " or ".join(str(path) for path in bench_folders())
        raise LookupError(
            f"no benchmarks/ folder found (looked in {looked}): the benchmarks are not part of "
            "the livediff package; run this from a livediff source checkout "
            "(pip install -e '.[bench]' there)"
        )
    names = bench_names(folder)
    if args.name not in names and args.name not in BENCH_ALIASES.values():
        raise LookupError(f"unknown benchmark {args.name!r}; choose from: {', '.join(names)}")
    script = folder / f"{BENCH_ALIASES.get(args.name, args.name)}.py"
    try:
        return subprocess.call([sys.executable, str(script), *args.bench_args])
    except KeyboardInterrupt:
        return 130


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": serve,
    "runner": runner,
    "prepare-models": prepare_models,
    "tls-cert": tls_cert,
    "bench": bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            field = ".".join(str(part) for part in error["loc"]) or "settings"
            print(f"livediff: invalid {field}: {error['msg']}", file=sys.stderr)
        return 2
    except (LookupError, TLSSetupError) as exc:
        print(f"livediff: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
