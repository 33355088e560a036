"""Win back one frame interval on every receiving hop.

aiortc's jitter buffer hands a video frame to the decoder only when the first packet of the
*next* frame arrives (it never looks at the RTP marker bit), so each receiver adds one frame
interval (33 ms at 30 fps) of latency. Every WebRTC video sender (libwebrtc, aiortc, OBS's
libdatachannel) sets the marker bit on the last packet of a frame (RFC 3550 5.1, RFC 7741 4.1,
RFC 6184 5.1), so a frame is complete as soon as the contiguous run of its packets ends with a
marker. This module is the one place that changes how livediff receives video.
"""

from __future__ import annotations

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcrtpreceiver import RTCRtpReceiver

# aiortc keeps a receiver's buffer in a private attribute; this is its mangled name.
_BUFFER_ATTRIBUTE = "_RTCRtpReceiver__jitter_buffer"


class MarkerJitterBuffer(JitterBuffer):
    """A jitter buffer that releases a frame when its marker packet completes it."""

    def __init__(self, capacity: int = 512) -> None:
        super().__init__(capacity=capacity, is_video=True)

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        frame = self._frame_ended_by_marker()
        if frame is not None:
            return frame
        return super()._remove_frame(sequence_number)

    def _frame_ended_by_marker(self) -> JitterFrame | None:
        """The oldest frame, if its packets are contiguous and the last carries the marker."""
        if self._origin is None:
            return None
        timestamp: int | None = None
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is None:
                return None
            if timestamp is None:
                timestamp = packet.timestamp
            elif packet.timestamp != timestamp:
                return None  # a new frame began without a marker: the base class handles it
            if packet.marker:
                first = self._origin
                packets = [self._packets[(first + i) % self.capacity] for i in range(count + 1)]
                # aiortc's receiver stores each packet's depayloaded bytes as `_data`
                data = b"".join(getattr(p, "_data", b"") for p in packets if p is not None)
                self.remove(count + 1)
                return JitterFrame(data=data, timestamp=timestamp)
        return None


def use_marker_jitter_buffer(receiver: RTCRtpReceiver) -> None:
    """Give a video receiver the marker-aware buffer. Call before media flows."""
    current = getattr(receiver, _BUFFER_ATTRIBUTE, None)
    if not isinstance(current, JitterBuffer):
        raise RuntimeError(
            "this aiortc version keeps no jitter buffer where livediff expects it; "
            "install an aiortc release supported by livediff (see pyproject.toml)"
        )
    if not isinstance(current, MarkerJitterBuffer):
        setattr(receiver, _BUFFER_ATTRIBUTE, MarkerJitterBuffer(capacity=current.capacity))
