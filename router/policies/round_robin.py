"""Round robin: each request goes to the next replica in id order."""

from __future__ import annotations

from collections.abc import Sequence

from router.policy import Candidate, RoutingContext, RoutingPolicy


class RoundRobinPolicy(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._num_selected = 0

    def select(self, candidates: Sequence[Candidate], ctx: RoutingContext) -> Candidate:
        ordered = sorted(candidates, key=lambda c: c.replica_id)
        choice = ordered[self._num_selected % len(ordered)]
        self._num_selected += 1
        return choice
