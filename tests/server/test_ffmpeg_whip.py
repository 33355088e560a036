"""FFmpeg's WHIP muxer (FFmpeg 8, through PyAV) publishing to the real service (issue 13).

The publisher runs in a child process (``python -m tests.server.test_ffmpeg_whip URL ...``):
PyAV's muxer blocks in FFmpeg, and in this process it would stall the server's thread. It sends
numbered 512x512 H.264 frames (libx264 baseline, zerolatency, no B-frames) at 30 fps until its
stdin closes, then closes the muxer, which DELETEs the WHIP resource.

FFmpeg built with GnuTLS (PyAV's wheels) makes a P-224 DTLS certificate that aiortc's OpenSSL
refuses (see :mod:`livediff.media.dtls_compat`), so the streaming tests hand it a P-256 one with
the muxer's ``cert_file``/``key_file`` options, as the README tells FFmpeg users to.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import httpx
import pytest

from livediff.testing.framecode import Scene, numbered_frame
from livediff.testing.peers import FrameRecorder, accept_answer, client_peer, local_offer

if TYPE_CHECKING:
    from livediff.testing.servers import LiveServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        "whip" not in av.formats_available,
        reason=f"the FFmpeg in PyAV {av.__version__} has no WHIP muxer (FFmpeg 8 has one)",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
SIZE, FPS = 512, 30
OUTPUT = 256  # the session's size: the passthrough transform scales 512 -> 256
TOKEN = "s3cret-t0ken"


@dataclass
class Publisher:
    process: asyncio.subprocess.Process
    output: str = ""


@asynccontextmanager
async def ffmpeg_publisher(
    url: str,
    *,
    token: str | None = None,
    certificate: tuple[Path, Path] | None = None,
    seconds: float = 30.0,
) -> AsyncIterator[Publisher]:
    """Run the publisher child; on leaving, close its stdin and collect its exit and output."""
    args = [url, "--seconds", str(seconds)]
    if token is not None:
        args += ["--token", token]
    if certificate is not None:
        args += ["--cert", str(certificate[0]), "--key", str(certificate[1])]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        __name__,
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    publisher = Publisher(process)
    try:
        yield publisher
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            out, _ = await asyncio.wait_for(process.communicate(), timeout=20)
        except TimeoutError:
            process.kill()
            out, _ = await process.communicate()
        publisher.output = out.decode(errors="replace")


def p256_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate and key (PEM), as RFC 8827 section 6.5 asks."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "whip-publisher")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "whip.crt", folder / "whip.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def only_session(http: httpx.AsyncClient, timeout: float = 15.0) -> dict[str, Any]:
    """The one open session, once it has decoded frames."""
    async with asyncio.timeout(timeout):
        while True:
            listed = await http.get("/v1/sessions")
            assert listed.status_code == 200, listed.text
            sessions: list[dict[str, Any]] = listed.json()
            if sessions and sessions[0]["frames_in"] > 0:
                assert len(sessions) == 1
                return sessions[0]
            await asyncio.sleep(0.1)


@asynccontextmanager
async def whep_viewer(http: httpx.AsyncClient, session_id: str) -> AsyncIterator[FrameRecorder]:
    """An aiortc WHEP viewer of the session's output (sending the client's headers)."""
    pc = client_peer()
    recorder = FrameRecorder()
    tasks: list[asyncio.Task[None]] = []
    pc.addTransceiver("video", direction="recvonly")
    pc.on("track", lambda track: tasks.append(asyncio.ensure_future(recorder.consume(track))))
    offer = await local_offer(pc)
    response = await http.post(
        f"/whep/{session_id}", content=offer, headers={"content-type": "application/sdp"}
    )
    assert response.status_code == 201, response.text
    await accept_answer(pc, response.text)
    try:
        yield recorder
    finally:
        await pc.close()
        for task in tasks:
            task.cancel()


@pytest.mark.parametrize("token", [None, TOKEN], ids=["open", "bearer-token"])
async def test_ffmpeg_publishes_and_a_whep_viewer_watches(
    serve: Callable[..., LiveServer], tmp_path: Path, token: str | None
) -> None:
    server = serve(token=token) if token else serve()
    url = f"{server.url}/whip?width={OUTPUT}&height={OUTPUT}"
    certificate = p256_certificate(tmp_path)
    if token:
        async with ffmpeg_publisher(url, certificate=certificate) as refused:
            async with asyncio.timeout(15):
                await refused.process.wait()
        assert refused.process.returncode != 0, refused.output
        assert "401" in refused.output, refused.output
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as http,
        ffmpeg_publisher(url, token=token, certificate=certificate) as publisher,
    ):
        first = await only_session(http)
        session_id = first["session_id"]
        assert first["kind"] == "whip" and first["params"]["width"] == OUTPUT
        async with whep_viewer(http, session_id) as recorder:
            await recorder.wait_for(15, timeout=20)
            second = (await http.get(f"/v1/sessions/{session_id}")).json()
    assert publisher.process.returncode == 0, publisher.output
    assert second["frames_in"] > first["frames_in"] > 0
    assert second["frames_out"] > first["frames_out"]
    numbers = [f.number for f in recorder.frames if f.number is not None]
    assert len(numbers) >= 10 and numbers == sorted(numbers), numbers
    assert {(f.width, f.height) for f in recorder.frames} == {(OUTPUT, OUTPUT)}
    sent = int(publisher.output.rsplit("SENT", 1)[1].split()[0])
    assert max(numbers) < sent
    # closing the muxer DELETEs the WHIP resource, which ends the session
    async with httpx.AsyncClient(base_url=server.url, headers=headers) as http:
        async with asyncio.timeout(10):
            while (await http.get("/v1/sessions")).json():
                await asyncio.sleep(0.05)


async def test_ffmpeg_with_its_own_certificate_gets_the_reason(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """FFmpeg's GnuTLS certificate is on P-224: the failure names the curve and the way out."""
    caplog.set_level(logging.WARNING, logger="livediff.media.peer")
    async with ffmpeg_publisher(f"{server.url}/whip", seconds=2) as publisher:
        async with asyncio.timeout(20):
            await publisher.process.wait()
    if publisher.process.returncode == 0:
        pytest.skip("this FFmpeg's own DTLS certificate is accepted: see dtls_compat's removal")
    assert "DTLS session failed" in publisher.output, publisher.output
    assert "secp224r1" in caplog.text and "cert_file" in caplog.text, caplog.text


def publish(argv: list[str]) -> int:
    """The child: publish numbered frames over WHIP until stdin closes (or ``--seconds``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--token")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    av.logging.set_level(av.logging.ERROR)
    options: dict[str, str] = {}
    if args.token:
        options["authorization"] = args.token  # FFmpeg sends "Authorization: Bearer <token>"
    if args.cert and args.key:
        options.update(cert_file=args.cert, key_file=args.key)
    stop = threading.Event()

    def stop_at_end_of_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=stop_at_end_of_stdin, daemon=True).start()
    container = av.open(args.url, mode="w", format="whip", options=options)
    stream = container.add_stream(
        "libx264",
        rate=FPS,
        options={"profile": "baseline", "tune": "zerolatency", "preset": "ultrafast", "bf": "0"},
    )
    stream.width = stream.height = SIZE
    stream.pix_fmt = "yuv420p"
    scene = Scene(SIZE, SIZE)
    number, start = 0, time.monotonic()
    try:
        while not stop.is_set() and number < args.seconds * FPS:
            frame = numbered_frame(number, scene)
            frame.pts, frame.time_base = number, Fraction(1, FPS)
            for packet in stream.encode(frame):
                container.mux(packet)
            number += 1
            time.sleep(max(0.0, start + number / FPS - time.monotonic()))
        for packet in stream.encode(None):
            container.mux(packet)
    finally:
        container.close()
    print(f"SENT {number}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(publish(sys.argv[1:]))
