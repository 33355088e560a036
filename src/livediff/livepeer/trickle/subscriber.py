"""Reading a trickle channel: ``GET <channel>/<seq>``, one segment per request, streamed.

The subscriber keeps go-livepeer's rules (``trickle/trickle_subscriber.go``):

- it starts at ``start_seq`` (``-1``: the next segment to be written, the live edge; ``-2``: the
  one being written now) and then follows the ``Lp-Trickle-Seq`` the server names;
- as soon as a segment's headers arrive it opens the request for the next one, so the next
  segment starts streaming the moment the publisher starts writing it;
- 470 (that segment is not in the server's ring) jumps to ``Lp-Trickle-Latest``;
- 404 (the channel is gone) and ``Lp-Trickle-Closed`` (it ended while the request waited) end
  the subscription;
- a request that waits longer than ``wait_s`` for its segment is made again (a quiet channel is
  not an error), and failures (connection errors, other statuses) are retried ``retries`` times,
  ``retry_delay_s`` apart, before :class:`TrickleError` is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import httpx

from livediff.livepeer.trickle.protocol import (
    LATEST_HEADER,
    NEXT_SEQ,
    SEQ_HEADER,
    SEQ_NOT_FOUND,
    TrickleError,
    header_int,
    is_closed,
)

logger = logging.getLogger(__name__)


class SubscribeSegment:
    """One segment being received: its sequence number and its bytes as they stream in."""

    def __init__(self, response: httpx.Response, seq: int) -> None:
        self.response = response
        self.seq = seq

    async def chunks(self) -> AsyncIterator[bytes]:
        """The segment's bytes as they arrive; raises :class:`TrickleError` if it breaks off."""
        try:
            async for chunk in self.response.aiter_raw():
                if chunk:
                    yield chunk
        except httpx.HTTPError as exc:
            raise TrickleError(f"segment {self.seq} broke off: {exc!r}") from exc
        finally:
            await self.aclose()

    async def read(self, limit: int) -> bytes:
        """The whole segment (at most ``limit`` bytes, else :class:`TrickleError`)."""
        data = bytearray()
        async for chunk in self.chunks():
            data += chunk
            if len(data) > limit:
                raise TrickleError(f"segment {self.seq} is larger than {limit} bytes")
        return bytes(data)

    async def aclose(self) -> None:
        await self.response.aclose()


class TrickleSubscriber:
    """Segments of one channel, in order, each opened before the previous one ends."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        *,
        start_seq: int = NEXT_SEQ,
        retries: int = 5,
        retry_delay_s: float = 0.5,
        wait_s: float = 20.0,
    ) -> None:
        self.client = client
        self.url = url.rstrip("/")
        self.seq = start_seq
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.wait_s = wait_s
        self.ended = False
        self._pending: asyncio.Task[tuple[httpx.Response, int] | None] | None = None

    async def next_segment(self) -> SubscribeSegment | None:
        """The next segment; None once the channel has ended. Raises :class:`TrickleError`."""
        if self.ended:
            return None
        pending, self._pending = self._pending, None
        connected = await (pending or self._connect(self.seq))
        if connected is None:
            self.ended = True
            return None
        response, asked = connected
        seq = header_int(response, SEQ_HEADER)
        seq = seq if seq is not None and seq >= 0 else max(asked, 0)
        self.seq = seq + 1
        self._pending = asyncio.ensure_future(self._connect(self.seq))
        return SubscribeSegment(response, seq)

    async def close(self) -> None:
        """Stop: the request opened for the next segment is cancelled (or its answer closed)."""
        self.ended = True
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError, TrickleError):
            connected = await pending
            if connected is not None:
                await connected[0].aclose()

    # -- one request, with its retries --------------------------------------------------------
    async def _connect(self, seq: int) -> tuple[httpx.Response, int] | None:
        """The answer for ``seq`` (or for the seq the server sent us to); None at the end."""
        failures = 0
        while True:
            try:
                response = await asyncio.wait_for(self._get(seq), self.wait_s)
            except (TimeoutError, httpx.ReadTimeout):
                logger.debug("%s/%d: nothing yet; asking again", self.url, seq)
                continue
            except httpx.TransportError as exc:
                failures = await self._failed(failures, f"GET {self.url}/{seq}: {exc!r}")
                continue
            if is_closed(response):
                await response.aclose()
                return None
            if response.status_code == httpx.codes.OK:
                return response, seq
            await response.aclose()
            if response.status_code == SEQ_NOT_FOUND:
                latest = header_int(response, LATEST_HEADER)
                logger.info("%s/%d is not on the server; going to %s", self.url, seq, latest)
                seq = latest if latest is not None else NEXT_SEQ
                failures = self._count(failures, f"GET {self.url}: 470 again and again")
                continue
            reason = f"GET {self.url}/{seq}: status {response.status_code}"
            failures = await self._failed(failures, reason)

    async def _get(self, seq: int) -> httpx.Response:
        request = self.client.build_request("GET", f"{self.url}/{seq}")
        return await self.client.send(request, stream=True)

    def _count(self, failures: int, reason: str) -> int:
        if failures >= self.retries:
            raise TrickleError(f"{reason} (gave up after {failures + 1} tries)")
        return failures + 1

    async def _failed(self, failures: int, reason: str) -> int:
        counted = self._count(failures, reason)
        logger.warning("%s; retrying (%d/%d)", reason, counted, self.retries)
        await asyncio.sleep(self.retry_delay_s)
        return counted
