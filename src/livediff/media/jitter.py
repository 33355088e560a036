"""Win back one frame interval on every receiving hop.

aiortc's jitter buffer hands a video frame to the decoder only when the first packet of the
*next* frame arrives (it never looks at the RTP marker bit), so each receiver adds one frame
interval (33 ms at 30 fps) of latency. Every WebRTC video sender (libwebrtc, aiortc, OBS's
libdatachannel) sets the marker bit on the last packet of a frame (RFC 3550 5.1, RFC 7741 4.1,
RFC 6184 5.1), so a frame is complete as soon as the contiguous run of its packets ends with a
marker. This module is the one place that changes how livediff receives video.

It is also where each complete frame is seen before the decoder gets it, so a publisher's buffer
carries a :class:`~livediff.media.frame_size.DecodeSizeGuard`: a frame whose declared size is over
``max_decode_pixels`` is dropped here and never decoded.
"""

from __future__ import annotations

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtcrtpreceiver import RTCRtpReceiver

from livediff.media import aiortc_private
from livediff.media.frame_size import DecodeSizeGuard


class MarkerJitterBuffer(JitterBuffer):
    """A jitter buffer that releases a frame when its marker packet completes it.

    It overrides ``_remove_frame``, the private method that aiortc's ``JitterBuffer.add`` calls
    to take a frame out (:data:`~livediff.media.aiortc_private.JITTER_REMOVE_FRAME`, which
    :func:`~livediff.media.aiortc_private.check` verifies); everything else it reads of aiortc's
    buffer goes through :mod:`livediff.media.aiortc_private`.

    With a ``guard``, a frame is released only if the guard admits it (its declared size is
    within the limit); a refused frame is gone, as if its packets had been lost.
    """

    def __init__(self, capacity: int = 512, guard: DecodeSizeGuard | None = None) -> None:
        super().__init__(capacity=capacity, is_video=True)
        self.guard = guard

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        payload_type = self._first_payload_type() if self.guard is not None else -1
        frame = self._frame_ended_by_marker()
        if frame is None:
            frame = aiortc_private.stock_remove_frame(self, sequence_number)
        if frame is None or self.guard is None:
            return frame
        return frame if self.guard.admit(payload_type, frame.data) else None

    def _first_payload_type(self) -> int:
        """The payload type of the oldest packet, the first of the frame released next (-1,
        which no codec has, when there is none)."""
        origin, ring = aiortc_private.jitter_ring(self)
        packet = None if origin is None else ring[origin % self.capacity]
        return -1 if packet is None else int(packet.payload_type)

    def _frame_ended_by_marker(self) -> JitterFrame | None:
        """The oldest frame, if its packets are contiguous and the last carries the marker."""
        origin, ring = aiortc_private.jitter_ring(self)
        if origin is None:
            return None
        timestamp: int | None = None
        for count in range(self.capacity):
            packet = ring[(origin + count) % self.capacity]
            if packet is None:
                return None
            if timestamp is None:
                timestamp = packet.timestamp
            elif packet.timestamp != timestamp:
                return None  # a new frame began without a marker: the base class handles it
            if packet.marker:
                packets = [ring[(origin + i) % self.capacity] for i in range(count + 1)]
                data = b"".join(aiortc_private.depayloaded(p) for p in packets if p is not None)
                self.remove(count + 1)
                return JitterFrame(data=data, timestamp=timestamp)
        return None


def use_marker_jitter_buffer(
    receiver: RTCRtpReceiver, guard: DecodeSizeGuard | None = None
) -> None:
    """Give a video receiver the marker-aware buffer (with ``guard``, if given, deciding which
    frames its decoder gets). Call before media flows."""
    current = aiortc_private.jitter_buffer_of(receiver)
    if isinstance(current, MarkerJitterBuffer):
        current.guard = guard or current.guard
    else:
        buffer = MarkerJitterBuffer(current.capacity, guard)
        aiortc_private.install_jitter_buffer(receiver, buffer)
