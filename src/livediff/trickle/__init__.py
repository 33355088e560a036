"""Trickle, go-livepeer's segmented publish/subscribe over HTTP, as the native runner uses it.

- :mod:`~livediff.trickle.subscriber`: ``TrickleSubscriber`` (GET segments from the live edge,
  preconnected, 470/404/``Lp-Trickle-Closed`` handled, bounded retries);
- :mod:`~livediff.trickle.publisher`: ``TricklePublisher`` (POST segments with streamed bodies,
  the next request opened before the current one ends);
- :mod:`~livediff.trickle.ts` and :mod:`~livediff.trickle.tsmux`: MPEG-TS in and out, framed
  so that no frame waits for the next one.

The client is asyncio on httpx; nothing here imports torch.
"""

from livediff.trickle.protocol import CURRENT_SEQ, NEXT_SEQ, TrickleError
from livediff.trickle.publisher import PublishSegment, TricklePublisher
from livediff.trickle.subscriber import SubscribeSegment, TrickleSubscriber

__all__ = [
    "CURRENT_SEQ",
    "NEXT_SEQ",
    "PublishSegment",
    "SubscribeSegment",
    "TrickleError",
    "TricklePublisher",
    "TrickleSubscriber",
]
