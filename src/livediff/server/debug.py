"""GET /v1/debug/stats (only with ``--debug-endpoints``): what a soak test watches for leaks."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends

from livediff.server.http import bearer_auth
from livediff.server.service import LivediffService

PROC_SELF = Path("/proc/self")


def process_stats() -> dict[str, int | None]:
    """Resident memory, OS threads and open file descriptors of this process (from /proc;
    None where there is no /proc), and its Python threads."""
    stats: dict[str, int | None] = {
        "rss_bytes": None,
        "threads": None,
        "open_fds": None,
        "python_threads": threading.active_count(),
    }
    try:
        resident_pages = int((PROC_SELF / "statm").read_text().split()[1])
        stats["rss_bytes"] = resident_pages * os.sysconf("SC_PAGE_SIZE")
        stats["threads"] = len(list((PROC_SELF / "task").iterdir()))
        stats["open_fds"] = len(list((PROC_SELF / "fd").iterdir()))
    except (OSError, ValueError, IndexError):
        pass  # not Linux: the figures stay None
    return stats


def service_stats(service: LivediffService) -> dict[str, int]:
    """What the service holds: sessions, viewers, remembered ends, limiter entries, tasks, and
    the objects the garbage collector tracks (a leak of peers or frames shows there)."""
    return {
        "asyncio_tasks": len(asyncio.all_tasks()),
        "python_objects": _live_objects(),
        "sessions": len(service.records),
        "engine_sessions": len(service.engine.sessions),
        "worker_sessions": len(service.engine.worker.attached),
        "viewers": sum(len(record.viewers) for record in service.records.values()),
        "ended_sessions": len(service.ended),
        "rate_limited_clients": len(service.limiter),
        "background_tasks": len(service.tasks) + len(service.engine.tasks),
    }


def _live_objects() -> int:
    """Objects the garbage collector tracks, after a full collection (so garbage that merely
    waits for the collector does not count)."""
    gc.collect()
    return len(gc.get_objects())


def debug_router(service: LivediffService) -> APIRouter:
    router = APIRouter(prefix="/v1/debug", tags=["debug"])
    auth = [Depends(bearer_auth(service.settings))]

    @router.get("/stats", dependencies=auth)
    async def stats() -> dict[str, Any]:
        """Process figures (RSS, threads, fds) and what the service holds (sessions, tasks)."""
        return {**process_stats(), **service_stats(service)}

    return router
