"""``StreamSwitch``: one Livepeer stream at a time on one engine; a newer one replaces it.

go-livepeer lends a runner one stream at a time and never stops a stream by request: a new stream
(a new ai-runner request id, a new ``POST /live-video-to-video``) replaces the running one. Every
Livepeer door keeps its streams in a switch, so that replacing, waiting for a stream and the
health go-livepeer reads work the same way behind each.

Invariant: :attr:`StreamSwitch.current` is the newest stream handed to :meth:`replace`, until it
ends or the switch stops. The stream it replaces is asked to stop in the same step (no reader
sees two current streams, or none between them); the door awaits its ``ended`` before the new
one takes the engine's session slot.
"""

from __future__ import annotations

import asyncio
from typing import Generic, Protocol, TypeVar

from livediff.engine import Engine, Health


class SwitchStoppedError(RuntimeError):
    """The switch (and so the door) was stopped: it takes and gives no more streams."""


class LivepeerStream(Protocol):
    """What a switch needs of a stream: its id, a way to ask it to stop, its end."""

    @property
    def id(self) -> str: ...

    @property
    def ended(self) -> asyncio.Event: ...

    def stop(self, reason: str) -> None:
        """Ask the stream to end (in the background); ``ended`` is set once it has."""


StreamT = TypeVar("StreamT", bound=LivepeerStream)


class StreamSwitch(Generic[StreamT]):
    """The engine's current Livepeer stream, replaced by a newer one; the door's health."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.started = 0
        self._current: StreamT | None = None
        self._stopped = False
        self._changed = asyncio.Event()

    @property
    def current(self) -> StreamT | None:
        """The stream served now (None between streams and once it ended)."""
        stream = self._current
        return stream if stream is not None and not stream.ended.is_set() else None

    @property
    def stopped(self) -> bool:
        return self._stopped

    def replace(self, stream: StreamT) -> StreamT | None:
        """Make ``stream`` current and ask the one it replaces (returned) to stop."""
        if self._stopped:
            raise SwitchStoppedError("the runner is stopped")
        previous, self._current = self._current, stream
        self.started += 1
        if previous is not None:
            previous.stop(f"stream {stream.id} replaced it")
        self._changed.set()
        return previous

    def release(self, stream: StreamT) -> None:
        """Forget ``stream`` if it is still current (it ended on its own)."""
        if self._current is stream:
            self._current = None
            self._changed.set()

    async def next_current(self) -> StreamT:
        """The current stream, once there is one; raises once the switch stops."""
        while True:
            if self._stopped:
                raise SwitchStoppedError("the runner is stopped")
            stream = self.current
            if stream is not None:
                return stream
            self._changed.clear()
            await self._changed.wait()

    async def stop(self, reason: str) -> None:
        """Stop taking streams, stop the current one and wait for it to end."""
        self._stopped = True
        stream, self._current = self._current, None
        self._changed.set()
        if stream is not None:
            stream.stop(reason)
            await stream.ended.wait()

    def health(self) -> Health:
        """The engine's LOADING or ERROR; else OK while a stream is served, IDLE without one."""
        status = self.engine.health()
        if status in ("LOADING", "ERROR"):
            return status
        return "OK" if self.current is not None else "IDLE"
