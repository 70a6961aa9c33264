"""Cache-cost routing: send a request where it costs least, counting what is really cached.

Every candidate has a load, in prefill-token equivalents::

    load = queued prefill tokens
         + running_seq_tokens * running sequences      (decode load; 0 on prefill pools)
         + kv_usage_tokens    * KV cache usage (0..1)

and the request a cost there::

    cost = uncached_token_weight * (prompt tokens not cached there, from the KV index)
         + load_weight           * load

The cheapest candidate wins, among those within the load bound (bounded-load placement)::

    load <= load_bound_rel * mean load + load_bound_abs

so a hot prefix stays where it is cached until its replica's load leaves the band, and then
spreads to the next best replica (which then caches it too); the least loaded candidate is always
within the band. A small ``load_weight`` makes the cache decide inside the band and the band keep
the balance; ``load_weight`` 1 with no band is the classic "uncached + queued tokens" estimate of
time to first token, which under overload chases short queues and loses every cache hit.

Ties go to the lower load, then to a seeded random pick, so that cold prompts spread.

Imbalance guard: when the load spread is too wide (both ``max - min > imbalance_abs_threshold``
and ``max > imbalance_rel_threshold * min``, the two-sided test of SGLang's cache-aware router),
cache affinity is set aside and the least loaded candidate wins.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from router.policy import Candidate, RoutingContext, RoutingPolicy


class CacheCostSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uncached_token_weight: float = Field(
        1.0, ge=0, description="Cost of one prompt token the replica would have to compute."
    )
    load_weight: float = Field(
        0.1, ge=0, description="Cost of one prefill-token equivalent of load on the replica."
    )
    running_seq_tokens: float = Field(
        0.0,
        ge=0,
        description="Load of one running sequence, in prefill-token equivalents (decode pools).",
    )
    kv_usage_tokens: float = Field(
        0.0, ge=0, description="Load of a full KV cache (kv_usage 1.0), in prefill-token "
        "equivalents.",
    )
    load_bound_rel: float = Field(
        1.5,
        ge=1.0,
        description="Bounded load: only candidates whose load is at most this multiple of the "
        "mean load (plus load_bound_abs) are considered.",
    )
    load_bound_abs: float = Field(
        8192.0,
        ge=0,
        description="Bounded load: slack (prefill-token equivalents) added to the bound, so that "
        "a lightly loaded pool keeps its cache affinity.",
    )
    imbalance_abs_threshold: float = Field(
        32768.0,
        ge=0,
        description="Guard: load spread (max - min) above which, together with the relative "
        "test, the least loaded candidate is taken.",
    )
    imbalance_rel_threshold: float = Field(
        2.0,
        ge=1.0,
        description="Guard: max load above this multiple of min load, together with the "
        "absolute test, makes the least loaded candidate win.",
    )
    seed: int | None = Field(None, description="Seed of the tie-breaking random generator.")


class CacheCostPolicy(RoutingPolicy):
    """Least cost (uncached prefill, then load) within a load bound; see the module docstring."""

    name = "cache_cost"

    def __init__(self, **settings: Any) -> None:
        self.settings = CacheCostSettings(**settings)
        self._rng = random.Random(self.settings.seed)

    def load(self, candidate: Candidate) -> float:
        """The work already on a candidate, in prefill-token equivalents."""
        s, load = self.settings, candidate.load
        return (
            load.queued_prefill_tokens
            + s.running_seq_tokens * load.num_running
            + s.kv_usage_tokens * load.kv_usage
        )

    def cost(self, candidate: Candidate, ctx: RoutingContext, load: float) -> float:
        """What the request would cost on a candidate carrying ``load``."""
        s = self.settings
        uncached = ctx.uncached_tokens(candidate.replica_id)
        return s.uncached_token_weight * uncached + s.load_weight * load

    def is_imbalanced(self, loads: Sequence[float]) -> bool:
        s = self.settings
        high, low = max(loads), min(loads)
        return high - low > s.imbalance_abs_threshold and high > s.imbalance_rel_threshold * low

    def select(self, candidates: Sequence[Candidate], ctx: RoutingContext) -> Candidate:
        loads = [self.load(c) for c in candidates]
        pairs = list(zip(candidates, loads, strict=True))
        if len(candidates) > 1 and self.is_imbalanced(loads):
            keys = [(load, ctx.uncached_tokens(c.replica_id)) for c, load in pairs]
        else:
            s = self.settings
            bound = s.load_bound_rel * sum(loads) / len(loads) + s.load_bound_abs
            keys = [
                (self.cost(c, ctx, load) if load <= bound else math.inf, load) for c, load in pairs
            ]
        best = min(keys)
        tied = [c for c, key in zip(candidates, keys, strict=True) if key == best]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)
