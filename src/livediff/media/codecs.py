"""Video encoders configured from Settings, and codec preferences for negotiation.

aiortc hard-codes its encoders' bitrates and keyframe policy as module constants; livediff
builds its own VP8 and H.264 encoders from :class:`~livediff.config.Settings` and gives them to
each sender it creates. Packetisation is aiortc's own (RFC 7741 for VP8, RFC 6184 for H.264),
reached, like the sender's encoder, through :mod:`livediff.media.aiortc_private`.
"""

from __future__ import annotations

import fractions
import random
from abc import abstractmethod
from typing import Any

import av
from aiortc import RTCRtpSender, RTCRtpTransceiver
from aiortc.codecs.base import Encoder
from aiortc.mediastreams import VIDEO_TIME_BASE, convert_timebase
from aiortc.rtcrtpparameters import RTCRtpCodecCapability, RTCRtpCodecParameters
from av.video.reformatter import VideoReformatter

from livediff.encoding import EncoderSettings
from livediff.media import aiortc_private


class ConfiguredEncoder(Encoder):
    """Opens a PyAV encoder from settings; reopens it when the size or bitrate moves.

    One frame may be encoded by several encoders at once (a session's viewers share it), each
    on its own executor thread, so an encoder never changes the frame it is given: a colour
    conversion goes through the encoder's own reformatter (a shared frame's cached one is not
    thread-safe), a forced keyframe is marked on a private copy, and the codec's time base is
    the frames' own RTP clock (1/90000), because PyAV rewrites a frame's pts and time base into
    the codec's when they differ, and another encoder could read them half rewritten.
    """

    def __init__(self, settings: EncoderSettings) -> None:
        self.settings = settings
        self.codec: Any = None
        self._target_bitrate = settings.bitrate_start
        self._reformatter = VideoReformatter()

    @property
    def target_bitrate(self) -> int:
        return self._target_bitrate

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        """aiortc sets this from REMB feedback; it is kept within the configured range."""
        low, high = self.settings.bitrate_min, self.settings.bitrate_max
        self._target_bitrate = max(low, min(bitrate, high))

    def encode(self, frame: Any, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        timestamp = convert_timebase(frame.pts, frame.time_base, VIDEO_TIME_BASE)
        frame = self._private_yuv(frame, force_keyframe)
        if self.codec is not None and self._must_reopen(frame):
            self.codec = None
        if self.codec is None:
            self.codec = self._open(frame.width, frame.height)
        data = b"".join(bytes(packet) for packet in self.codec.encode(frame))
        return self._packetize(data), timestamp

    def _private_yuv(self, frame: Any, force_keyframe: bool) -> Any:
        """The frame in yuv420p; a copy of it, marked as a keyframe, when one is forced."""
        converted = frame.format.name != "yuv420p"
        if converted:
            frame = self._reformatter.reformat(frame, format="yuv420p")
        if force_keyframe:
            if not converted:
                copy = av.VideoFrame.from_ndarray(frame.to_ndarray(), format="yuv420p")
                copy.pts, copy.time_base = frame.pts, frame.time_base
                frame = copy
            frame.pict_type = av.video.frame.PictureType.I
        return frame

    def pack(self, packet: Any) -> tuple[list[bytes], int]:
        timestamp = convert_timebase(packet.pts, packet.time_base, VIDEO_TIME_BASE)
        return self._packetize(bytes(packet)), timestamp

    def _must_reopen(self, frame: Any) -> bool:
        size_changed = (frame.width, frame.height) != (self.codec.width, self.codec.height)
        drift = abs(self._target_bitrate - self.codec.bit_rate) / self.codec.bit_rate
        return size_changed or drift > 0.1

    @abstractmethod
    def _open(self, width: int, height: int) -> Any:
        """A PyAV encoder context for this size at the current target bitrate."""

    @abstractmethod
    def _packetize(self, data: bytes) -> list[bytes]:
        """RTP payloads for one encoded frame."""


class ConfiguredVp8Encoder(ConfiguredEncoder):
    def __init__(self, settings: EncoderSettings) -> None:
        super().__init__(settings)
        self._picture_id = random.randrange(1 << 15)  # RFC 7741: starts at a random value

    def _open(self, width: int, height: int) -> Any:
        bitrate = self._target_bitrate
        codec = av.CodecContext.create("libvpx", "w")
        codec.width, codec.height = width, height
        codec.bit_rate = bitrate
        codec.pix_fmt = "yuv420p"
        codec.time_base = VIDEO_TIME_BASE  # the frames' own: see ConfiguredEncoder
        codec.gop_size = self.settings.gop_frames
        codec.qmin, codec.qmax = 2, 56
        codec.thread_count = self.settings.threads_for(width, height)
        codec.options = {
            "bufsize": str(bitrate),  # one second of buffer: rc_buf_sz = 1000 ms
            "cpu-used": "-6",
            "deadline": "realtime",
            "lag-in-frames": "0",
            "minrate": str(bitrate),
            "maxrate": str(bitrate),
            "noise-sensitivity": "0",
            "overshoot-pct": "15",
            "undershoot-pct": "100",
            "partitions": "0",
            "static-thresh": "1",
            "error-resilient": "1",
        }
        return codec

    def _packetize(self, data: bytes) -> list[bytes]:
        payloads = aiortc_private.vp8_packetize(data, self._picture_id)
        self._picture_id = (self._picture_id + 1) % (1 << 15)
        return payloads


class ConfiguredH264Encoder(ConfiguredEncoder):
    def _open(self, width: int, height: int) -> Any:
        codec = av.CodecContext.create("libx264", "w")
        codec.width, codec.height = width, height
        codec.bit_rate = self._target_bitrate
        codec.pix_fmt = "yuv420p"
        codec.framerate = fractions.Fraction(self.settings.fps, 1)
        codec.time_base = VIDEO_TIME_BASE  # the frames' own: see ConfiguredEncoder
        codec.gop_size = self.settings.gop_frames
        codec.max_b_frames = 0
        codec.thread_count = self.settings.threads_for(width, height)
        codec.options = self.codec_options(width, height)
        codec.profile = "Baseline"
        return codec

    def codec_options(self, width: int, height: int) -> dict[str, str]:
        """libx264 private options for this picture size."""
        return {
            "preset": self.settings.h264_preset,
            "tune": "zerolatency",
            "level": _h264_level(width, height),
        }

    def _packetize(self, data: bytes) -> list[bytes]:
        if not data:
            return []
        return aiortc_private.h264_packetize(data)


def _h264_level(width: int, height: int) -> str:
    """The smallest H.264 level whose frame-size limit holds this picture (at 30 fps)."""
    macroblocks = ((width + 15) // 16) * ((height + 15) // 16)
    for limit, level in ((1620, "30"), (3600, "31"), (5120, "32"), (8192, "40"), (22080, "50")):
        if macroblocks <= limit:
            return level
    return "51"


def make_encoder(codec: RTCRtpCodecParameters, settings: EncoderSettings) -> Encoder | None:
    """A configured encoder for a negotiated video codec, or None for codecs left to aiortc."""
    mime = codec.mimeType.lower()
    if mime == "video/vp8":
        return ConfiguredVp8Encoder(settings)
    if mime == "video/h264":
        return ConfiguredH264Encoder(settings)
    return None


def install_encoder(transceiver: RTCRtpTransceiver, settings: EncoderSettings) -> None:
    """Give a negotiated video sender its configured encoder (after setLocalDescription)."""
    codecs = aiortc_private.negotiated_codecs(transceiver)
    negotiated = [c for c in codecs if c.mimeType.lower() != "video/rtx"]
    if negotiated:
        encoder = make_encoder(negotiated[0], settings)
        if encoder is not None:
            aiortc_private.install_sender_encoder(transceiver.sender, encoder)


def codec_preferences(order: list[str]) -> list[RTCRtpCodecCapability]:
    """aiortc's video codecs in the configured order (each with its RTX), others left out."""
    capabilities = RTCRtpSender.getCapabilities("video")
    if capabilities is None:
        return []
    chosen: list[RTCRtpCodecCapability] = []
    for name in order:
        wanted = f"video/{name}".lower()
        chosen.extend(c for c in capabilities.codecs if c.mimeType.lower() == wanted)
    chosen.extend(c for c in capabilities.codecs if c.mimeType.lower() == "video/rtx")
    return chosen
