"""Least loaded by the power of two choices: sample two replicas, keep the less loaded one."""

from __future__ import annotations

import random
from collections.abc import Sequence

from router.policy import Candidate, RoutingContext, RoutingPolicy


def load_score(candidate: Candidate) -> tuple[int, float]:
    """Requests in flight first, KV usage to break ties."""
    load = candidate.load
    return (load.num_running + load.num_waiting, load.kv_usage)


class LeastLoadedPolicy(RoutingPolicy):
    name = "least_loaded"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def select(self, candidates: Sequence[Candidate], ctx: RoutingContext) -> Candidate:
        if len(candidates) <= 2:
            return min(candidates, key=load_score)
        return min(self._rng.sample(list(candidates), 2), key=load_score)
