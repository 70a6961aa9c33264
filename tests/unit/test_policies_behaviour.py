"""What each policy decides, checked against hand-worked cases and a restated rule."""

from __future__ import annotations

import random

from router.kvindex import hash_token_blocks
from router.policies.cache_cost import CacheCostPolicy
from router.policies.ray_prefix_affinity import RayPrefixAffinityPolicy
from router.policies.sglang_cache_aware import SGLangCacheAwarePolicy
from router.policies.tenant_tree import TenantTree
from router.policy import Candidate, ReplicaLoad, RoutingContext

BLOCK = 16


def cand(rid: str, queued: int = 0, running: int = 0, waiting: int = 0) -> Candidate:
    return Candidate(rid, ReplicaLoad(running, waiting, queued, 0.0))


def ctx_for(tokens: list[int], cached: dict[str, int] | None = None, now: float = 0.0):
    return RoutingContext(
        "r", len(tokens), BLOCK, tokens, cached or {}, hash_token_blocks(tokens, BLOCK), now
    )


# -- cache_cost ---------------------------------------------------------------------------------


def test_cache_cost_prefers_the_cached_replica_within_the_load_band() -> None:
    policy = CacheCostPolicy(seed=0)
    ctx = ctx_for(list(range(4096)), {"b": 4096})
    assert policy.select([cand("a"), cand("b", queued=2000)], ctx).replica_id == "b"


def test_cache_cost_leaves_a_replica_above_the_band() -> None:
    policy = CacheCostPolicy(load_bound_rel=1.5, load_bound_abs=1000, seed=0)
    ctx = ctx_for(list(range(4096)), {"b": 4096})
    # mean 6000 -> bound 10000: b (12000) is out, a is in despite computing everything.
    choice = policy.select([cand("a", queued=0), cand("b", queued=12000)], ctx)
    assert choice.replica_id == "a"


def test_cache_cost_guard_takes_the_least_loaded() -> None:
    policy = CacheCostPolicy(imbalance_abs_threshold=100, imbalance_rel_threshold=2, seed=0)
    ctx = ctx_for(list(range(64)), {"b": 64, "c": 64})
    choice = policy.select([cand("a", queued=50), cand("b", queued=500), cand("c", queued=5)], ctx)
    assert choice.replica_id == "c"


def test_cache_cost_picks_within_the_restated_rule() -> None:
    rng = random.Random(1)
    policy = CacheCostPolicy(running_seq_tokens=64, seed=0)
    s = policy.settings
    for _ in range(500):
        ids = [f"r{i}" for i in range(rng.randint(1, 6))]
        cands = [cand(r, rng.randrange(20000), rng.randrange(40)) for r in ids]
        prompt = rng.randrange(1, 20000)
        cached = {r: rng.randrange(prompt + 1) for r in ids if rng.random() < 0.5}
        ctx = RoutingContext("x", prompt, BLOCK, None, cached)
        loads = {
            c.replica_id: c.load.queued_prefill_tokens + 64 * c.load.num_running
            for c in cands
        }
        high, low = max(loads.values()), min(loads.values())
        if high - low > s.imbalance_abs_threshold and high > s.imbalance_rel_threshold * low:
            allowed = {r for r in ids if loads[r] == low}
        else:
            bound = s.load_bound_rel * sum(loads.values()) / len(ids) + s.load_bound_abs
            costs = {
                r: (prompt - cached.get(r, 0)) + s.load_weight * loads[r]
                for r in ids
                if loads[r] <= bound
            }
            best = min(costs.values())
            allowed = {r for r, c in costs.items() if c == best}
        assert policy.select(cands, ctx).replica_id in allowed


# -- SGLang cache_aware -------------------------------------------------------------------------


def test_sglang_routes_a_shared_prefix_to_the_same_worker() -> None:
    policy = SGLangCacheAwarePolicy()
    workers = [cand("a"), cand("b"), cand("c")]
    shared = list(range(10 * BLOCK))
    first = policy.select(workers, ctx_for(shared + [1] * BLOCK, now=0.0))
    for i in range(5):
        tokens = shared + [100 + i] * BLOCK  # 10 of 11 blocks match: rate 0.91 > 0.3
        assert policy.select(workers, ctx_for(tokens, now=1.0 + i)) is not None
        assert policy.select(workers, ctx_for(tokens, now=1.5 + i)).replica_id == first.replica_id


def test_sglang_low_match_goes_to_the_smallest_tree() -> None:
    policy = SGLangCacheAwarePolicy()
    workers = [cand("a"), cand("b")]
    big = policy.select(workers, ctx_for(list(range(20 * BLOCK)), now=0.0)).replica_id
    other = ({"a", "b"} - {big}).pop()
    # A prompt with nothing in common: match rate 0 <= 0.3, smallest tree wins.
    assert policy.select(workers, ctx_for([7] * 4 * BLOCK, now=1.0)).replica_id == other


def test_sglang_imbalance_takes_the_first_least_loaded() -> None:
    policy = SGLangCacheAwarePolicy()  # abs 64, rel 1.5
    workers = [cand("a", running=100), cand("b", running=10), cand("c", running=10)]
    assert policy.select(workers, ctx_for(list(range(64)))).replica_id == "b"
    # 70 - 10 <= 64: balanced, so the prompt goes back to b, which holds it, though busier.
    balanced = [cand("a", running=10), cand("b", running=70)]
    assert policy.select(balanced, ctx_for(list(range(64)), now=1.0)).replica_id == "b"


# -- Ray PrefixCacheAffinityRouter --------------------------------------------------------------


def test_ray_sticks_to_the_matching_replica_whatever_its_queue() -> None:
    policy = RayPrefixAffinityPolicy(seed=0)
    tokens = list(range(8 * BLOCK))
    first = policy.select([cand("a", waiting=1), cand("b", waiting=0)], ctx_for(tokens))
    assert first.replica_id == "b"  # all trees empty: smallest tenants, shortest queue
    busy = [cand("a", waiting=0), cand("b", waiting=50)]
    assert policy.select(busy, ctx_for(tokens, now=1.0)).replica_id == "b"


def test_ray_falls_back_to_power_of_two_when_imbalanced() -> None:
    policy = RayPrefixAffinityPolicy(imbalanced_threshold=5, seed=3)
    tokens = list(range(8 * BLOCK))
    policy.select([cand("a"), cand("b")], ctx_for(tokens))
    replicas = [cand("a", waiting=40), cand("b", waiting=0), cand("c", waiting=0)]
    for i in range(20):
        choice = policy.select(replicas, ctx_for(tokens, now=1.0 + i))
        assert choice.replica_id in {"b", "c"} or choice.load.num_waiting == 0


def test_ray_low_match_rate_picks_smallest_tenant() -> None:
    policy = RayPrefixAffinityPolicy(seed=0)
    replicas = [cand("a"), cand("b")]
    owner = policy.select(replicas, ctx_for(list(range(20 * BLOCK)))).replica_id
    other = ({"a", "b"} - {owner}).pop()
    assert policy.select(replicas, ctx_for([9] * 3 * BLOCK, now=1.0)).replica_id == other


# -- the shared tenant tree ---------------------------------------------------------------------


def test_tenant_tree_evicts_least_recent_leaves_first() -> None:
    tree = TenantTree(block_size=BLOCK)
    old = hash_token_blocks(list(range(3 * BLOCK)), BLOCK)
    new = hash_token_blocks([5] * 2 * BLOCK, BLOCK)
    tree.insert(old, "t", now=1.0)
    tree.insert(new, "t", now=2.0)
    assert tree.sizes["t"] == 5 * BLOCK
    removed = tree.evict("t", lambda _: tree.sizes["t"] <= 3 * BLOCK, group_equal_times=False)
    assert removed == 2 * BLOCK
    assert tree.walk(old) == (1, old[0])  # the two deepest old blocks went first
    assert tree.walk(new)[0] == 2


def test_tenant_tree_group_eviction_takes_all_equal_times() -> None:
    tree = TenantTree(block_size=BLOCK)
    old = hash_token_blocks(list(range(3 * BLOCK)), BLOCK)
    tree.insert(old, "t", now=1.0)
    tree.insert(hash_token_blocks([5] * BLOCK, BLOCK), "t", now=2.0)
    assert tree.evict("t", lambda removed: removed >= 1, group_equal_times=True) == 3 * BLOCK
    assert tree.walk(old) == (0, None)
