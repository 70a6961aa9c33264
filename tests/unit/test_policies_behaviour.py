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
    # Nominal 10k tokens/s. Finishes: a 0.4096 s (computes everything), b 12 s (cached, but
    # 120k tokens queued); bound 1.5 * 6.2 + 0 = 9.3 s: b is out.
    policy = CacheCostPolicy(load_bound_rel=1.5, load_bound_abs_s=0.0, seed=0)
    ctx = ctx_for(list(range(4096)), {"b": 4096})
    choice = policy.select([cand("a", queued=0), cand("b", queued=120_000)], ctx)
    assert choice.replica_id == "a"


def test_cache_cost_counts_in_each_replica_s_measured_speed() -> None:
    policy = CacheCostPolicy(seed=0)
    slow = Candidate("slow", ReplicaLoad(prefill_tokens_per_s=5_000.0))
    fast = Candidate("fast", ReplicaLoad(prefill_tokens_per_s=20_000.0))
    assert policy.select([slow, fast], ctx_for(list(range(4096)))).replica_id == "fast"
    # The same 20k queued tokens are 4 s on the slow replica and 1 s on the fast one.
    busy_slow = Candidate("slow", ReplicaLoad(queued_prefill_tokens=20_000,
                                              prefill_tokens_per_s=5_000.0))
    assert policy.wait_s(busy_slow) == 4.0


def test_cache_cost_follows_a_prefix_it_sent_before_the_index_sees_it() -> None:
    policy = CacheCostPolicy(seed=0)
    tokens = list(range(4096))
    longer = tokens + list(range(5000, 5512))

    def ctx(request_id: str, prompt: list[int], now: float) -> RoutingContext:
        return RoutingContext(request_id, len(prompt), BLOCK, prompt, {},
                              hash_token_blocks(prompt, BLOCK), now)

    first = ctx("a", tokens, 0.0)
    assert policy.select([cand("r0"), cand("r1", queued=100)], first).replica_id == "r0"
    # r0 is busier now, and the index has not seen the first prompt: the prefix still pulls.
    busier = [cand("r0", queued=3000), cand("r1", queued=100)]
    second = ctx("b", longer, 1.0)
    assert policy.select(busier, second).replica_id == "r0"
    policy.on_request_done("r0", first)
    policy.on_request_done("r0", second)
    assert policy.select(busier, ctx("c", longer, 2.0)).replica_id == "r1"


def test_cache_cost_spreads_a_hot_prefix_but_not_a_cold_one() -> None:
    """r0 holds a 4096-token prefix and has 0.8 s queued; r1 is idle. A request that is alone
    on the prefix stays on r0 (0.05 s + 0.1 * 0.8 s against 0.46 s on r1). When 20 requests
    reused the prefix within the horizon, r1 would share its copy with about 10 of them: its
    charge falls to 0.46 - 0.41 * 0.9 s and it wins; once r1 holds the prefix too, the next
    copy would be shared by fewer."""
    policy = CacheCostPolicy(reuse_horizon_s=10.0, in_flight_ttl_s=0, seed=0)
    cands = [cand("r0", queued=8000), cand("r1")]

    def ctx(i: int, now: float, cached: dict[str, int]) -> RoutingContext:
        prompt = list(range(4096)) + [10_000 + i] * 512
        return RoutingContext(f"q{i}", len(prompt), BLOCK, prompt, cached,
                              hash_token_blocks(prompt, BLOCK), now)

    assert policy.select(cands, ctx(0, 0.0, {"r0": 4096})).replica_id == "r0"
    assert policy.charged_tokens(cands[0], ctx(0, 0.0, {"r0": 4096})) == 512
    choices = [policy.select(cands, ctx(i, 0.01 * i, {"r0": 4096})).replica_id
               for i in range(1, 20)]
    assert choices[:3] == ["r0"] * 3 and choices[-1] == "r1"
    hot = ctx(20, 0.2, {"r0": 4096})
    assert policy.select(cands, hot).replica_id == "r1"
    charged = policy.charged_tokens(cands[1], hot)
    assert 512 < charged < 4096 + 512 - 0.85 * 4096
    # Without the horizon the same hot request stays on r0.
    assert CacheCostPolicy(in_flight_ttl_s=0, seed=0).select(cands, hot).replica_id == "r0"


def test_cache_cost_counts_a_retried_request_once_as_a_reuse() -> None:
    """Routed again before it finished (a retry after a failed prefill), a request is the same
    reuse of its prefix: twenty retries of one request do not make the prefix hot, twenty
    requests do."""
    cands = [cand("r0", queued=8000), cand("r1")]

    def ctx(request_id: str, now: float, is_retry: bool = False) -> RoutingContext:
        prompt = list(range(4096)) + [10_000] * 512
        return RoutingContext(request_id, len(prompt), BLOCK, prompt, {"r0": 4096},
                              hash_token_blocks(prompt, BLOCK), now, is_retry=is_retry)

    for in_flight_ttl_s in (120.0, 0.0):  # whether or not the policy tracks its prompts
        retried = CacheCostPolicy(reuse_horizon_s=10.0, in_flight_ttl_s=in_flight_ttl_s, seed=0)
        assert {retried.select(cands, ctx("q", 0.01 * i, is_retry=i > 0)).replica_id
                for i in range(20)} == {"r0"}
    distinct = CacheCostPolicy(reuse_horizon_s=10.0, seed=0)
    assert distinct.select(cands, ctx("q20", 0.0)).replica_id == "r0"
    assert [distinct.select(cands, ctx(f"q{i}", 0.01 * i)).replica_id
            for i in range(20)][-1] == "r1"


def test_cache_cost_picks_within_the_restated_rule() -> None:
    rng = random.Random(1)
    policy = CacheCostPolicy(running_seq_tokens=64, in_flight_ttl_s=0, seed=0)
    s = policy.settings
    speed = s.nominal_tokens_per_s
    for _ in range(500):
        ids = [f"r{i}" for i in range(rng.randint(1, 6))]
        cands = [cand(r, rng.randrange(40_000), rng.randrange(40)) for r in ids]
        prompt = rng.randrange(1, 20000)
        cached = {r: rng.randrange(prompt + 1) for r in ids if rng.random() < 0.5}
        ctx = RoutingContext("x", prompt, BLOCK, None, cached)
        wait = {
            c.replica_id: (c.load.queued_prefill_tokens + 64 * c.load.num_running) / speed
            for c in cands
        }
        compute = {r: (prompt - cached.get(r, 0)) / speed for r in ids}
        finish = {r: wait[r] + compute[r] for r in ids}
        bound = (
            s.load_bound_rel * sum(finish.values()) / len(ids)
            + s.load_bound_prompts * prompt / speed
            + s.load_bound_abs_s
        )
        costs = {r: compute[r] + s.load_weight * wait[r] for r in ids if finish[r] <= bound}
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
