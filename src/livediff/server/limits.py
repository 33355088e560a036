"""Per-client rate limits: a token bucket per client address, in bounded memory."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

#: Most client addresses remembered at once; past it, the longest idle ones are forgotten
#: (a forgotten client starts again with a full bucket).
MAX_CLIENTS = 10_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """``burst`` tokens per client, refilled at ``per_minute`` a minute; each open takes one.

    ``per_minute`` 0 turns the limit off. Buckets that have refilled are worth nothing (a new
    client starts full), so memory holds only clients that opened something lately, and never
    more than ``max_clients``.
    """

    def __init__(
        self,
        per_minute: float,
        burst: int,
        *,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate_per_s = per_minute / 60.0
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def take(self, client: str) -> float:
        """Take a token for ``client``: 0.0 when it had one, else the seconds until it will."""
        if not self.enabled:
            return 0.0
        moment = self._clock()
        bucket = self._refilled(client, moment)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate_per_s

    def _refilled(self, client: str, moment: float) -> _Bucket:
        bucket = self._buckets.pop(client, None)
        if bucket is None:
            bucket = _Bucket(tokens=float(self.burst), updated=moment)
        else:
            gained = (moment - bucket.updated) * self.rate_per_s
            bucket.tokens = min(float(self.burst), bucket.tokens + gained)
            bucket.updated = moment
        self._buckets[client] = bucket  # most recently used last
        self._forget(moment)
        return bucket

    def _forget(self, moment: float) -> None:
        """Drop buckets that are full again, then the least recently used past the cap."""
        full_after_s = self.burst / self.rate_per_s
        while self._buckets:
            client, oldest = next(iter(self._buckets.items()))
            if moment - oldest.updated < full_after_s and len(self._buckets) <= self.max_clients:
                return
            del self._buckets[client]

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(seconds: float) -> int:
    """A Retry-After value: whole seconds, at least 1."""
    return max(1, math.ceil(seconds))
