"""The trace-driven simulator: hit accounting on a hand-worked trace, and a small smoke run."""

from __future__ import annotations

import random

import pytest

from benchmarks.sim.cache import LRUBlockCache
from benchmarks.sim.cluster import ClusterSim, CostModel, SimOutcome
from benchmarks.sim.generators import generate
from benchmarks.sim.reference import infinite_cache_hits, lru_cache_hits
from benchmarks.sim.replica import SimReplica
from benchmarks.sim.report import summarize
from benchmarks.sim.runner import SimSettings, simulate
from benchmarks.sim.setups import SETUPS
from benchmarks.sim.synthetic import (
    AgentSettings,
    MultiTurnSettings,
    SharedPromptSettings,
    agent_branching,
    multi_turn,
    shared_prompts,
)
from benchmarks.sim.trace import TraceRequest, chain_hashes, load_trace, save_trace
from router.kvindex import KVIndex

COSTS = CostModel(
    prefill_s_per_token=0.001, prefill_overhead_s=0.0, decode_s_per_token=0.01,
    transfer_s_per_token=0.0,
)


def hand_trace() -> list[TraceRequest]:
    return [
        TraceRequest(0.0, 1536, 10, (1, 2, 3)),  # 3 full blocks
        TraceRequest(100_000.0, 1800, 10, (1, 2, 3, 4)),  # same 3 blocks + a partial one
        TraceRequest(200_000.0, 1024, 10, (9, 10)),  # unrelated
    ]


def run(setup: str, trace: list[TraceRequest], capacity: int = 10) -> ClusterSim:
    sim = ClusterSim(SETUPS[setup], 1, 1, capacity, COSTS)
    sim.outcome = sim.run(trace, [chain_hashes(r) for r in trace])  # type: ignore[attr-defined]
    return sim


def test_hit_accounting_on_a_hand_worked_trace() -> None:
    sim = run("round_robin", hand_trace())
    jobs = sim.outcome.jobs  # type: ignore[attr-defined]
    assert [j.hit_tokens for j in jobs] == [0, 1536, 0]
    assert [j.is_local for j in jobs] == [False, False, False]
    # TTFT = prefill of the uncached tokens at 1 ms each (no queueing, free transfer).
    assert sim.outcome.ttft_s == pytest.approx([1.536, 0.264, 1.024])  # type: ignore[attr-defined]


def test_decode_replica_prefills_a_prompt_it_holds_itself() -> None:
    trace = [
        TraceRequest(0.0, 1536, 10, (1, 2, 3)),
        TraceRequest(100_000.0, 1546, 10, (1, 2, 3, 4)),  # the same 3 blocks + 10 tokens
        TraceRequest(200_000.0, 1800, 10, (1, 2, 3, 5)),  # + 264 tokens: both pools hold 3
    ]
    sim = run("cache_cost", trace)
    jobs = sim.outcome.jobs  # type: ignore[attr-defined]
    assert [j.is_local for j in jobs] == [False, True, False]
    assert [j.hit_tokens for j in jobs] == [0, 1536, 1536]


def test_lru_eviction_costs_the_hit() -> None:
    # Capacity 3: the third request evicts the first prompt's blocks before it comes back.
    trace = [
        TraceRequest(0.0, 1024, 5, (1, 2)),
        TraceRequest(50_000.0, 1024, 5, (7, 8)),
        TraceRequest(100_000.0, 1024, 5, (1, 2)),
    ]
    sim = run("round_robin", trace, capacity=3)
    assert [j.hit_tokens for j in sim.outcome.jobs] == [0, 0, 0]  # type: ignore[attr-defined]
    sim = run("round_robin", trace, capacity=4)
    assert [j.hit_tokens for j in sim.outcome.jobs] == [0, 0, 1024]  # type: ignore[attr-defined]


def test_references_on_a_hand_worked_trace() -> None:
    trace = [
        TraceRequest(0.0, 1024, 1, (1, 2)),
        TraceRequest(1.0, 512, 1, (3,)),
        TraceRequest(2.0, 1100, 1, (1, 2, 5)),
    ]
    chains = [chain_hashes(r) for r in trace]
    assert infinite_cache_hits(trace, chains) == [0, 0, 1024]
    assert lru_cache_hits(trace, chains, capacity=3) == [0, 0, 1024]
    assert lru_cache_hits(trace, chains, capacity=2) == [0, 0, 0]  # block 1 was evicted


def test_index_mirrors_every_cache_after_a_run() -> None:
    trace = multi_turn(MultiTurnSettings(num_conversations=40, rate_per_s=2.0), seed=3)
    chains = [chain_hashes(r) for r in trace]
    sim = ClusterSim(SETUPS["cache_cost"], 2, 2, 12, COSTS)  # small caches: many evictions
    sim.run(trace, chains)
    for replica in sim.prefill + sim.decode:
        for request_chains in chains:
            held = replica.cache.cached_prefix(request_chains)
            assert sim.index.match(request_chains).get(replica.replica_id, 0) == held
    assert sim.index.stats().num_orphan_blocks == 0


def test_lru_cache_events_rebuild_its_contents() -> None:
    index = KVIndex()
    cache = LRUBlockCache(5, lambda event: index.apply("r", event))
    rng = random.Random(0)
    prompts = [[rng.randrange(4) for _ in range(rng.randint(1, 6))] for _ in range(200)]
    for tokens in prompts:
        chains = chain_hashes(TraceRequest(0.0, 512 * len(tokens), 1, tuple(tokens)))
        cache.lookup(chains)
        cache.store(chains, tokens)
        assert len(cache) <= 5
        assert index.num_blocks == len(cache)


def test_generators_write_valid_mooncake_traces(tmp_path: object) -> None:
    small = {
        "shared": shared_prompts(SharedPromptSettings(num_requests=200), seed=1),
        "multiturn": multi_turn(MultiTurnSettings(num_conversations=30), seed=1),
        "agent": agent_branching(AgentSettings(num_sessions=10), seed=1),
        **{kind: generate(kind, seed=1, scale=0.03) for kind in ("conversation", "tool_agent")},
        "mix": generate("mix", seed=1, scale=0.05),
    }
    for trace in small.values():
        parents: dict[int, int] = {}
        for r in trace:
            assert len(r.hash_ids) == -(-r.input_length // 512)
            for parent, block in zip((-1, *r.hash_ids), r.hash_ids, strict=False):
                assert parents.setdefault(block, parent) == parent  # an id fixes its prefix
        assert [r.timestamp_ms for r in trace] == sorted(r.timestamp_ms for r in trace)
    path = f"{tmp_path}/trace.jsonl"
    save_trace(small["agent"], path)
    assert load_trace(path) == small["agent"]
    with pytest.raises(ValueError):
        generate("nope")


def test_production_shaped_generators() -> None:
    conversation = generate("conversation", seed=1, scale=0.05)
    first_blocks = {r.hash_ids[0] for r in conversation}
    assert len(first_blocks) == 1  # every prompt starts with the same block
    assert all(r.timestamp_ms < 180_000.0 for r in conversation)  # the window, cut
    agents = generate("tool_agent", seed=1, scale=0.05)
    by_prefix: dict[tuple[int, ...], int] = {}
    for r in agents:  # a step's prompt extends the previous step's
        by_prefix[r.hash_ids[:8]] = max(by_prefix.get(r.hash_ids[:8], 0), r.input_length)
    assert max(by_prefix.values()) > 10_000
    mix = generate("mix", seed=1, scale=0.1)
    assert len(mix) > 50 and [r.timestamp_ms for r in mix] == sorted(r.timestamp_ms for r in mix)
    assert generate("mix", seed=1, scale=0.1) == mix  # a seed fixes the trace
    assert generate("mix", seed=2, scale=0.1) != mix


def test_small_simulation_runs_every_setup() -> None:
    trace = multi_turn(MultiTurnSettings(num_conversations=60, rate_per_s=1.0), seed=0)
    report = simulate(trace, sorted(SETUPS), SimSettings(num_prefill=2, num_decode=2))
    assert [m.label for m in report.rows] == sorted(SETUPS)
    assert report.ceiling_hit_rate >= report.reference_hit_rate >= report.half_reference_hit_rate
    for m in report.rows:
        assert 0.0 <= m.hit_rate <= report.ceiling_hit_rate + 1e-9  # nothing beats keeping all
        assert m.prefill_imbalance >= 1.0 and m.decode_imbalance >= 1.0
        assert m.ttft_p99_s >= m.ttft_p50_s > 0.0


def test_prefill_queue_is_reported_as_a_ratio_and_in_seconds() -> None:
    """Over 10 s, one replica held 5,000 token-seconds of queued prefill at 1,000 tokens/s
    (0.5 s of work on average), the other 1,000 at 500 tokens/s (0.2 s)."""
    busy, quiet = (SimReplica(f"p{i}", LRUBlockCache(1, lambda event: None), speed, 0.02)
                   for i, speed in enumerate((1000.0, 500.0)))
    busy.queued_tokens_integral, quiet.queued_tokens_integral = 5000.0, 1000.0
    m = summarize("x", SimOutcome([], [], [busy, quiet], [], 0, 10.0, 0))
    assert m.prefill_imbalance == pytest.approx(5000 / 3000)
    assert m.prefill_queue_max_s == pytest.approx(0.5)
