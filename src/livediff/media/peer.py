"""Peer connections: a publisher (camera in, processed video back) and WHEP viewers.

A peer is set up from an offer in one call (:meth:`Peer.accept`), which answers with all local
candidates. Everything that needs aiortc lives here and in the modules it imports; the server
only sees SDP strings, callbacks and :class:`~livediff.engine.session.Session` objects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import traceback
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaRelay
from aiortc.exceptions import OperationError
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcdatachannel import RTCDataChannel
from aiortc.sdp import candidate_from_sdp
from pydantic_core import to_json

from livediff.config import Settings
from livediff.encoding import EncoderSettings
from livediff.engine.session import Session
from livediff.engine.tasks import TaskSet
from livediff.media import aiortc_private, dtls_compat
from livediff.media.codecs import codec_preferences, install_encoder
from livediff.media.egress import ProcessedVideoTrack
from livediff.media.frame_size import DecodeSizeGuard
from livediff.media.ingest import pump_video
from livediff.media.jitter import use_marker_jitter_buffer
from livediff.media.sdp import Offer, OfferError

logger = logging.getLogger(__name__)

#: Handles a params message from a data channel; returns the reply to send back.
ParamsHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
PARAMS_CHANNEL = "params"
#: Longest wait, when the server ends a session, for its "ended" message to be delivered
#: (handed to SCTP and acknowledged) before the peer closes.
END_MESSAGE_WAIT_S = 1.0


def ice_configuration(settings: Settings) -> RTCConfiguration:
    """ICE servers from settings; none by default (aiortc would otherwise ask Google's STUN)."""
    servers = []
    if settings.ice_servers:
        credential = settings.ice_credential.get_secret_value() if settings.ice_credential else None
        servers.append(
            RTCIceServer(
                urls=list(settings.ice_servers),
                username=settings.ice_username,
                credential=credential,
            )
        )
    return RTCConfiguration(iceServers=servers)


class Peer(ABC):
    """One RTCPeerConnection bound to a session; reports its end once through ``on_closed``."""

    def __init__(self, session: Session, settings: Settings) -> None:
        self.session = session
        self.settings = settings
        self.pc = RTCPeerConnection(ice_configuration(settings))
        self.on_closed: Callable[[str], None] | None = None
        self._tasks = TaskSet(f"session {session.id} peer")
        self._closed = False
        self.pc.on("connectionstatechange", self._on_connection_state)

    @property
    def connection_state(self) -> str:
        return str(self.pc.connectionState)

    async def accept(self, offer: Offer) -> str:
        """Answer ``offer``; returns the answer SDP (with candidates)."""
        transceivers = self._prepare(offer)
        with _refused_by_aiortc():
            await self.pc.setRemoteDescription(RTCSessionDescription(offer.sdp, "offer"))
        self._after_remote_description()
        with _refused_by_aiortc():
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        encoder_settings = EncoderSettings.from_settings(self.settings)
        for transceiver in transceivers:
            if transceiver.kind == "video" and transceiver.sender.track is not None:
                install_encoder(transceiver, encoder_settings)
        self._tasks.spawn(self._close_unless_connected())
        return str(self.pc.localDescription.sdp)

    @abstractmethod
    def _prepare(self, offer: Offer) -> list[RTCRtpTransceiver]:
        """Transceivers that the offer's m-lines will bind to (in m-line order per kind)."""

    def _after_remote_description(self) -> None:  # noqa: B027 - optional hook
        """Tracks of the remote side exist now; connect them."""

    def _video_transceiver(
        self, track: MediaStreamTrack | None, direction: str
    ) -> RTCRtpTransceiver:
        transceiver = self.pc.addTransceiver(track or "video", direction=direction)
        transceiver.setCodecPreferences(codec_preferences(list(self.settings.video_codecs)))
        return transceiver

    async def add_candidates(self, fragment: str) -> None:
        """Add remote candidates from a trickle-ICE SDP fragment (RFC 8840)."""
        mid: str | None = None
        for raw in fragment.splitlines():
            line = raw.strip()
            if line.startswith("a=mid:"):
                mid = line[len("a=mid:") :]
            elif line.startswith("a=candidate:"):
                candidate = candidate_from_sdp(line[len("a=candidate:") :])
                candidate.sdpMid = mid or self._first_mid()
                await self.pc.addIceCandidate(candidate)
            elif line == "a=end-of-candidates":
                await self.pc.addIceCandidate(None)

    def _first_mid(self) -> str | None:
        for transceiver in self.pc.getTransceivers():
            if transceiver.mid is not None:
                return str(transceiver.mid)
        return None

    async def _close_unless_connected(self) -> None:
        await asyncio.sleep(self.settings.connect_timeout_s)
        if self.pc.connectionState != "connected":
            self._report_closed(f"not connected within {self.settings.connect_timeout_s:g} s")

    async def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        detail = dtls_compat.failure_reason(self.pc) if state == "failed" else None
        if detail:
            logger.warning("session %s: peer failed: %s", self.session.id, detail)
        else:
            logger.info("session %s: peer %s", self.session.id, state)
        if state in ("failed", "closed"):
            self._report_closed(f"peer connection {state}" + (f": {detail}" if detail else ""))

    def _report_closed(self, reason: str) -> None:
        if self.on_closed is not None and not self._closed:
            self.on_closed(reason)

    async def close(self, reason: str | None = None) -> None:
        """Close the connection and stop every task it started; ``reason`` says why, to a
        peer that can be told (see :meth:`_say_ended`)."""
        if self._closed:
            return
        self._closed = True
        if reason is not None and self.pc.connectionState == "connected":
            await self._say_ended(reason)
        self._tasks.cancel()
        for transceiver in self.pc.getTransceivers():
            if isinstance(transceiver.sender.track, ProcessedVideoTrack):
                transceiver.sender.track.stop()
        await self.pc.close()
        await self._tasks.wait()

    async def _say_ended(self, reason: str) -> None:  # noqa: B027 - optional hook
        """Tell the remote side why the session ends, before the connection closes."""


class PublisherPeer(Peer):
    """The peer that sends the camera: its video feeds the session; the result goes back to it
    when its video is sendrecv, and its audio (if any) is relayed back unchanged."""

    def __init__(
        self, session: Session, settings: Settings, on_params: ParamsHandler | None = None
    ) -> None:
        super().__init__(session, settings)
        self.relay = MediaRelay()
        self.audio_source: MediaStreamTrack | None = None
        self._on_params = on_params
        self._params_channel: RTCDataChannel | None = None
        self._audio_transceiver: RTCRtpTransceiver | None = None
        self._audio_returns = False
        self._video: RTCRtpTransceiver | None = None
        #: Decides which received video frames are decoded (none over max_decode_pixels).
        self.size_guard = DecodeSizeGuard(
            settings.max_decode_pixels,
            on_drop=self._dropped_before_decoding,
            on_refused=session.end,
            name=f"session {session.id}: the publisher",
        )
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)

    def _prepare(self, offer: Offer) -> list[RTCRtpTransceiver]:
        if not offer.sends_video:
            raise OfferError(
                f"the offer's video is {offer.video.direction}; it must send video "
                "(sendrecv, or sendonly and watch the result over WHEP)"
            )
        loop = asyncio.get_running_loop()
        output = ProcessedVideoTrack(self.session, loop) if offer.receives_video else None
        video = self._video_transceiver(output, "sendrecv" if output else "recvonly")
        use_marker_jitter_buffer(video.receiver, self.size_guard)
        self._video = video
        transceivers = [video]
        if offer.audio is not None and offer.audio.direction in ("sendrecv", "sendonly"):
            self._audio_returns = offer.audio.direction == "sendrecv"
            direction = "sendrecv" if self._audio_returns else "recvonly"
            self._audio_transceiver = self.pc.addTransceiver("audio", direction=direction)
            transceivers.append(self._audio_transceiver)
        return transceivers

    def _dropped_before_decoding(self, stage: str) -> None:
        self.session.stats.on_dropped(stage)

    def _after_remote_description(self) -> None:
        if self._video is not None:
            negotiated = aiortc_private.negotiated_codecs(self._video)
            self.size_guard.use_codecs(
                {c.payloadType: c.name for c in negotiated if c.payloadType is not None}
            )
        if self.audio_source is None:
            return
        # Something must read the audio, or aiortc's queue for it grows without end.
        self._tasks.spawn(_drain(self.relay.subscribe(self.audio_source, buffered=False)))
        if self._audio_returns and self._audio_transceiver is not None:
            self._audio_transceiver.sender.replaceTrack(
                self.relay.subscribe(self.audio_source, buffered=False)
            )

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video":
            self._tasks.spawn(pump_video(track, self.session))
        elif track.kind == "audio":
            self.audio_source = track

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != PARAMS_CHANNEL or self._on_params is None:
            return
        handler = self._on_params
        self._params_channel = channel

        @channel.on("message")
        async def _on_message(message: str | bytes) -> None:
            reply = await _params_reply(handler, message)
            if channel.readyState == "open":
                channel.send(_encode_reply(reply))

    async def _say_ended(self, reason: str) -> None:
        """``{"type": "ended", "reason": ...}`` on the params channel, waited for until SCTP
        has it acknowledged (at most END_MESSAGE_WAIT_S): closing drops what is unsent."""
        channel = self._params_channel
        if channel is None or channel.readyState != "open":
            return
        channel.send(_encode_reply({"type": "ended", "reason": reason}))
        try:
            async with asyncio.timeout(END_MESSAGE_WAIT_S):
                while not _delivered(channel):
                    await asyncio.sleep(0.01)
        except TimeoutError:
            logger.info("session %s: the end message was not acknowledged", self.session.id)
        except aiortc_private.AiortcPrivateError as exc:
            logger.warning(
                "session %s: the end message was sent unchecked: %s", self.session.id, exc
            )


def _delivered(channel: RTCDataChannel) -> bool:
    """Nothing of ``channel`` is queued, in flight or unacknowledged: what bufferedAmount says
    and, past that, SCTP's own queues (which aiortc keeps private)."""
    if channel.bufferedAmount:
        return False
    return not aiortc_private.sctp_pending(channel.transport)


class ViewerPeer(Peer):
    """A WHEP viewer: receives the session's processed video (and the publisher's audio)."""

    def __init__(
        self, session: Session, settings: Settings, publisher: PublisherPeer | None
    ) -> None:
        super().__init__(session, settings)
        self._publisher = publisher

    def _prepare(self, offer: Offer) -> list[RTCRtpTransceiver]:
        if not offer.receives_video:
            raise OfferError(
                f"a WHEP offer must receive video; this one is {offer.video.direction}"
            )
        loop = asyncio.get_running_loop()
        video = self._video_transceiver(ProcessedVideoTrack(self.session, loop), "sendonly")
        transceivers = [video]
        publisher = self._publisher
        if offer.audio is not None and publisher is not None and publisher.audio_source is not None:
            audio = publisher.relay.subscribe(publisher.audio_source, buffered=False)
            transceivers.append(self.pc.addTransceiver(audio, direction="sendonly"))
        return transceivers


#: What aiortc raises, from its own code, on an offer that it cannot parse, take or answer
#: (read in aiortc 1.13 to 1.16, sdp.py and rtcpeerconnection.py, and seen by running offers
#: from tests/strategies.py past parse_offer): its SDP parser's ValueError, TypeError,
#: AttributeError, KeyError, IndexError, AssertionError and StopIteration (a RuntimeError once
#: it leaves a coroutine); ValueError from the description checks and createAnswer;
#: AttributeError from setRemoteDescription, createAnswer and setLocalDescription on m-lines
#: that they cannot bind; OperationError when no codec is in common.
AIORTC_REFUSALS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    AssertionError,
    StopIteration,
    OperationError,
)
#: The packages in whose code one of AIORTC_REFUSALS means "this offer is refused".
AIORTC_PACKAGES = frozenset({"aiortc", "aioice"})


@contextmanager
def _refused_by_aiortc() -> Iterator[None]:
    """aiortc's refusal of an offer, as OfferError (HTTP 400). Anything else, a TypeError of
    livediff's own included, goes on as it is: a bug is a 500 with its traceback logged."""
    try:
        yield
    except OfferError:
        raise
    except Exception as exc:
        origin = _origin(exc)
        if isinstance(origin, AIORTC_REFUSALS) and _raised_in(origin, AIORTC_PACKAGES):
            detail = str(origin) or type(origin).__name__
            raise OfferError(f"the offer was refused: {detail}") from exc
        raise


def _origin(exc: BaseException) -> BaseException:
    """The exception as first raised: a StopIteration that left a coroutine is a RuntimeError
    whose cause it is."""
    if isinstance(exc, RuntimeError) and isinstance(exc.__cause__, StopIteration):
        return exc.__cause__
    return exc


def _raised_in(exc: BaseException, packages: frozenset[str]) -> bool:
    """Whether the innermost frame of ``exc``'s traceback outside the standard library (where
    aiortc's int() or ipaddress calls fail) belongs to one of ``packages``."""
    for module in reversed(_traceback_modules(exc.__traceback__)):
        top = module.partition(".")[0]
        if top not in sys.stdlib_module_names:
            return top in packages
    return False


def _traceback_modules(tb: TracebackType | None) -> list[str]:
    """The module of each frame of a traceback, outermost first."""
    return [frame.f_globals.get("__name__", "") for frame, _ in traceback.walk_tb(tb)]


async def _drain(track: MediaStreamTrack) -> None:
    while True:
        try:
            await track.recv()
        except MediaStreamError:
            return


def _encode_reply(reply: dict[str, Any]) -> str:
    """The reply as strict JSON: non-finite numbers echoed from a message become strings."""
    try:
        return to_json(reply, inf_nan_mode="strings", fallback=repr).decode()
    except ValueError as exc:  # e.g. an input echoed back that nests too deep
        detail = f"the reply could not be encoded: {exc}"
        return json.dumps({"type": "error", "status": 400, "detail": detail})


async def _params_reply(handler: ParamsHandler, message: str | bytes) -> dict[str, Any]:
    try:
        patch = json.loads(message)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return {"type": "error", "status": 400, "detail": f"params message is not JSON: {exc}"}
    if not isinstance(patch, dict):
        return {"type": "error", "status": 400, "detail": "params message must be a JSON object"}
    return await handler(patch)
