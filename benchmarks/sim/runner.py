"""Runs router setups over one trace and reports them beside the no-routing references."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from benchmarks.sim.cluster import ClusterSim, CostModel
from benchmarks.sim.reference import infinite_cache_hits, lru_cache_hits
from benchmarks.sim.report import SetupMetrics, summarize
from benchmarks.sim.setups import SETUPS, RouterSetup
from benchmarks.sim.trace import TraceRequest, chain_hashes, count_distinct_blocks


@dataclasses.dataclass(frozen=True)
class SimSettings:
    num_prefill: int = 8
    num_decode: int = 8
    # All replicas' caches together hold this fraction of the trace's distinct blocks.
    cache_fraction: float = 0.25
    # Set the prefill speed so that the prefill pool would be this busy at the reference hit
    # rate; None keeps ``costs.prefill_s_per_token``. Time itself is never stretched: think
    # times and tool latencies of multi-turn traces stay as recorded.
    utilization: float | None = 0.6
    costs: CostModel = CostModel()


@dataclasses.dataclass(frozen=True)
class SimReport:
    num_requests: int
    num_distinct_blocks: int
    capacity_blocks: int  # per replica
    prefill_tokens_per_s: float  # per prefill replica
    ceiling_hit_rate: float  # one infinite cache
    reference_hit_rate: float  # one LRU cache of all replicas' capacity
    # One LRU cache of half that capacity: a disaggregated prompt sits in two caches (its
    # prefill and its decode replica), so this is about what P/D placement can hold at most.
    half_reference_hit_rate: float
    rows: list[SetupMetrics]


def hit_rate(requests: Sequence[TraceRequest], hits: Sequence[int]) -> float:
    prompt = sum(r.input_length for r in requests)
    return sum(hits) / prompt if prompt else 0.0


def calibrate_costs(
    requests: Sequence[TraceRequest], ref_hits: Sequence[int], settings: SimSettings
) -> CostModel:
    """Prefill speed that keeps the prefill pool ``settings.utilization`` busy at ``ref_hits``."""
    costs = settings.costs
    if settings.utilization is None or len(requests) < 2:
        return costs
    span_s = (requests[-1].timestamp_ms - requests[0].timestamp_ms) / 1000.0
    busy_s = settings.num_prefill * settings.utilization * span_s
    overhead_s = costs.prefill_overhead_s * len(requests)
    tokens = sum(r.input_length - hit for r, hit in zip(requests, ref_hits, strict=True))
    if busy_s <= overhead_s or tokens == 0:
        raise ValueError("trace too dense for the requested utilization")
    return dataclasses.replace(costs, prefill_s_per_token=(busy_s - overhead_s) / tokens)


def simulate(
    requests: Sequence[TraceRequest],
    setups: Sequence[str],
    settings: SimSettings | None = None,
    extra_setups: dict[str, RouterSetup] | None = None,
) -> SimReport:
    """Replay ``requests`` under each named setup (see ``setups.SETUPS``)."""
    settings = settings or SimSettings()
    known = {**SETUPS, **(extra_setups or {})}
    requests = sorted(requests, key=lambda r: r.timestamp_ms)
    chains = [chain_hashes(r) for r in requests]
    distinct = count_distinct_blocks(chains)
    num_replicas = settings.num_prefill + settings.num_decode
    capacity = max(1, round(settings.cache_fraction * distinct / num_replicas))
    ref_hits = lru_cache_hits(requests, chains, capacity * num_replicas)
    costs = calibrate_costs(requests, ref_hits, settings)
    rows = []
    for name in setups:
        sim = ClusterSim(known[name], settings.num_prefill, settings.num_decode, capacity, costs)
        rows.append(summarize(name, sim.run(requests, chains)))
    return SimReport(
        num_requests=len(requests),
        num_distinct_blocks=distinct,
        capacity_blocks=capacity,
        prefill_tokens_per_s=1.0 / costs.prefill_s_per_token,
        ceiling_hit_rate=hit_rate(requests, infinite_cache_hits(requests, chains)),
        reference_hit_rate=hit_rate(requests, ref_hits),
        half_reference_hit_rate=hit_rate(
            requests, lru_cache_hits(requests, chains, capacity * num_replicas // 2)
        ),
        rows=rows,
    )
