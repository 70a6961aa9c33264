"""Cache-cost routing: send a request where it finishes soonest without losing its cache hits.

Everything is counted in seconds of the candidate's own compute, at the prefill speed it reports
(``ReplicaLoad.prefill_tokens_per_s``; ``nominal_tokens_per_s`` when it reports none)::

    wait    = (queued prefill tokens
               + running_seq_tokens * running sequences      (decode pools)
               + kv_usage_tokens    * KV cache usage 0..1)   (decode pools)   / speed
    compute = prompt tokens not cached there (from the KV index)               / speed

and ``finish = wait + compute`` is when the request's prefill would end there. Bounded load
(as in consistent hashing with bounded loads): a candidate is allowed when

    finish <= load_bound_rel * (mean finish over the candidates)
              + load_bound_prompts * (time it takes to compute the whole prompt there)
              + load_bound_abs_s

The middle term scales the slack with the request, in units of what a complete cache miss would
cost it: a long conversation may wait behind a few of its own prefill times before it leaves the
replica holding its history, a short request hardly at all. Every term is a time on the
replicas' measured speed, so one setting fits slow and fast hardware alike.

The allowed candidate with the least ``compute + load_weight * wait`` wins. With a small
``load_weight`` the cache decides inside the band (the pool does the least work, which is what
keeps every queue short under load) and the band keeps the balance; the soonest finishing
candidate is always allowed. ``load_weight`` 1 is the greedy "soonest first token" choice, which
under load chases short queues and loses the cache hits that would have kept them short.

The cached tokens are the KV index's, or more where this policy has sent a request with the same
prefix to that candidate that has not finished yet (``in_flight``): it runs first there, so the
blocks will be cached when this request runs.

A hot prefix is copied rather than queued for. A miss on the longest prefix some candidate holds is
paid once and then serves every later request that goes there, so when many requests reuse that
prefix (``router.policies.prefix_heat``: decayed counts over ``reuse_horizon_s``; a retry, which
the coordinator marks ``RoutingContext.is_retry``, is not counted again), a candidate that lacks it
is charged only its share of the copy: the compute of the missing part divided by the requests
expected to reuse it there (the recent count over the holders there would then be), if that is at
least ``reuse_min_requests``. A few long system prompts behind most of the traffic then spread over
as many replicas as their load needs, instead of queueing on the one that computed them first; a
conversation's history, reused once a turn, is still paid in full. The band sees the whole compute;
``charged_tokens`` tells the pairing what the choice was charged, so that a copy made on purpose is
not taken for a replica sent away from the cache. The charge is in the KV index's terms, as the
pairing's other figures are: a copy still in flight is charged as a share of a copy, not as a hit.

Ties go to the sooner finish (``wait + compute``), then to a seeded random pick, so that cold
prompts spread.

There is no separate imbalance guard (as SGLang's router has): the band is one, and measured in
the simulator a guard that sets the cache aside moved agent sessions off their cache under load,
which is what made the load worse.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from router.policies.in_flight import InFlightPrompts
from router.policies.prefix_heat import PrefixHeat
from router.policy import (
    NOMINAL_PREFILL_TOKENS_PER_S,
    Candidate,
    RoutingContext,
    RoutingPolicy,
)


class CacheCostSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    load_weight: float = Field(
        0.1, ge=0, description="Weight of a second of expected wait against a second of "
        "compute, inside the load band (0: the cache alone decides there)."
    )
    running_seq_tokens: float = Field(
        0.0, ge=0,
        description="Load of one running sequence, in prefill-token equivalents (decode pools).",
    )
    kv_usage_tokens: float = Field(
        0.0, ge=0, description="Load of a full KV cache (kv_usage 1.0), in prefill-token "
        "equivalents (decode pools).",
    )
    nominal_tokens_per_s: float = Field(
        NOMINAL_PREFILL_TOKENS_PER_S, gt=0,
        description="Prefill speed assumed for a replica that reports none (tokens/s).",
    )
    load_bound_rel: float = Field(
        1.5, ge=1.0, description="Bounded load: a candidate is allowed while the request "
        "would finish there within this multiple of the mean finish over the candidates (plus "
        "load_bound_abs_s).",
    )
    load_bound_abs_s: float = Field(
        0.0, ge=0, description="Bounded load: slack in seconds added to the bound.",
    )
    load_bound_prompts: float = Field(
        4.0, ge=0, description="Bounded load: more slack, in units of the time the candidate "
        "would take to compute this whole prompt (what losing its cache hit costs at most).",
    )
    in_flight_ttl_s: float = Field(
        120.0, ge=0, description="Count the prompts of requests this policy routed and that "
        "have not finished as cached where they went, for at most this long (0: the KV index "
        "alone)."
    )
    reuse_horizon_s: float = Field(
        60.0, ge=0, description="Share a miss on a prefix that other candidates hold among the "
        "requests expected to reuse it: a candidate's compute for that part is divided by the "
        "requests that reused the prefix within about this many seconds, per holder it would "
        "make (0: every request pays its whole miss).",
    )
    reuse_min_requests: float = Field(
        8.0, ge=1, description="...only when at least this many requests would share it: a "
        "prefix reused less often is paid by the request that misses it.",
    )
    seed: int | None = Field(None, description="Seed of the tie-breaking random generator.")


class CacheCostPolicy(RoutingPolicy):
    """Least compute within a bounded load, in seconds; see the module docstring."""

    name = "cache_cost"

    def __init__(self, **settings: Any) -> None:
        self.settings = CacheCostSettings(**settings)
        self._rng = random.Random(self.settings.seed)
        self._in_flight = InFlightPrompts(self.settings.in_flight_ttl_s)
        horizon_s = self.settings.reuse_horizon_s
        self._heat = PrefixHeat(horizon_s) if horizon_s else None
        # (request id, replica id, tokens): what the last select charged its choice
        self._last_charged: tuple[str, str, float] | None = None

    def speed(self, candidate: Candidate) -> float:
        """Prefill tokens per second the candidate computes (reported, else nominal)."""
        return candidate.load.prefill_speed(self.settings.nominal_tokens_per_s)

    def wait_s(self, candidate: Candidate) -> float:
        """Seconds of work already on the candidate."""
        s, load = self.settings, candidate.load
        tokens = (
            load.queued_prefill_tokens
            + s.running_seq_tokens * load.num_running
            + s.kv_usage_tokens * load.kv_usage
        )
        return tokens / self.speed(candidate)

    def cached_tokens(self, ctx: RoutingContext, now_s: float) -> dict[str, int]:
        """Prompt tokens each replica holds or will hold before this request runs there."""
        if not self.settings.in_flight_ttl_s or not ctx.block_hashes:
            return dict(ctx.cached_tokens)
        self._in_flight.expire(now_s)
        cached = dict(ctx.cached_tokens)
        in_flight = self._in_flight.matched_blocks(ctx.block_hashes, ctx.block_size)
        for replica_id, blocks in in_flight.items():
            tokens = min(blocks * ctx.block_size, ctx.num_prompt_tokens)
            cached[replica_id] = max(cached.get(replica_id, 0), tokens)
        return cached

    def compute_s(self, candidate: Candidate, ctx: RoutingContext, cached_tokens: int) -> float:
        """Seconds the candidate would spend on this request's uncached tokens."""
        return max(0, ctx.num_prompt_tokens - cached_tokens) / self.speed(candidate)

    def select(self, candidates: Sequence[Candidate], ctx: RoutingContext) -> Candidate:
        now_s = time.monotonic() if ctx.now_s is None else ctx.now_s
        cached = self.cached_tokens(ctx, now_s)
        shared, reuse = self._reuse(
            candidates, ctx, cached, now_s, count_it=not ctx.is_retry
        )
        sharers = self._sharers(reuse, candidates, cached, shared)
        choice = self._best(candidates, ctx, cached, shared, sharers)
        # The pairing counts every replica's tokens in the KV index's terms (blocks cached now),
        # so the charge does too: a copy still in flight is not a holder yet.
        indexed = ctx.cached_tokens
        self._last_charged = (ctx.request_id, choice.replica_id, charge_tokens(
            ctx, indexed.get(choice.replica_id, 0), shared,
            self._sharers(reuse, candidates, indexed, shared),
        ))
        if self.settings.in_flight_ttl_s and ctx.block_hashes:
            self._in_flight.add(
                ctx.request_id, choice.replica_id, ctx.block_hashes, ctx.block_size, now_s
            )
        return choice

    def charged_tokens(self, choice: Candidate, ctx: RoutingContext) -> float:
        last = self._last_charged
        if last is None or last[:2] != (ctx.request_id, choice.replica_id):
            return super().charged_tokens(choice, ctx)
        return last[2]

    def on_request_done(self, replica_id: str, ctx: RoutingContext) -> None:
        self._in_flight.remove(ctx.request_id)

    def _reuse(
        self, candidates: Sequence[Candidate], ctx: RoutingContext, cached: Mapping[str, int],
        now_s: float, count_it: bool = True,
    ) -> tuple[int, float]:
        """The longest prefix a candidate holds (tokens), and how many requests reused it
        within about ``reuse_horizon_s``, this one counted if ``count_it`` (0: no count)."""
        shared = max((cached.get(c.replica_id, 0) for c in candidates), default=0)
        num_blocks = min(shared // max(1, ctx.block_size), len(ctx.block_hashes))
        if self._heat is None or num_blocks == 0:
            return shared, 0.0
        key = ctx.block_hashes[num_blocks - 1]
        return shared, self._heat.record(key, now_s) if count_it else self._heat.count(key, now_s)

    def _sharers(
        self, reuse: float, candidates: Sequence[Candidate], cached: Mapping[str, int],
        shared: int,
    ) -> float:
        """How many requests would share computing the shared prefix on a candidate that lacks
        it: the recent reuses over the holders there would then be, if at least
        ``reuse_min_requests``; else 1 (the request pays its whole miss)."""
        holders = sum(1 for c in candidates if cached.get(c.replica_id, 0) >= shared)
        sharers = reuse / (holders + 1)
        return sharers if sharers >= self.settings.reuse_min_requests else 1.0

    def _best(
        self, candidates: Sequence[Candidate], ctx: RoutingContext, cached: dict[str, int],
        shared: int, sharers: float,
    ) -> Candidate:
        s = self.settings
        waits = [self.wait_s(c) for c in candidates]
        computes = [self.compute_s(c, ctx, cached.get(c.replica_id, 0)) for c in candidates]
        # The band sees the whole compute; the choice within it, the compute charged.
        charges = [
            charge_tokens(ctx, cached.get(c.replica_id, 0), shared, sharers) / self.speed(c)
            for c in candidates
        ]
        finishes = [w + c for w, c in zip(waits, computes, strict=True)]
        mean_finish = sum(finishes) / len(finishes)
        keys = []
        for candidate, wait, charge, finish in zip(
            candidates, waits, charges, finishes, strict=True
        ):
            whole_prompt_s = ctx.num_prompt_tokens / self.speed(candidate)
            bound = (
                s.load_bound_rel * mean_finish
                + s.load_bound_prompts * whole_prompt_s
                + s.load_bound_abs_s
            )
            keys.append((finish > bound, charge + s.load_weight * wait, finish))
        best = min(keys)
        tied = [c for c, key in zip(candidates, keys, strict=True) if key == best]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


def charge_tokens(ctx: RoutingContext, held: int, shared: int, sharers: float) -> float:
    """Prompt tokens a replica holding ``held`` of them is charged: those it lacks, less the
    part of its miss on the longest held prefix (``shared``) that later requests share."""
    shared_miss = max(0, min(shared, ctx.num_prompt_tokens) - held)
    return max(0, ctx.num_prompt_tokens - held) - shared_miss * (1.0 - 1.0 / sharers)
