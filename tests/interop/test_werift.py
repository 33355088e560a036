"""werift, a WebRTC stack written in TypeScript (neither aiortc nor Chromium), publishing to a real
livediff server over WHIP and watching its output over WHEP (issue 19, item 6).

The clients are the Node.js scripts beside this file (``whip-publish.mjs``, ``whep-watch.mjs``):
ICE, DTLS, SRTP and RTCP are werift's; the RTP payloads (VP8 per RFC 7741, H.264 per RFC 6184)
the scripts make and take apart themselves. The test encodes numbered frames with PyAV into an
IVF file, the publisher sends them at 30 fps (looping the file), livediff (passthrough,
384 -> 256) processes them, and the viewer writes the whole frames it received to another IVF
file, which the test decodes with PyAV: every frame must decode at the session's size, in the
order sent, and carry a frame number the publisher sent.

werift comes from the npm registry (``package.json``, ``package-lock.json``); a missing or
stale ``node_modules`` is installed with ``npm ci``. Without Node.js or npm the tests skip.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import struct
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import httpx
import pytest

from livediff.testing.framecode import Scene, numbered_frame, read_frame_number
from livediff.testing.servers import LiveServer

HERE = Path(__file__).resolve().parent
NODE, NPM = shutil.which("node"), shutil.which("npm")
MIN_NODE = 18  # global fetch; werift 0.24 itself asks for Node.js 16 or newer

SOURCE, OUTPUT, FPS = 384, 256, 30  # the passthrough transform scales 384 -> 256
SOURCE_FRAMES = 4 * FPS  # the publisher loops them
VIEWER_FRAMES = 60
TOKEN = "werift-t0ken"
FOURCC = {"vp8": b"VP80", "h264": b"H264"}
RTPMAP = {"vp8": "VP8", "h264": "H264"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        NODE is None or NPM is None,
        reason="werift (a TypeScript WebRTC stack) needs Node.js and npm on PATH "
        f"(node: {NODE}, npm: {NPM})",
    ),
]


# ------------------------------------------------------------------ werift from the npm registry


def installed_version(package: str) -> str | None:
    manifest = HERE / "node_modules" / package / "package.json"
    if not manifest.is_file():
        return None
    version: str = json.loads(manifest.read_text())["version"]
    return version


@pytest.fixture(scope="module")
def werift() -> str:
    """The werift version of package-lock.json, installed (``npm ci``) unless it already is."""
    assert NODE is not None and NPM is not None
    node_version = subprocess.run([NODE, "--version"], capture_output=True, text=True, check=True)
    major = int(node_version.stdout.strip().lstrip("v").split(".")[0])
    if major < MIN_NODE:
        pytest.skip(f"the werift scripts need Node.js {MIN_NODE}+, this is {node_version.stdout}")
    lock = json.loads((HERE / "package-lock.json").read_text())
    locked: str = lock["packages"]["node_modules/werift"]["version"]
    if installed_version("werift") != locked:
        done = subprocess.run(
            [NPM, "ci", "--no-audit", "--no-fund"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"`npm ci` in {HERE} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    assert installed_version("werift") == locked
    return locked


# ------------------------------------------------------------------ IVF frame files


def write_ivf(path: Path, codec: str, size: int, frames: list[bytes]) -> None:
    """IVF: a 32-byte header, then per frame its size, its pts and its bytes."""
    header = struct.pack(
        "<4sHH4sHHIII4x", b"DKIF", 0, 32, FOURCC[codec], size, size, FPS, 1, len(frames)
    )
    with path.open("wb") as out:
        out.write(header)
        for pts, frame in enumerate(frames):
            out.write(struct.pack("<IQ", len(frame), pts))
            out.write(frame)


def read_ivf(path: Path) -> tuple[bytes, list[bytes]]:
    """The FourCC and the frames of an IVF file."""
    data = path.read_bytes()
    assert data[:4] == b"DKIF", f"{path} is not an IVF file"
    fourcc = data[8:12]
    offset = struct.unpack_from("<H", data, 6)[0]
    frames = []
    while offset + 12 <= len(data):
        (size,) = struct.unpack_from("<I", data, offset)
        frames.append(data[offset + 12 : offset + 12 + size])
        offset += 12 + size
    return fourcc, frames


def encode_source(path: Path, codec: str) -> int:
    """Numbered frames, one packet each (no lookahead, no B-frames), a key frame every second."""
    if codec == "vp8":
        context = av.CodecContext.create("libvpx", "w")
        context.options = {"deadline": "realtime", "cpu-used": "16", "lag-in-frames": "0"}
    else:
        context = av.CodecContext.create("libx264", "w")
        # without a global header libx264 repeats SPS and PPS before every IDR
        context.options = {"preset": "ultrafast", "tune": "zerolatency", "profile": "baseline"}
        context.max_b_frames = 0
    context.thread_count = 1  # libvpx's threads cost more than they give at this size
    context.width = context.height = SOURCE
    context.pix_fmt = "yuv420p"
    context.time_base = Fraction(1, FPS)
    context.framerate = Fraction(FPS)
    context.gop_size = FPS
    context.bit_rate = 1_500_000
    scene = Scene(SOURCE, SOURCE)
    packets: list[bytes] = []
    for number in range(SOURCE_FRAMES):
        frame = numbered_frame(number, scene)
        frame.pts = number
        packets += [bytes(packet) for packet in context.encode(frame)]
    packets += [bytes(packet) for packet in context.encode(None)]
    assert len(packets) == SOURCE_FRAMES, "frame i must be packet i"
    write_ivf(path, codec, SOURCE, packets)
    return len(packets)


@dataclass
class Decoded:
    sizes: set[tuple[int, int]]
    numbers: list[int | None]
    errors: list[str]


def decode_received(path: Path, codec: str) -> Decoded:
    fourcc, frames = read_ivf(path)
    assert fourcc == FOURCC[codec]
    decoder: Any = av.CodecContext.create(codec, "r")
    decoded = Decoded(set(), [], [])
    for index, data in enumerate([*frames, None]):
        try:
            pictures = decoder.decode(av.Packet(data) if data is not None else None)
        except av.error.FFmpegError as exc:
            decoded.errors.append(f"frame {index}: {exc}")
            continue
        for picture in pictures:
            decoded.sizes.add((picture.width, picture.height))
            decoded.numbers.append(read_frame_number(picture))
    return decoded


# ------------------------------------------------------------------ the werift scripts


@dataclass
class NodeClient:
    """A werift script in a child process and the JSON events it printed, one a line."""

    process: asyncio.subprocess.Process
    events: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not an event (werift's own logging): kept in self.lines only
            if isinstance(event, dict) and "event" in event:
                self.events.append(event)

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    async def event(self, name: str, timeout: float) -> dict[str, Any]:
        """The first event called ``name``; fails with the script's output if it never comes."""
        async with asyncio.timeout(timeout):
            while True:
                found = [event for event in self.events if event["event"] == name]
                if found:
                    return found[0]
                if self.reader is not None and self.reader.done():
                    code = await self.process.wait()
                    pytest.fail(
                        f"no {name!r} from the werift client (exit {code}):\n{self.output()}"
                    )
                await asyncio.sleep(0.02)

    async def exit_code(self, timeout: float = 20.0) -> int:
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            if self.reader is not None:
                await self.reader
        return code


@asynccontextmanager
async def node_client(script: str, *args: str) -> AsyncIterator[NodeClient]:
    """Run ``node script args`` in tests/interop; on leaving, close its stdin (the publisher's
    cue to stop) and wait for it, killing it if it does not exit."""
    assert NODE is not None
    process = await asyncio.create_subprocess_exec(
        NODE,
        str(HERE / script),
        *args,
        cwd=HERE,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    client = NodeClient(process)
    client.reader = asyncio.create_task(client.read())
    try:
        yield client
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            await client.exit_code()
        except TimeoutError:
            process.kill()
            await process.wait()
        with suppress(asyncio.CancelledError):
            client.reader.cancel()
            await client.reader


async def session_info(http: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    response = await http.get(f"/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    info: dict[str, Any] = response.json()
    return info


async def poll_session(
    http: httpx.AsyncClient,
    session_id: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = 20.0,
) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while not predicate(info := await session_info(http, session_id)):
            await asyncio.sleep(0.1)
    return info


# ------------------------------------------------------------------ the test


@pytest.mark.usefixtures("werift")
@pytest.mark.parametrize("codec", ["vp8", "h264"])
async def test_werift_publishes_over_whip_and_watches_over_whep(
    serve: Callable[..., LiveServer], tmp_path: Path, codec: str
) -> None:
    source = tmp_path / "source.ivf"
    encode_source(source, codec)
    received = tmp_path / "received.ivf"
    server = serve(token=TOKEN)
    auth = ["--token", TOKEN]
    headers = {"authorization": f"Bearer {TOKEN}"}
    whip = f"{server.url}/whip?width={OUTPUT}&height={OUTPUT}"

    async with (
        httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as http,
        node_client("whip-publish.mjs", "--url", whip, "--input", str(source), *auth) as publisher,
    ):
        answer = await publisher.event("answer", timeout=20)
        assert answer["contentType"] == "application/sdp", answer
        assert answer["codecs"] == [RTPMAP[codec]], answer
        session_id = answer["location"].rsplit("/", 1)[1]
        assert answer["location"] == f"{server.url}/whip/{session_id}"
        await publisher.event("connected", timeout=20)
        # livediff decodes and processes what werift sends
        before = await poll_session(http, session_id, lambda s: s["frames_processed"] >= 30)
        assert before["kind"] == "whip" and before["params"]["width"] == OUTPUT

        whep = f"{server.url}/whep/{session_id}"
        viewer_args = ["--url", whep, "--codec", codec, "--output", str(received)]
        viewer_args += ["--frames", str(VIEWER_FRAMES), "--timeout", "30", *auth]
        async with node_client("whep-watch.mjs", *viewer_args) as viewer:
            watched = await viewer.event("done", timeout=45)
            viewer_code = await viewer.exit_code()
        assert viewer_code == 0, viewer.output()
        after = await poll_session(http, session_id, lambda s: s["viewers"] == 0)
    published = await publisher.event("done", timeout=5)
    assert await publisher.exit_code() == 0, publisher.output()

    # the publisher: every frame it sent went out over a connected peer; DELETE ended it
    sent = published["frames"]
    assert sent >= FPS * 3 and published["connection"] == "connected", published
    assert published["deleteStatus"] == 200, published
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as http:
        ended = await http.get(f"/v1/sessions/{session_id}")
    assert ended.status_code == 404 or ended.json()["state"] == "closed", ended.text
    # livediff: frames in from werift, through the transform, out to the WHEP viewer
    assert after["frames_in"] > before["frames_in"] > 0, (before, after)
    assert after["frames_processed"] >= before["frames_processed"] + VIEWER_FRAMES, after
    assert after["frames_in"] <= sent
    # the viewer: whole frames from a key frame on, then DELETE of its own resource
    assert watched["frames"] == VIEWER_FRAMES and watched["keyframes"] >= 1, watched
    assert watched["deleteStatus"] == 200, watched
    if codec == "vp8":  # read from the VP8 key frame header by the viewer itself
        assert (watched["width"], watched["height"]) == (OUTPUT, OUTPUT), watched
    # what the viewer received decodes, at the session's size, in the order it was sent
    decoded = decode_received(received, codec)
    assert decoded.errors == [], decoded.errors
    assert len(decoded.numbers) == VIEWER_FRAMES
    assert decoded.sizes == {(OUTPUT, OUTPUT)}
    numbers = [number for number in decoded.numbers if number is not None]
    assert len(numbers) >= VIEWER_FRAMES * 0.9, decoded.numbers
    assert all(number < SOURCE_FRAMES for number in numbers), numbers
    # forward only (the source loops: modulo its length), no repeats, a few frames shed at most
    steps = [(b - a) % SOURCE_FRAMES for a, b in itertools.pairwise(numbers)]
    assert all(0 < step < SOURCE_FRAMES // 4 for step in steps), numbers
    assert numbers[0] + sum(steps) < sent, (numbers, sent)
