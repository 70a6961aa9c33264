"""How often requests reuse a prefix: decayed counts keyed by a prefix's chained block hash.

A cache miss on a prefix that many requests share is paid once and then serves every one of them
that goes to the same replica, so a policy can spread a hot prefix over more replicas at the cost
of one computation each. ``record(key, now_s)`` counts one request at ``key`` and returns how many
requests reused it within about the last ``horizon_s`` seconds: each count decays by
``exp(-age / horizon_s)``, so a steady rate ``r`` reads about ``r * horizon_s``, and a prefix
reused once every few minutes (a conversation's history) reads about 1.

Counts that have decayed below ``min_count`` are dropped whenever the map has doubled since the
last sweep, so memory follows the prefixes seen within a few horizons.
"""

from __future__ import annotations

import math


class PrefixHeat:
    def __init__(self, horizon_s: float, min_count: float = 0.05) -> None:
        if horizon_s <= 0:
            raise ValueError("horizon_s must be > 0")
        self.horizon_s = horizon_s
        self.min_count = min_count
        self._counts: dict[int, tuple[float, float]] = {}  # key -> (count, at time)
        self._sweep_at = 4096  # map size that triggers the next sweep

    def __len__(self) -> int:
        return len(self._counts)

    def count(self, key: int, now_s: float) -> float:
        """Decayed count of requests at ``key`` as of ``now_s`` (0 when never seen)."""
        count, at = self._counts.get(key, (0.0, now_s))
        return count * math.exp(-max(0.0, now_s - at) / self.horizon_s)

    def record(self, key: int, now_s: float) -> float:
        """Count one request at ``key``; return the decayed count, this request included."""
        count = self.count(key, now_s) + 1.0
        self._counts[key] = (count, now_s)
        if len(self._counts) >= self._sweep_at:
            self._sweep(now_s)
        return count

    def _sweep(self, now_s: float) -> None:
        self._counts = {
            key: (count, at) for key, (count, at) in self._counts.items()
            if self.count(key, now_s) >= self.min_count
        }
        self._sweep_at = max(4096, 2 * len(self._counts))
