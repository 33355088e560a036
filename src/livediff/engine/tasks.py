"""Background tasks that someone must wait for at shutdown and whose failures must be heard."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any

logger = logging.getLogger(__name__)


class TaskSet:
    """Tasks started and forgotten by their owner: kept until done, their errors logged."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: a background task failed", self.owner, exc_info=task.exception())

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def wait(self) -> None:
        """Until every task started so far has ended (failures are logged, not raised)."""
        if self._tasks:
            await gather_logged(self.owner, list(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)


async def gather_logged(owner: str, awaitables: Iterable[Any]) -> list[Any]:
    """``asyncio.gather(..., return_exceptions=True)`` whose exceptions are logged, not lost."""
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            logger.error("%s: %r", owner, result, exc_info=result)
    return results
