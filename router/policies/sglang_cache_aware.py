"""Baseline: SGLang router's ``cache_aware`` policy, re-implemented over block hashes.

Follows sgl-project/sglang ``sgl-router/src/policies/cache_aware.rs`` and ``tree.rs`` (the Rust
router of sglang-router 0.2.x, 2025), with the defaults of its launcher
(``sgl-router/py_src/sglang_router/router_args.py``: cache_threshold 0.3, balance_abs_threshold
64, balance_rel_threshold 1.5, eviction_interval_secs 120, max_tree_size 2**26; the Rust
``CacheAwareConfig::default()`` has 0.5 / 32 / 1.1 / 30 / 10000).

Per request, with ``load`` = requests in flight on a worker:

1. Imbalanced if ``max - min > balance_abs_threshold`` and ``max > min * balance_rel_threshold``:
   take the first worker of least load, record the prompt in its tree, done.
2. Otherwise walk the tree (all tenants, live or not) to the deepest node the prompt reaches;
   ``match_rate`` = matched / prompt length. If ``match_rate > cache_threshold`` take that node's
   first tenant, else the tenant of smallest tree size. The walk refreshes the chosen tenant's
   access times along the matched path.
3. If that tenant is a live candidate, record the prompt in its tree and take it; otherwise drop
   the stale tenant and take the first candidate.

Every ``eviction_interval_secs`` each tenant's least recently used leaves are evicted until its
size is at most ``max_tree_size``. Adaptations: sizes count tokens (full blocks) instead of
characters; "first tenant" and "smallest tenant" follow the iteration order of a Rust DashMap,
unspecified there and modelled here as a fixed pseudo-random order per node (seeded).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from router.policies.tenant_tree import TenantTree, tree_with_tenants
from router.policy import Candidate, RoutingContext, RoutingPolicy

_MASK64 = (1 << 64) - 1


class SGLangCacheAwareSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cache_threshold: float = Field(
        0.3, ge=0, le=1, description="Prefix match rate above which the best-matching worker wins."
    )
    balance_abs_threshold: int = Field(
        64, ge=0, description="Load spread (requests) that, with the relative test, triggers LB."
    )
    balance_rel_threshold: float = Field(
        1.5, ge=0, description="max load > min load * this, with the absolute test, triggers LB."
    )
    eviction_interval_secs: float = Field(
        120.0, ge=0, description="Interval between tree evictions; 0 disables eviction."
    )
    max_tree_size: int = Field(
        2**26, ge=0, description="Tokens a tenant's tree keeps after an eviction."
    )
    seed: int | None = Field(0, description="Seed of the modelled map iteration order.")


def _mix64(value: int) -> int:
    """SplitMix64 finalizer: a cheap, well-spread 64-bit permutation."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK64
    return value ^ (value >> 31)


class SGLangCacheAwarePolicy(RoutingPolicy):
    """SGLang's cache-aware routing (see the module docstring for the source followed)."""

    name = "sglang_cache_aware"

    def __init__(self, **settings: Any) -> None:
        self.settings = SGLangCacheAwareSettings(**settings)
        self._salt = random.Random(self.settings.seed).getrandbits(64)
        self._tenant_keys: dict[str, int] = {}
        self._tree: TenantTree | None = None
        self._last_eviction_s: float | None = None

    def select(self, candidates: Sequence[Candidate], ctx: RoutingContext) -> Candidate:
        now = time.monotonic() if ctx.now_s is None else ctx.now_s
        tree = self._tree = tree_with_tenants(self._tree, ctx.block_size, candidates)
        self._maybe_evict(tree, now)
        loads = [c.load.num_running + c.load.num_waiting for c in candidates]
        s = self.settings
        high, low = max(loads), min(loads)
        if high - low > s.balance_abs_threshold and high > low * s.balance_rel_threshold:
            chosen = candidates[loads.index(low)]
            tree.insert(ctx.block_hashes, chosen.replica_id, now)
            return chosen
        target = self._cache_aware_target(tree, ctx, now)
        for candidate in candidates:
            if candidate.replica_id == target:
                tree.insert(ctx.block_hashes, target, now)
                return candidate
        if target is not None:
            tree.remove_tenant(target)
        return candidates[0]

    def on_replicas_changed(self, replica_ids: frozenset[str]) -> None:
        if self._tree is None:
            return
        for tenant in [t for t in self._tree.sizes if t not in replica_ids]:
            self._tree.remove_tenant(tenant)
        for tenant in sorted(replica_ids):
            self._tree.add_tenant(tenant)

    def _cache_aware_target(self, tree: TenantTree, ctx: RoutingContext, now: float) -> str | None:
        depth, deepest = tree.walk(ctx.block_hashes)
        tenant = None
        if deepest is not None:
            tenant = self._first(tree.tenants_at(deepest), deepest)
            tree.touch(ctx.block_hashes[:depth], tenant, now)
        matched = min(depth * ctx.block_size, ctx.num_prompt_tokens)
        match_rate = matched / ctx.num_prompt_tokens if ctx.num_prompt_tokens else 0.0
        if match_rate > self.settings.cache_threshold:
            return tenant
        return self._smallest_tenant(tree)

    def _smallest_tenant(self, tree: TenantTree) -> str | None:
        if not tree.sizes:
            return None
        smallest = min(tree.sizes.values())
        return self._first((t for t, size in tree.sizes.items() if size == smallest), 0)

    def _first(self, tenants: Iterable[str], node: int) -> str:
        """The tenant a DashMap would yield first: a fixed pseudo-random order per node."""
        return min(tenants, key=lambda t: _mix64(self._tenant_key(t) ^ node ^ self._salt))

    def _tenant_key(self, tenant: str) -> int:
        key = self._tenant_keys.get(tenant)
        if key is None:
            digest = hashlib.blake2b(tenant.encode(), digest_size=8).digest()
            key = self._tenant_keys[tenant] = int.from_bytes(digest, "little")
        return key

    def _maybe_evict(self, tree: TenantTree, now: float) -> None:
        interval = self.settings.eviction_interval_secs
        if self._last_eviction_s is None:
            self._last_eviction_s = now
        if interval <= 0 or now - self._last_eviction_s < interval:
            return
        self._last_eviction_s = now
        limit = self.settings.max_tree_size
        for tenant in [t for t, size in tree.sizes.items() if size > limit]:
            tree.evict(tenant, lambda _, t=tenant: tree.sizes[t] <= limit, group_equal_times=False)
