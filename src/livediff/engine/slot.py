"""Size-1, newest-wins hand-off points between stages.

A slow consumer never makes a queue grow: a put replaces the waiting item, and the replaced
item is counted as dropped. Slots are thread-safe: the producer and the consumer may live on
different threads (event loop, decoder thread, worker thread).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SlotClosedError(Exception):
    """The slot was closed: no more items will come."""


class Slot(Generic[T]):
    """Holds at most one item; a put replaces the older one and reports it as dropped."""

    def __init__(
        self,
        on_put: Callable[[], None] | None = None,
        on_drop: Callable[[T], None] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._item: T | None = None
        self._closed = False
        self._on_put = on_put
        self._on_drop = on_drop
        self.dropped = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> bool:
        """Offer an item; returns False when the slot is closed (the item is discarded)."""
        with self._lock:
            if self._closed:
                return False
            displaced, self._item = self._item, item
            if displaced is not None:
                self.dropped += 1
        if displaced is not None and self._on_drop is not None:
            self._on_drop(displaced)
        self._notify()
        return True

    def take(self) -> T | None:
        """The waiting item, or None; never blocks."""
        with self._lock:
            item, self._item = self._item, None
        return item

    def ready(self) -> bool:
        return self._item is not None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._item = None
        self._notify()

    def _notify(self) -> None:
        if self._on_put is not None:
            self._on_put()


class AsyncSlot(Slot[T]):
    """A slot whose consumer awaits on an event loop; producers may be on any thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_drop: Callable[[T], None] | None = None,
    ) -> None:
        super().__init__(on_put=self._wake, on_drop=on_drop)
        self._loop = loop
        self._event = asyncio.Event()

    def _wake(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._event.set()
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._event.set)

    async def get(self) -> T:
        """Wait for the next item; raises :class:`SlotClosedError` once the slot is closed."""
        while True:
            self._event.clear()
            item = self.take()
            if item is not None:
                return item
            if self.closed:
                raise SlotClosedError
            await self._event.wait()
