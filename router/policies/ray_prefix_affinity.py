"""Baseline: Ray Serve LLM's ``PrefixCacheAffinityRouter``, re-implemented over block hashes.

Follows ray 2.60.0 ``ray/llm/_internal/serve/routing_policies/prefix_aware/``
(``prefix_aware_router.py`` and ``prefix_tree.py``) and the power-of-two fallback of
``ray/serve/_private/request_router/pow_2_router.py``, with their defaults: imbalanced_threshold
inf, match_rate_threshold 0.1, do_eviction False, eviction_threshold_chars 400_000,
eviction_target_chars 360_000, eviction_interval_secs 10.

Per request, with ``queue_len`` = requests in flight on a replica:

1. Fallback: two distinct replicas drawn at random (power of two choices).
2. If ``max - min`` queue length does not exceed ``imbalanced_threshold``: walk the tree while
   some candidate holds the next node; ``match_rate`` = matched / prompt length. Below
   ``match_rate_threshold`` the chosen set is the tenants of smallest tree size; otherwise the
   candidates holding the deepest matched node.
3. Of the chosen set (else the fallback pair), the first with the shortest queue wins, and the
   prompt is recorded in its tree (Ray does this in ``on_request_routed``).

With ``do_eviction``, every ``eviction_interval_secs`` each tenant above
``eviction_threshold_chars`` loses its least recently used nodes (all nodes of equal access time
together) until it is down to ``eviction_target_chars``. Adaptations: sizes and thresholds count
tokens (full blocks) instead of characters; the tree lives in the policy, not in a Ray actor.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from router.policies.tenant_tree import TenantTree, tree_with_tenants
from router.policy import Candidate, RoutingContext, RoutingPolicy


class RayPrefixAffinitySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    imbalanced_threshold: float = Field(
        math.inf, ge=0, description="Queue length spread above which prefix matching is skipped."
    )
    match_rate_threshold: float = Field(
        0.1, ge=0, le=1, description="Match rate below which the smallest tenants are chosen."
    )
    do_eviction: bool = Field(False, description="Evict old tree entries periodically.")
    eviction_threshold_chars: int = Field(
        400_000, ge=0, description="Tenant size (tokens here) above which eviction starts."
    )
    eviction_target_chars: int = Field(
        360_000, ge=0, description="Tenant size (tokens here) eviction brings it down to."
    )
    eviction_interval_secs: float = Field(10.0, gt=0, description="Interval between evictions.")
    seed: int | None = Field(None, description="Seed of the power-of-two random draws.")


def _queue_len(candidate: Candidate) -> int:
    return candidate.load.num_running + candidate.load.num_waiting


class RayPrefixAffinityPolicy(RoutingPolicy):
    """Ray Serve's prefix cache affinity routing (see the module docstring for the source)."""

    name = "ray_prefix_affinity"

    def __init__(self, **settings: Any) -> None:
        self.settings = RayPrefixAffinitySettings(**settings)
        self._rng = random.Random(self.settings.seed)
        self._tree: TenantTree | None = None
        self._last_eviction_s: float | None = None

    def select(self, candidates: Sequence[Candidate], ctx: RoutingContext) -> Candidate:
        now = time.monotonic() if ctx.now_s is None else ctx.now_s
        tree = self._tree = tree_with_tenants(self._tree, ctx.block_size, candidates)
        self._maybe_evict(tree, now)
        fallback = self._power_of_two(candidates)
        queue_lens = [_queue_len(c) for c in candidates]
        chosen: list[Candidate] = []
        if max(queue_lens) - min(queue_lens) <= self.settings.imbalanced_threshold:
            chosen = self._prefix_match_best(tree, candidates, ctx)
        pick = min(chosen or fallback, key=_queue_len)  # first of the shortest queue
        tree.insert(ctx.block_hashes, pick.replica_id, now)
        return pick

    def on_replicas_changed(self, replica_ids: frozenset[str]) -> None:
        if self._tree is None:
            return
        for tenant in [t for t in self._tree.sizes if t not in replica_ids]:
            self._tree.remove_tenant(tenant)
        for tenant in sorted(replica_ids):
            self._tree.add_tenant(tenant)

    def _prefix_match_best(
        self, tree: TenantTree, candidates: Sequence[Candidate], ctx: RoutingContext
    ) -> list[Candidate]:
        available = {c.replica_id for c in candidates}
        depth, deepest = tree.walk(ctx.block_hashes, available)
        matched = min(depth * ctx.block_size, ctx.num_prompt_tokens)
        match_rate = matched / ctx.num_prompt_tokens if ctx.num_prompt_tokens else 0.0
        if match_rate < self.settings.match_rate_threshold:
            sizes = {t: s for t, s in tree.sizes.items() if t in available}
            smallest = min(sizes.values())
            order = [t for t, s in sizes.items() if s == smallest]
        else:
            # No match at all stops at the root, which every tenant holds.
            holders = tree.tenants_at(deepest) if deepest is not None else available
            order = [c.replica_id for c in candidates if c.replica_id in holders]
        by_id = {c.replica_id: c for c in candidates}
        return [by_id[t] for t in order]

    def _power_of_two(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        n = len(candidates)
        if n == 1:
            return [candidates[0]]
        if n == 2:
            first = self._rng.getrandbits(1)
            return [candidates[first], candidates[1 - first]]
        i = self._rng.randrange(n)
        j = self._rng.randrange(n - 1)
        if j >= i:
            j += 1
        return [candidates[i], candidates[j]]

    def _maybe_evict(self, tree: TenantTree, now: float) -> None:
        s = self.settings
        if self._last_eviction_s is None:
            self._last_eviction_s = now
        if not s.do_eviction or now - self._last_eviction_s < s.eviction_interval_secs:
            return
        self._last_eviction_s = now
        for tenant, size in list(tree.sizes.items()):
            if size > s.eviction_threshold_chars:
                excess = size - s.eviction_target_chars
                tree.evict(tenant, lambda removed, n=excess: removed >= n, group_equal_times=True)
