"""Expiry of guessed entries: a heap of (expiry time, replica, block hashes) records."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence

from router.kvindex.replicas import ReplicaState


class ExpiryQueue:
    """Guesses in order of expiry; owned by one ``KVIndex``."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, ReplicaState, tuple[int, ...]]] = []
        self._order = itertools.count()  # ties never compare replicas

    def push(self, expiry: float, rep: ReplicaState, chains: Sequence[int]) -> None:
        heapq.heappush(self._heap, (expiry, next(self._order), rep, tuple(chains)))

    def has_due(self, now: float) -> bool:
        return bool(self._heap) and self._heap[0][0] <= now

    def pop_due(self, now: float) -> Iterator[tuple[float, ReplicaState, tuple[int, ...]]]:
        """Remove and yield every record due by ``now`` whose replica is still registered."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            expiry, _, rep, chains = heapq.heappop(heap)
            if not rep.is_removed:
                yield expiry, rep, chains
