"""The discrete-event simulation of one router setup over one trace.

Per request: the router matches the prompt in the KV index (fed only by the replicas' cache
events), builds one ``RoutingContext`` and asks ``PairSelector`` for a pair. The prefill runs on
the prefill replica (or locally on the decode replica), which looks up its LRU cache when the
prefill starts and stores the prompt's blocks when it ends; the KV then moves to the decode
replica (blocks it lacks, at ``transfer_s_per_token``), which stores them and decodes.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Callable, Sequence
from functools import partial

from benchmarks.sim.cache import LRUBlockCache
from benchmarks.sim.replica import Job, SimReplica
from benchmarks.sim.setups import RouterSetup
from benchmarks.sim.trace import TRACE_BLOCK_TOKENS, TraceRequest
from router.kvindex import KVIndex
from router.pairing import PairSelector
from router.policies import make_policy
from router.policy import Candidate, RoutingContext


@dataclasses.dataclass(frozen=True)
class CostModel:
    prefill_s_per_token: float = 5e-5  # 20k prompt tokens/s per replica
    prefill_overhead_s: float = 0.003
    decode_s_per_token: float = 0.02
    transfer_s_per_token: float = 5e-6


@dataclasses.dataclass
class SimOutcome:
    """What one setup did over the trace."""

    jobs: list[Job]
    ttft_s: list[float]
    prefill: list[SimReplica]
    decode: list[SimReplica]
    transfer_tokens: int
    duration_s: float
    num_index_events: int


class ClusterSim:
    def __init__(
        self,
        setup: RouterSetup,
        num_prefill: int,
        num_decode: int,
        capacity_blocks: int,
        costs: CostModel,
    ) -> None:
        self.now = 0.0
        self.costs = costs
        self.index = KVIndex(clock=lambda: self.now)
        self.prefill = [self._replica(f"prefill-{i}", capacity_blocks) for i in range(num_prefill)]
        self.decode = [self._replica(f"decode-{i}", capacity_blocks) for i in range(num_decode)]
        self.selector = PairSelector(
            make_policy(setup.prefill_policy, **setup.prefill_settings),
            make_policy(setup.decode_policy, **setup.decode_settings),
            setup.pairing,
        )
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._jobs: list[Job] = []
        self._ttft: list[float] = []
        self._transfer_tokens = 0

    def _replica(self, replica_id: str, capacity: int) -> SimReplica:
        cache = LRUBlockCache(capacity, partial(self.index.apply, replica_id))
        c = self.costs
        return SimReplica(replica_id, cache, 1.0 / c.prefill_s_per_token, c.decode_s_per_token)

    def run(self, requests: Sequence[TraceRequest], chains: Sequence[list[int]]) -> SimOutcome:
        t0 = requests[0].timestamp_ms / 1000.0 if requests else 0.0
        for i, request in enumerate(requests):
            at = request.timestamp_ms / 1000.0 - t0
            self._at(at, partial(self._arrive, i, request, chains[i]))
        while self._events:
            self.now, _, action = heapq.heappop(self._events)
            action()
        for replica in self.prefill + self.decode:
            replica.advance(self.now)
        num_events = sum(r.cache.num_events for r in self.prefill + self.decode)
        return SimOutcome(
            self._jobs, self._ttft, self.prefill, self.decode, self._transfer_tokens,
            self.now, num_events,
        )

    def _at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._order), action))

    def _arrive(self, index: int, request: TraceRequest, chains: list[int]) -> None:
        ctx = self._context(index, request, chains)
        by_id = {r.replica_id: r for r in self.prefill + self.decode}
        choice = self.selector.select(
            [Candidate(r.replica_id, r.load()) for r in self.prefill],
            [Candidate(r.replica_id, r.load()) for r in self.decode],
            ctx,
        )
        decode = by_id[choice.decode.replica_id]
        server = decode if choice.prefill is None else by_id[choice.prefill.replica_id]
        job = Job(
            index, request, chains, self.now, decode, choice.is_local_prefill,
            estimated_tokens=ctx.uncached_tokens(server.replica_id), ctx=ctx,
            prefill_id=None if choice.prefill is None else choice.prefill.replica_id,
        )
        self._jobs.append(job)
        if not job.is_local:
            decode.num_pending += 1
        server.enqueue(job, self.now)
        self._try_start(server)

    def _context(self, index: int, request: TraceRequest, chains: list[int]) -> RoutingContext:
        cached = {
            replica_id: min(blocks * TRACE_BLOCK_TOKENS, request.input_length)
            for replica_id, blocks in self.index.match(chains).items()
        }
        return RoutingContext(
            request_id=str(index),
            num_prompt_tokens=request.input_length,
            block_size=TRACE_BLOCK_TOKENS,
            cached_tokens=cached,
            block_hashes=chains,
            now_s=self.now,
        )

    def _try_start(self, server: SimReplica) -> None:
        c = self.costs
        duration = server.start_next(self.now, c.prefill_s_per_token, c.prefill_overhead_s)
        if duration is not None:
            self._at(self.now + duration, partial(self._prefill_done, server))

    def _prefill_done(self, server: SimReplica) -> None:
        job = server.finish_prefill(self.now)
        self._try_start(server)
        if job.is_local:
            self._ttft.append(self.now - job.arrival_s)
            self._decode_start(job)
            return
        cached = job.decode.cache.cached_prefix(job.chains) * TRACE_BLOCK_TOKENS
        moved = max(0, job.request.input_length - cached)
        self._transfer_tokens += moved
        arrive = self.now + moved * self.costs.transfer_s_per_token
        self._ttft.append(arrive - job.arrival_s)
        self._at(arrive, partial(self._decode_start, job))

    def _decode_start(self, job: Job) -> None:
        job.decode.start_decode(job, self.now)
        length = job.request.output_length * self.costs.decode_s_per_token
        self._at(self.now + length, partial(self._decode_done, job))

    def _decode_done(self, job: Job) -> None:
        delay = job.decode.finish_decode(job, self.now)
        if delay > 0:
            self._at(self.now + delay, partial(self._decode_done, job))
            return
        if job.prefill_id is not None:  # the router's coordinator.done, as in production
            self.selector.prefill_policy.on_request_done(job.prefill_id, job.ctx)
        self.selector.decode_policy.on_request_done(job.decode.replica_id, job.ctx)
