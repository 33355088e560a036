"""The ``livediff`` command: ``livediff serve`` runs the service; ``livediff prepare-models``
downloads the diffusion model that ``serve`` will need.

Every option falls back to its ``LIVEDIFF_<NAME>`` environment variable, then to the default in
:class:`~livediff.config.Settings`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from livediff import __version__
from livediff.config import Settings

#: model options of serve and prepare-models: (flag, Settings field, argparse keyword arguments)
MODEL_OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "--model",
        "model",
        {"help": "diffusion model: hub id or local folder (stabilityai/sd-turbo)"},
    ),
    ("--vae", "vae", {"help": "Tiny AutoEncoder hub id or folder, or 'full' (madebyollin/taesd)"}),
    ("--model-dir", "model_dir", {"help": "hub download cache (default: MODEL_DIR or HF cache)"}),
]

#: serve options: (flag, Settings field, argparse keyword arguments)
SERVE_OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    *MODEL_OPTIONS,
    ("--dtype", "dtype", {"choices": ["auto", "float16", "bfloat16", "float32"]}),
    ("--compile", "compile", {"action": "store_true", "help": "torch.compile the model at load"}),
    (
        "--compile-mode",
        "compile_mode",
        {"choices": ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]},
    ),
    ("--host", "host", {"help": "address to listen on (default 127.0.0.1)"}),
    ("--port", "port", {"type": int, "help": "port to listen on (default 8000)"}),
    ("--pipeline", "pipeline", {"help": "transform: passthrough, diffusion or module:Class"}),
    ("--width", "width", {"type": int, "help": "default output width (default 512)"}),
    ("--height", "height", {"type": int, "help": "default output height (default 512)"}),
    ("--max-sessions", "max_sessions", {"type": int, "help": "sessions at once (default 4)"}),
    ("--max-batch", "max_batch", {"type": int, "help": "frames per transform call (default 4)"}),
    ("--device", "device", {"help": "auto, cpu, cuda or cuda:N (default auto)"}),
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
    ("--log-level", "log_level", {"choices": ["debug", "info", "warning", "error"]}),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livediff", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"livediff {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the service (HTTP API, WebRTC, WHIP, page)")
    for flag, field, kwargs in SERVE_OPTIONS:
        serve.add_argument(flag, dest=field, default=None, **kwargs)
    prepare = commands.add_parser(
        "prepare-models", help="download the diffusion model and VAE that serve will load"
    )
    for flag, field, kwargs in MODEL_OPTIONS:
        prepare.add_argument(flag, dest=field, default=None, **kwargs)
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
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


def prepare_models(args: argparse.Namespace) -> int:
    from livediff.transforms.diffusion.models import download

    settings = settings_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = download(settings.model, settings.vae, settings.model_dir)
    print(f"model: {paths.model}\nvae:   {paths.vae}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": serve,
    "prepare-models": prepare_models,
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
    except LookupError as exc:
        print(f"livediff: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
