"""Real servers for tests and benchmarks: an ASGI app under uvicorn on 127.0.0.1, in this process.

:func:`serve_app` runs any app (the livediff service, the benchmarks' aiortc baseline) on an
ephemeral port in a thread of its own, on uvicorn's own event loop, until it is stopped.
:func:`start_server` does that for ``create_app(settings)`` and, if asked, waits until the
transform has loaded. Frames, sessions and HTTP go through the same code as in ``livediff
serve``; only the process is shared, so a test can reach into the service.

uvicorn, FastAPI and the service are imported only when a server starts: importing this module
costs nothing where just the diffusion packages are installed (the GPU machine's test runs).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from livediff.config import Settings
    from livediff.server.service import LivediffService

HOST = "127.0.0.1"


@dataclass
class ThreadedServer:
    """uvicorn serving an app on 127.0.0.1 in a daemon thread: its base URL, server and thread."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 20.0) -> None:
        """Ask uvicorn to exit (lifespan shutdown included) and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout=timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server whose own URL must be
    known before it starts, e.g. a Live Runner that registers it)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def serve_app(
    app: Any,
    *,
    name: str = "uvicorn",
    ready_timeout: float = 60.0,
    lifespan: Literal["auto", "on", "off"] = "on",
    tls: tuple[str, str] | None = None,
    port: int = 0,
) -> ThreadedServer:
    """Run ``app`` under uvicorn on ``port`` (0: an ephemeral one) until it listens (lifespan
    startup done); with ``tls`` (certificate and key PEM files), over HTTPS.

    Raises RuntimeError when the thread dies or ``ready_timeout`` seconds pass first.
    """
    import uvicorn

    cert, key = tls or (None, None)
    config = uvicorn.Config(
        app,
        host=HOST,
        port=port,
        log_level="warning",
        lifespan=lifespan,
        ssl_certfile=cert,
        ssl_keyfile=key,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the {name} server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    scheme = "https" if tls else "http"
    return ThreadedServer(f"{scheme}://{HOST}:{port}", server, thread)


@dataclass
class LiveServer(ThreadedServer):
    """A running livediff server: its base URL, uvicorn, the app and the service inside it."""

    app: FastAPI

    @property
    def service(self) -> LivediffService:
        service: LivediffService = self.app.state.livediff
        return service


def start_server(
    settings: Settings,
    ready_timeout: float = 60.0,
    *,
    wait_for_model: bool = True,
    port: int = 0,
) -> LiveServer:
    """Run ``create_app(settings)`` under uvicorn on 127.0.0.1 (an ephemeral port) until HTTP is
    up and, with ``wait_for_model``, the transform has loaded (/health no longer LOADING).
    With ``tls_cert`` and ``tls_key`` set it serves HTTPS (its ``url`` says https)."""
    from livediff.server.app import create_app

    app = create_app(settings)
    deadline = time.monotonic() + ready_timeout
    tls = (settings.tls_cert, settings.tls_key) if settings.tls_cert and settings.tls_key else None
    served = serve_app(app, ready_timeout=ready_timeout, tls=tls, port=port)
    live = LiveServer(served.url, served.server, served.thread, app)
    while wait_for_model and live.service.engine.health() == "LOADING":
        if time.monotonic() > deadline:
            live.stop()
            raise RuntimeError("the livediff server's transform did not load")
        time.sleep(0.02)
    return live
