"""Simulated replicas: a FIFO prefill server with an LRU prefix cache, plus decode slots.

Prefill replicas only prefill. Decode replicas decode every sequence they hold at
``decode_s_per_token`` per token, and prefill locally when the router says so; a local prefill
stalls their running sequences for its duration (the engine runs one step at a time).
"""

from __future__ import annotations

import dataclasses
from collections import deque

from benchmarks.sim.cache import LRUBlockCache
from benchmarks.sim.trace import TRACE_BLOCK_TOKENS, TraceRequest
from router.policy import ReplicaLoad, RoutingContext


@dataclasses.dataclass(eq=False)
class Job:
    """One request moving through the simulated cluster."""

    index: int
    request: TraceRequest
    chains: list[int]
    arrival_s: float
    decode: SimReplica
    is_local: bool
    estimated_tokens: int  # uncached prompt tokens on its prefill replica, as routed
    ctx: RoutingContext  # what the router decided on, handed back to the policies when done
    prefill_id: str | None  # the prefill replica; None when prefilled on its decode replica
    prefill_tokens: int = 0  # uncached prompt tokens actually computed
    hit_tokens: int = 0
    stall_seen_s: float = 0.0  # the decode replica's stall already applied to this sequence
    decode_start_s: float = 0.0
    done_s: float = 0.0


class SimReplica:
    def __init__(
        self, replica_id: str, cache: LRUBlockCache, prefill_tokens_per_s: float,
        decode_step_s: float,
    ) -> None:
        self.replica_id = replica_id
        self.cache = cache
        # What a real replica measures on its own steps and reports (``ReplicaLoad``).
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.decode_step_s = decode_step_s
        self.queue: deque[Job] = deque()
        self.current: Job | None = None
        self.queued_tokens = 0  # prefill tokens queued or in service here
        self.num_running = 0  # sequences decoding here
        self.num_pending = 0  # sequences routed here whose KV has not arrived yet
        self.running_blocks = 0
        self.stall_s = 0.0  # total time local prefills stalled decoding here
        self.prefill_busy_s = 0.0
        self._last_s = 0.0
        self.queued_tokens_integral = 0.0
        self.running_integral = 0.0

    def advance(self, now: float) -> None:
        """Account the load held since the last change (call before every change)."""
        dt = now - self._last_s
        if dt > 0:
            self.queued_tokens_integral += self.queued_tokens * dt
            self.running_integral += self.num_running * dt
            self._last_s = now

    def load(self) -> ReplicaLoad:
        return ReplicaLoad(
            num_running=self.num_running + (1 if self.current else 0),
            num_waiting=len(self.queue) + self.num_pending,
            queued_prefill_tokens=self.queued_tokens,
            kv_usage=min(1.0, self.running_blocks / self.cache.capacity),
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            decode_step_s=self.decode_step_s,
        )

    def enqueue(self, job: Job, now: float) -> None:
        self.advance(now)
        self.queue.append(job)
        self.queued_tokens += job.estimated_tokens

    def start_next(self, now: float, s_per_token: float, overhead_s: float) -> float | None:
        """Start the next queued prefill; return its duration, or None if idle or busy."""
        if self.current is not None or not self.queue:
            return None
        self.advance(now)
        job = self.current = self.queue.popleft()
        hit_blocks = self.cache.lookup(job.chains)
        job.hit_tokens = min(hit_blocks * TRACE_BLOCK_TOKENS, job.request.input_length)
        job.prefill_tokens = job.request.input_length - job.hit_tokens
        self.queued_tokens += job.prefill_tokens - job.estimated_tokens
        duration = overhead_s + job.prefill_tokens * s_per_token
        self.prefill_busy_s += duration
        if job.is_local:
            self.stall_s += duration
        return duration

    def finish_prefill(self, now: float) -> Job:
        self.advance(now)
        job = self.current
        assert job is not None
        self.current = None
        self.queued_tokens -= job.prefill_tokens
        self.cache.store(job.chains, job.request.full_block_ids)
        return job

    def start_decode(self, job: Job, now: float) -> None:
        self.advance(now)
        if not job.is_local:
            self.num_pending -= 1
            self.cache.lookup(job.chains)
            self.cache.store(job.chains, job.request.full_block_ids)
        self.num_running += 1
        self.running_blocks += self._blocks_of(job)
        job.stall_seen_s = self.stall_s
        job.decode_start_s = now

    def finish_decode(self, job: Job, now: float) -> float:
        """End a sequence, or return how much later it ends because local prefills stalled it."""
        delay = self.stall_s - job.stall_seen_s
        if delay > 0:
            job.stall_seen_s = self.stall_s
            return delay
        self.advance(now)
        self.num_running -= 1
        self.running_blocks -= self._blocks_of(job)
        job.done_s = now
        return 0.0

    @staticmethod
    def _blocks_of(job: Job) -> int:
        tokens = job.request.input_length + job.request.output_length
        return -(-tokens // TRACE_BLOCK_TOKENS)
