"""The DTLS diagnostics are installed when the service starts, never by an import.

Each check runs in a fresh interpreter: in this one, another test may have started a service.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

#: Imports everything a server imports, then starts a service the way an app that mounts it
#: does (create_app's app runs the same lifespan).
SCRIPT = textwrap.dedent(
    """
    import asyncio

    from fastapi import FastAPI

    import livediff.media.peer
    from livediff.config import Settings
    from livediff.media import dtls_compat
    from livediff.server.app import create_app, mount_service
    from livediff.server.service import LivediffService

    create_app(Settings())
    service = LivediffService(Settings())
    app = FastAPI(lifespan=service.lifespan)
    mount_service(service, app)
    print("imported", dtls_compat.installed())


    async def start() -> None:
        async with service.lifespan(app):
            print("started", dtls_compat.installed())


    asyncio.run(start())
    """
)


def test_dtls_diagnostics_are_installed_by_the_service_start_not_by_imports() -> None:
    ran = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split("\n")[:2] == ["imported False", "started True"], ran.stdout
