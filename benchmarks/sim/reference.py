"""Hit rates with no routing at all: one cache that sees every request, in arrival order.

``infinite``: a cache that never evicts (the ceiling any router can reach). ``lru``: one LRU
cache as large as all replicas' caches together (the reference a router should approach).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from benchmarks.sim.trace import TRACE_BLOCK_TOKENS, TraceRequest


def hit_tokens(request: TraceRequest, hit_blocks: int) -> int:
    return min(hit_blocks * TRACE_BLOCK_TOKENS, request.input_length)


def infinite_cache_hits(
    requests: Sequence[TraceRequest], chains: Sequence[Sequence[int]]
) -> list[int]:
    """Cached prompt tokens per request with a cache that keeps everything."""
    seen: set[int] = set()
    hits = []
    for request, request_chains in zip(requests, chains, strict=True):
        hit = 0
        for chain in request_chains:
            if chain not in seen:
                break
            hit += 1
        hits.append(hit_tokens(request, hit))
        seen.update(request_chains)
    return hits


def lru_cache_hits(
    requests: Sequence[TraceRequest], chains: Sequence[Sequence[int]], capacity: int
) -> list[int]:
    """Cached prompt tokens per request with one LRU cache of ``capacity`` blocks."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = []
    for request, request_chains in zip(requests, chains, strict=True):
        hit = 0
        for chain in request_chains:
            if chain not in cache:
                break
            hit += 1
        hits.append(hit_tokens(request, hit))
        for chain in request_chains:
            if chain in cache:
                cache.move_to_end(chain)
            else:
                cache[chain] = None
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits
