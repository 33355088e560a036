"""Trickle, go-livepeer's segmented publish/subscribe over HTTP, as the native runner uses it.

- :mod:`.subscriber`: ``TrickleSubscriber`` (GET segments from the live edge,
  preconnected, 470/404/``Lp-Trickle-Closed`` handled, bounded retries);
- :mod:`.publisher`: ``TricklePublisher`` (POST segments with streamed bodies,
  the next request opened before the current one ends);
- :mod:`.ts` and :mod:`.tsmux`: MPEG-TS in and out, framed
  so that no frame waits for the next one.

The client is asyncio on httpx; nothing here imports torch.
"""

from livediff.livepeer.trickle.protocol import CURRENT_SEQ, NEXT_SEQ, TrickleError
from livediff.livepeer.trickle.publisher import PublishSegment, TricklePublisher
from livediff.livepeer.trickle.subscriber import SubscribeSegment, TrickleSubscriber

__all__ = [
    "CURRENT_SEQ",
    "NEXT_SEQ",
    "PublishSegment",
    "SubscribeSegment",
    "TrickleError",
    "TricklePublisher",
    "TrickleSubscriber",
]
