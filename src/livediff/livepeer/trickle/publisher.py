"""Writing a trickle channel: ``POST <channel>/<seq>``, one segment per request, body streamed.

As go-livepeer's publisher does, sequence numbers start at 0, each segment's body is streamed
while it is written (the server relays it to subscribers as it comes in), and the request for
the next segment is opened before the current one ends (``preconnect``), so no segment waits for
a connection. A request that fails (a connection error, a server error) is made again with the
segment's bytes from the start, ``retries`` times, ``retry_delay_s`` apart; after that the
segment is lost and counted (:attr:`TricklePublisher.failures` in a row). A 404 means the
channel is gone: :attr:`TricklePublisher.gone` is set and later segments are dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx

from livediff.livepeer.trickle.protocol import is_transient

logger = logging.getLogger(__name__)


class PublishSegment:
    """One segment being sent: write its bytes, then close it. Event-loop only.

    Its bytes are kept until the server has taken the segment, so that a failed request can
    send it again from the start.
    """

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.failed = False
        self._chunks: list[bytes] = []
        self._closed = False
        self._changed = asyncio.Event()

    def write(self, data: bytes) -> None:
        """Queue bytes for the request body (never blocks; dropped once the segment failed)."""
        if data and not self._closed and not self.failed:
            self._chunks.append(data)
            self._changed.set()

    def close(self) -> None:
        """The segment is complete: the request body ends after the bytes written so far."""
        self._closed = True
        self._changed.set()

    async def body(self) -> AsyncIterator[bytes]:
        """The bytes written so far, then the rest as they are written, until closed."""
        sent = 0
        while True:
            while sent < len(self._chunks):
                sent += 1
                yield self._chunks[sent - 1]
            if self._closed:
                return
            self._changed.clear()
            await self._changed.wait()

    def done(self) -> None:
        """The server took it: its bytes are no longer needed."""
        self._chunks.clear()

    def discard(self) -> None:
        self.failed = True
        self.close()
        self._chunks.clear()


class TricklePublisher:
    """Segments written to one channel in order: 0, 1, 2, ..."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        mime_type: str,
        *,
        preconnect: bool = True,
        retries: int = 5,
        retry_delay_s: float = 0.5,
    ) -> None:
        self.client = client
        self.url = url.rstrip("/")
        self.mime_type = mime_type
        self.preconnect = preconnect
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.gone = False
        self.failures = 0  # segments lost in a row
        self.published = 0  # segments the server took
        self._seq = 0
        self._next: PublishSegment | None = None
        self._posts: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        """Requests not answered yet (the preconnected one included)."""
        return len(self._posts)

    def next_segment(self) -> PublishSegment:
        """The next segment to write (its request already open), opening the one after it."""
        segment = self._next or self._open()
        self._next = self._open() if self.preconnect else None
        return segment

    async def close(self, *, timeout_s: float = 10.0, delete: bool = False) -> None:
        """End the preconnected request, wait for the others, then (``delete``) DELETE the
        channel, as ai-runner does with the channels it publishes to."""
        if self._next is not None:
            self._next.close()
            self._next = None
        if self._posts:
            _, late = await asyncio.wait(set(self._posts), timeout=timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if delete and not self.gone:
            await self._delete()

    # -- requests -------------------------------------------------------------------------
    def _open(self) -> PublishSegment:
        segment = PublishSegment(self._seq)
        self._seq += 1
        task = asyncio.ensure_future(self._post(segment))
        self._posts.add(task)
        task.add_done_callback(self._posts.discard)
        return segment

    async def _post(self, segment: PublishSegment) -> None:
        url = f"{self.url}/{segment.seq}"
        for attempt in range(self.retries + 1):
            if self.gone:
                segment.discard()
                return
            try:
                response = await self.client.post(
                    url, content=segment.body(), headers={"Content-Type": self.mime_type}
                )
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    self._lost(segment, f"POST {url}: {exc!r}")
                    return
            else:
                if self._answered(segment, response, attempt < self.retries):
                    return
            await asyncio.sleep(self.retry_delay_s)

    def _answered(self, segment: PublishSegment, response: httpx.Response, retry: bool) -> bool:
        """Take the server's answer; False when the request should be made again."""
        status = response.status_code
        if status == httpx.codes.OK:
            self.failures = 0
            self.published += 1
            segment.done()
            return True
        if status == httpx.codes.NOT_FOUND:
            logger.info("%s is gone (404): the stream's channel was closed", self.url)
            self.gone = True
            segment.discard()
            return True
        if is_transient(status) and retry:
            return False
        self._lost(segment, f"POST {self.url}/{segment.seq}: status {status}")
        return True

    def _lost(self, segment: PublishSegment, reason: str) -> None:
        self.failures += 1
        segment.discard()
        logger.warning("%s (%d segments lost in a row)", reason, self.failures)

    async def _delete(self) -> None:
        try:
            await self.client.delete(self.url)
        except httpx.TransportError as exc:
            logger.info("DELETE %s failed: %r", self.url, exc)
