"""Encoders come from Settings: bitrate range, keyframe interval, H.264 preset; both decode."""

from __future__ import annotations

import fractions

import av
import pytest
from aiortc.codecs import get_decoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from livediff.config import Settings
from livediff.media.codecs import (
    ConfiguredEncoder,
    ConfiguredH264Encoder,
    EncoderSettings,
    _h264_level,
    codec_preferences,
    make_encoder,
)
from livediff.testing.framecode import Scene, numbered_frame, read_frame_number

CODECS = {
    "vp8": RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96),
    "h264": RTCRtpCodecParameters(
        mimeType="video/H264",
        clockRate=90000,
        payloadType=102,
        parameters={"packetization-mode": "1", "profile-level-id": "42e01f"},
    ),
}


def encoder_for(name: str, **overrides: object) -> ConfiguredEncoder:
    settings = EncoderSettings.from_settings(Settings(**overrides))  # type: ignore[arg-type]
    encoder = make_encoder(CODECS[name], settings)
    assert isinstance(encoder, ConfiguredEncoder)
    return encoder


def source_frames(count: int, size: int = 128) -> list[av.VideoFrame]:
    scene = Scene(size, size)
    frames = []
    for number in range(count):
        frame = numbered_frame(number, scene)
        frame.pts = number * 3000
        frame.time_base = fractions.Fraction(1, 90_000)
        frames.append(frame)
    return frames


@pytest.mark.parametrize("name", ["vp8", "h264"])
def test_encoded_frames_decode_with_their_numbers(name: str) -> None:
    encoder = encoder_for(name)
    decoder = get_decoder(CODECS[name])
    numbers = []
    for frame in source_frames(10):
        pts = frame.pts
        payloads, timestamp = encoder.encode(frame)
        assert timestamp == pts  # exact: taken before PyAV rescales the frame's pts
        data = b"".join(_depayload(name, p) for p in payloads)
        for decoded in decoder.decode(JitterFrame(data=data, timestamp=timestamp)):
            numbers.append(read_frame_number(decoded))
    assert numbers == list(range(10))


def _depayload(name: str, payload: bytes) -> bytes:
    from aiortc.codecs import depayload

    return depayload(CODECS[name], payload)


@pytest.mark.parametrize("name", ["vp8", "h264"])
def test_keyframes_follow_the_configured_interval(name: str) -> None:
    encoder = encoder_for(name, keyframe_interval_s=0.2)  # 6 frames at the nominal 30 fps
    for frame in source_frames(1):
        encoder.encode(frame)
    assert encoder.codec.gop_size == 6


def test_bitrate_feedback_is_kept_within_the_configured_range() -> None:
    encoder = encoder_for(
        "vp8", video_bitrate_min=400_000, video_bitrate_start=800_000, video_bitrate_max=900_000
    )
    assert encoder.target_bitrate == 800_000
    encoder.target_bitrate = 10_000_000
    assert encoder.target_bitrate == 900_000
    encoder.target_bitrate = 1
    assert encoder.target_bitrate == 400_000


def test_h264_uses_the_configured_preset_and_no_b_frames() -> None:
    encoder = encoder_for("h264", h264_preset="ultrafast")
    assert isinstance(encoder, ConfiguredH264Encoder)
    assert encoder.codec_options(512, 512) == {
        "preset": "ultrafast",
        "tune": "zerolatency",
        "level": "30",
    }
    encoder.encode(source_frames(1)[0])
    assert encoder.codec.max_b_frames == 0


def test_h264_level_grows_with_the_picture() -> None:
    assert _h264_level(512, 512) == "30"
    assert _h264_level(1280, 720) == "31"
    assert _h264_level(1024, 1024) == "32"
    assert _h264_level(1920, 1088) == "40"


def test_codec_preferences_follow_the_configured_order() -> None:
    names = [c.mimeType.lower() for c in codec_preferences(["h264", "vp8"])]
    assert names[0] == "video/h264"
    assert names.index("video/vp8") > names.index("video/h264")
    assert "video/rtx" in names


def test_bitrates_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match="video_bitrate_min"):
        Settings(video_bitrate_min=2_000_000, video_bitrate_start=1_000_000)


@pytest.mark.parametrize("name", ["vp8", "h264"])
def test_viewers_encoding_one_shared_frame_at_once_do_not_disturb_it(name: str) -> None:
    """A session's frame goes to every viewer's encoder, each on its own thread."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    rgb = np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    shared = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    shared.pts, shared.time_base = 3000, fractions.Fraction(1, 90_000)
    encoders = [encoder_for(name) for _ in range(4)]

    def encode_many(encoder: ConfiguredEncoder) -> list[int]:
        return [encoder.encode(shared, force_keyframe=i % 3 == 0)[1] for i in range(15)]

    with ThreadPoolExecutor(4) as pool:
        timestamps = list(pool.map(encode_many, encoders))
    assert timestamps == [[3000] * 15] * 4
    assert shared.format.name == "rgb24" and shared.pts == 3000
    assert shared.pict_type == av.video.frame.PictureType.NONE


@pytest.mark.parametrize("codec", ["vp8", "h264"])
def test_encoding_leaves_the_shared_frame_as_it_was(codec: str) -> None:
    """Viewers' encoders share one frame: none may rewrite its pts or time base."""
    encoder = encoder_for(codec)
    frame = numbered_frame(7, Scene(64, 64))
    frame.pts, frame.time_base = 2999, fractions.Fraction(1, 90_000)
    for _ in range(2):
        encoder.encode(frame)
    assert (frame.pts, frame.time_base) == (2999, fractions.Fraction(1, 90_000))
