"""A test double (a fake) of go-livepeer's trickle server, as an orchestrator runs it.

go-livepeer's server is Go and ships with the orchestrator, so tests and benchmarks of the native
runner (``livediff runner``) play the orchestrator's side with this one. It keeps the rules of
``trickle/trickle_server.go`` that a runner meets (see docs/orchestrator.md, "The native runner
contract", and the module docstring of :mod:`livediff.livepeer.trickle`):

- channels exist only when the orchestrator (the test) made them: HTTP creation is off, and a
  request for any other channel gets 404;
- ``POST <channel>/<seq>`` streams its body into the segment as it arrives; the segment is
  readable while it is written; the request is answered (``Lp-Trickle-Seq``) when the body ends;
  a preconnected POST still waiting for its first byte when the channel closes is answered with
  ``Lp-Trickle-Closed``;
- ``GET <channel>/<seq>``: ``-1`` is the next segment to be written, ``-2`` the one being written
  now (0 if none); a GET for the next segment waits for it; a seq not in the ring of the last 5
  segments (and not the next one) gets 470 with ``Lp-Trickle-Latest`` (the seq written next);
  headers go out with the first byte; a GET that ends without a byte names ``Lp-Trickle-Seq``,
  ``Lp-Trickle-Latest`` and, when the channel ended, ``Lp-Trickle-Closed``;
- ``GET <channel>/next`` answers the next seq; ``DELETE <channel>`` closes and removes a channel
  (later requests get 404); ``DELETE <channel>/<seq>`` closes one segment;
- deleting a stream's input channel closes its other three channels, as the orchestrator does.

For tests it also records every request (method, channel, seq, status, start and end time) and
can answer the next requests of a channel with an error status (``inject``). It runs as a real
HTTP server (uvicorn) on 127.0.0.1 in a thread and event loop of its own; the methods meant for
tests are thread-safe.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvicorn

RING = 5
SEQ_HEADER = "Lp-Trickle-Seq"
LATEST_HEADER = "Lp-Trickle-Latest"
CLOSED_HEADER = "Lp-Trickle-Closed"
T = TypeVar("T")
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class FakeSegment:
    """One segment: bytes written so far, readable by any number of subscribers meanwhile."""

    def __init__(self, idx: int) -> None:
        self.idx = idx
        self.data = bytearray()
        self.closed = False
        self.written = False  # a byte came in
        self._changed = asyncio.Condition()

    async def write(self, data: bytes) -> None:
        async with self._changed:
            self.data += data
            self.written = True
            self._changed.notify_all()

    async def close(self) -> None:
        async with self._changed:
            self.closed = True
            self._changed.notify_all()

    async def read_from(self, position: int) -> tuple[bytes, bool]:
        """Bytes after ``position`` (waiting for some), and whether the segment has ended."""
        async with self._changed:
            while len(self.data) <= position and not self.closed:
                await self._changed.wait()
            chunk = bytes(self.data[position:])
            return chunk, self.closed


class FakeChannel:
    """One channel: a ring of the last 5 segments and the seq that will be written next."""

    def __init__(self, name: str, mime_type: str) -> None:
        self.name = name
        self.mime_type = mime_type
        self.ring: list[FakeSegment | None] = [None] * RING
        self.next_write = 0
        self.closed = False

    def for_write(self, idx: int) -> FakeSegment:
        if idx == -1:
            idx = self.next_write
        existing = self.ring[idx % RING]
        if existing is not None and existing.idx == idx:
            return existing
        segment = FakeSegment(idx)
        self.ring[idx % RING] = segment
        return segment

    def for_read(self, idx: int) -> tuple[FakeSegment | None, int]:
        """The segment to read (created when it is the next one), and the resolved seq."""
        if idx == -1:
            idx = self.next_write
        elif idx == -2:
            idx = max(self.next_write - 1, 0)
        segment = self.ring[idx % RING]
        if segment is not None and segment.idx == idx:
            return segment, idx
        ahead_ok = idx == self.next_write or (self.next_write == 0 and idx == 1)
        if ahead_ok and not self.closed:
            segment = FakeSegment(idx)
            self.ring[idx % RING] = segment
            return segment, idx
        return None, idx

    def segments(self) -> list[FakeSegment]:
        return [segment for segment in self.ring if segment is not None]


@dataclass
class RequestRecord:
    method: str
    channel: str
    seq: str
    started: float
    ended: float = 0.0
    status: int = 0


@dataclass
class Fault:
    method: str
    channel: str
    status: int
    remaining: int


@dataclass(frozen=True)
class StreamChannels:
    """The four channels an orchestrator makes for one stream, as the runner is given them."""

    subscribe_url: str  # the runner reads the gateway's video here (<id>)
    publish_url: str  # the runner writes its output here (<id>-out)
    control_url: str  # params updates for the runner (<id>-control)
    events_url: str  # the runner's status and error events (<id>-events)
    names: tuple[str, str, str, str] = field(default=("", "", "", ""))


class FakeTrickleServer:
    """The double: an ASGI app, run by :meth:`start` on 127.0.0.1 (an ephemeral port)."""

    def __init__(self) -> None:
        self.channels: dict[str, FakeChannel] = {}
        self.streams: dict[str, tuple[str, ...]] = {}
        self.requests: list[RequestRecord] = []
        self.faults: list[Fault] = []
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- running ----------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> FakeTrickleServer:
        config = uvicorn.Config(
            self, host="127.0.0.1", port=0, log_level="warning", lifespan="off", http="h11"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="fake-trickle", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake trickle server did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def _run(self) -> None:
        assert self._server is not None
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._server.serve())
        finally:
            self._loop.close()

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        if self._loop is not None and self._loop.is_running():
            self._call(self._close_all())
        self._server.should_exit = True
        self._thread.join(timeout=15)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None, "the fake trickle server is not running"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=15)

    # -- what the orchestrator does (thread-safe) --------------------------------------------
    def create_stream(self, stream_id: str) -> StreamChannels:
        """The four channels of a stream, as an orchestrator makes them before it calls a runner."""
        names = (stream_id, f"{stream_id}-out", f"{stream_id}-control", f"{stream_id}-events")
        mimes = ("video/mp2t", "video/mp2t", "application/json", "application/json")

        async def make() -> None:
            for name, mime in zip(names, mimes, strict=True):
                self.channels[name] = FakeChannel(name, mime)
            self.streams[stream_id] = names

        self._call(make())
        subscribe, publish, control, events = (f"{self.url}/{name}" for name in names)
        return StreamChannels(subscribe, publish, control, events, names=names)

    def create_channel(self, name: str, mime_type: str = "application/octet-stream") -> str:
        async def make() -> None:
            self.channels[name] = FakeChannel(name, mime_type)

        self._call(make())
        return f"{self.url}/{name}"

    def delete_channel(self, name: str) -> bool:
        """As ``DELETE <channel>`` (deleting a stream's input closes its other channels)."""
        return self._call(self._delete(name))

    def inject(self, method: str, channel: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` ``method`` requests for ``channel`` with ``status``."""

        async def add() -> None:
            self.faults.append(Fault(method, channel, status, times))

        self._call(add())

    def segment_bytes(self, channel: str) -> dict[int, bytes]:
        """The segments of a channel still in its ring, by seq."""

        async def read() -> dict[int, bytes]:
            found = self.channels.get(channel)
            return {} if found is None else {s.idx: bytes(s.data) for s in found.segments()}

        return self._call(read())

    def records(self, method: str, channel: str) -> list[RequestRecord]:
        return [r for r in list(self.requests) if r.method == method and r.channel == channel]

    def in_flight(self, method: str, channel: str) -> int:
        """``method`` requests for ``channel`` not answered yet (e.g. subscribers waiting)."""
        return sum(1 for record in self.records(method, channel) if not record.ended)

    # -- channel lifecycle (server loop) -----------------------------------------------------
    async def _delete(self, name: str) -> bool:
        channel = self.channels.pop(name, None)
        if channel is None:
            return False
        await self._close_channel(channel)
        for other in self.streams.pop(name, ())[1:]:
            dependent = self.channels.pop(other, None)
            if dependent is not None:
                await self._close_channel(dependent)
        return True

    async def _close_channel(self, channel: FakeChannel) -> None:
        channel.closed = True
        for segment in channel.segments():
            await segment.close()
        channel.ring = [None] * RING

    async def _close_all(self) -> None:
        for name in list(self.channels):
            await self._delete(name)

    # -- HTTP (server loop) ------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method = scope["method"]
        parts = scope["path"].strip("/").split("/")
        channel, seq = parts[0], parts[1] if len(parts) > 1 else ""
        record = RequestRecord(method, channel, seq, time.monotonic())
        self.requests.append(record)
        status = await self._dispatch(method, parts, receive, send)
        record.status, record.ended = status, time.monotonic()

    async def _dispatch(self, method: str, parts: list[str], receive: Receive, send: Send) -> int:
        fault = self._fault(method, parts[0])
        if fault is not None:
            return await respond(send, fault, b"injected fault")
        if len(parts) == 1:
            return await self._channel_request(method, parts[0], send)
        if method == "POST":
            return await self._post(parts[0], parts[1], receive, send)
        if method == "GET":
            return await self._get(parts[0], parts[1], receive, send)
        if method == "DELETE":
            return await self._close_seq(parts[0], parts[1], send)
        return await respond(send, 405, b"Method not allowed")

    def _fault(self, method: str, channel: str) -> int | None:
        for fault in self.faults:
            if fault.method == method and fault.channel == channel and fault.remaining > 0:
                fault.remaining -= 1
                return fault.status
        return None

    async def _channel_request(self, method: str, name: str, send: Send) -> int:
        if method == "DELETE":
            if await self._delete(name):
                return await respond(send, 200, b"")
            return await respond(send, 400, b"Invalid stream")
        # POST <channel> would create it: HTTP creation is off on an orchestrator
        return await respond(send, 404, b"Stream not found")

    async def _post(self, name: str, seq: str, receive: Receive, send: Send) -> int:
        channel = self.channels.get(name)
        if channel is None:
            return await respond(send, 404, b"Stream not found", {"Connection": "close"})
        if not is_int(seq):
            return await respond(send, 400, b"Invalid idx")
        segment = channel.for_write(int(seq))
        total = await self._take_body(channel, segment, receive)
        if total < 0:  # the publisher went away
            await segment.close()
            return 499
        headers = {SEQ_HEADER: str(segment.idx)}
        if total == 0:
            channel.next_write = segment.idx + 1
            if channel.closed:
                headers[CLOSED_HEADER] = "terminated"
        await segment.close()
        return await respond(send, 200, b"", headers)

    async def _take_body(self, channel: FakeChannel, segment: FakeSegment, receive: Receive) -> int:
        """Stream the request body into the segment; its size, or -1 if the client vanished."""
        total = 0
        while True:
            message = await (receive() if total else first_message(receive, segment))
            if message is None:  # the segment was closed while the POST waited for a byte
                return 0
            if message["type"] == "http.disconnect":
                return -1
            body = message.get("body", b"")
            if body:
                if not total:
                    channel.next_write = segment.idx + 1
                await segment.write(body)
                total += len(body)
            if not message.get("more_body", False):
                return total

    async def _get(self, name: str, seq: str, receive: Receive, send: Send) -> int:
        channel = self.channels.get(name)
        if channel is None:
            return await respond(send, 404, b"Stream not found")
        if seq == "next":
            latest = str(channel.next_write)
            return await respond(send, 200, latest.encode(), {LATEST_HEADER: latest})
        if not is_int(seq):
            return await respond(send, 400, b"Invalid idx")
        segment, idx = channel.for_read(int(seq))
        if segment is None:
            return await self._not_there(channel, idx, send)
        streaming = asyncio.ensure_future(self._stream(channel, segment, send))
        watching = asyncio.ensure_future(wait_disconnect(receive))
        await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        watching.cancel()
        if not streaming.done():
            streaming.cancel()
            return 499
        return streaming.result()

    async def _not_there(self, channel: FakeChannel, idx: int, send: Send) -> int:
        """470 with the seq written next; once the channel ended, 200 with Lp-Trickle-Closed."""
        headers = {LATEST_HEADER: str(channel.next_write), SEQ_HEADER: str(idx)}
        if channel.closed:
            return await respond(send, 200, b"Entry not found", {**headers, CLOSED_HEADER: "1"})
        return await respond(send, 470, b"Entry not found", headers)

    async def _stream(self, channel: FakeChannel, segment: FakeSegment, send: Send) -> int:
        latest_at_start, position = channel.next_write, 0
        while True:
            chunk, ended = await segment.read_from(position)
            if chunk and position == 0:
                headers = {SEQ_HEADER: str(segment.idx), "Content-Type": channel.mime_type}
                if segment.idx != latest_at_start:
                    headers[LATEST_HEADER] = str(latest_at_start)
                await start(send, 200, headers)
            if chunk:
                position += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if ended:
                break
        if position == 0:
            headers = {SEQ_HEADER: str(segment.idx), LATEST_HEADER: str(channel.next_write)}
            if channel.closed:
                headers[CLOSED_HEADER] = "terminated"
            await start(send, 200, headers)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return 200

    async def _close_seq(self, name: str, seq: str, send: Send) -> int:
        channel = self.channels.get(name)
        if channel is None:
            return await respond(send, 404, b"Stream not found")
        if not is_int(seq):
            return await respond(send, 400, b"Invalid idx")
        segment = channel.ring[int(seq) % RING]
        if segment is None or segment.idx != int(seq):
            return await respond(send, 400, b"Nonexistent segment")
        await segment.close()
        return await respond(send, 200, b"")


async def first_message(receive: Receive, segment: FakeSegment) -> dict[str, Any] | None:
    """The first body message, or None if the segment closes before it comes (go-livepeer's
    timeoutReader ends a preconnected POST when its segment closes)."""
    receiving = asyncio.ensure_future(receive())
    closing = asyncio.ensure_future(wait_closed(segment))
    await asyncio.wait({receiving, closing}, return_when=asyncio.FIRST_COMPLETED)
    closing.cancel()
    if receiving.done():
        return receiving.result()
    receiving.cancel()
    return None


async def wait_closed(segment: FakeSegment) -> None:
    while not segment.closed:
        await segment.read_from(len(segment.data))


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        continue


def is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


async def start(send: Send, status: int, headers: dict[str, str]) -> None:
    encoded = [(key.lower().encode(), value.encode()) for key, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": encoded})


async def respond(
    send: Send, status: int, body: bytes, headers: dict[str, str] | None = None
) -> int:
    await start(send, status, {"Content-Type": "text/plain", **(headers or {})})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return status
