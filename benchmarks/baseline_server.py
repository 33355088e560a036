"""The baseline: a video server written the way aiortc's server example does it.

The transform runs inline in the output track's ``recv()`` on the event loop, frames come
through aiortc's default (unbounded) queues and a buffered MediaRelay, and aiortc's own
receiver and encoders are used unchanged. One deviation from the example: no STUN server is
configured, because nothing outside this machine is reachable (the example would ask Google's).

    python benchmarks/baseline_server.py --port 8081
    POST /offer  {"sdp": ..., "type": "offer", "delay_ms": 0}  ->  {"sdp": ..., "type": "answer"}
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamTrack
from fastapi import FastAPI

relay = MediaRelay()
peers: set[RTCPeerConnection] = set()


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    yield
    await asyncio.gather(*(pc.close() for pc in peers))


app = FastAPI(lifespan=lifespan)


class VideoTransformTrack(MediaStreamTrack):
    """The example's track: pull a frame, transform it inline, return it."""

    kind = "video"

    def __init__(self, track: MediaStreamTrack, delay_ms: float) -> None:
        super().__init__()
        self.track = track
        self.delay_ms = delay_ms

    async def recv(self) -> Any:
        frame = await self.track.recv()
        if self.delay_ms:
            time.sleep(self.delay_ms / 1000)  # a model call, inline on the loop as in the example
        return frame


@app.post("/offer")
async def offer(body: dict[str, Any]) -> dict[str, str]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    peers.add(pc)
    delay_ms = float(body.get("delay_ms", 0))

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        if pc.connectionState in ("failed", "closed"):
            await pc.close()
            peers.discard(pc)

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        if track.kind == "video":
            pc.addTrack(VideoTransformTrack(relay.subscribe(track), delay_ms))

    await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
    await pc.setLocalDescription(await pc.createAnswer())
    return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
