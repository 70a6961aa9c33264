"""The router's view of the cluster, one per ingress process.

``RoutingCoordinator`` owns the KV index (fed by the engines' KV cache events), the live replicas
of both pools with their load, and the joint prefill/decode choice (``router.pairing``). The
Ray Serve request routers of the prefill and decode handles report the replicas they see
(``observe``) and send a request where the coordinator pinned it; the ingress asks it for a
pair per request (``choose``) and reports failures (``mark_failed``) and completions
(``done``).

Everything here runs on the ingress event loop, except the event subscriber's thread, which
touches the index only under ``lock``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from router.kvindex import KVIndex, hash_token_blocks
from router.metrics import RouterMetrics
from router.pairing import PairChoice, PairingSettings, PairSelector
from router.policies import make_policy
from router.policy import Candidate, ReplicaLoad, RoutingContext, RoutingPolicy

logger = logging.getLogger(__name__)
ROLES = ("prefill", "decode")


@dataclasses.dataclass(frozen=True)
class CoordinatorSettings:
    block_size: int
    prefill_policy: str = "cache_cost"
    decode_policy: str = "cache_cost"
    prefill_policy_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    decode_policy_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    pairing: dict[str, Any] = dataclasses.field(default_factory=dict)
    guess_ttl_s: float = 120.0
    failed_replica_s: float = 30.0


class RoutingCoordinator:
    def __init__(self, settings: CoordinatorSettings) -> None:
        from router.kv_events import KVEventSubscriber

        self.settings = settings
        self.lock = threading.Lock()
        self.index = KVIndex()
        self.events = KVEventSubscriber(self.index, self.lock)
        self.pairs = PairSelector(
            make_policy(settings.prefill_policy, **settings.prefill_policy_kwargs),
            make_policy(settings.decode_policy, **settings.decode_policy_kwargs),
            PairingSettings(**settings.pairing),
        )
        self._loads: dict[str, dict[str, ReplicaLoad]] = {role: {} for role in ROLES}
        self._endpoints: dict[str, dict[str, str]] = {role: {} for role in ROLES}
        self._failed_until: dict[str, float] = {}
        self.num_local_prefills = 0
        self.metrics = RouterMetrics()
        self._num_events_reported = 0

    # -- what the request routers report ------------------------------------------------------

    def observe(self, role: str, replicas: dict[str, dict[str, Any] | None]) -> None:
        """The live replicas of ``role`` and their routing stats, as Ray Serve sees them."""
        from router.serve_router import load_of

        before = set(self._loads[role])
        self._loads[role] = {rid: load_of(stats) for rid, stats in replicas.items()}
        self._endpoints[role] = {rid: stats["kv_events_endpoint"]
                                 for rid, stats in replicas.items()
                                 if stats and stats.get("kv_events_endpoint")}
        if set(replicas) != before:
            self._policy(role).on_replicas_changed(frozenset(replicas))
            with self.lock:
                for gone in before - set(replicas):
                    self.index.remove_replica(gone)
        self.events.sync({**self._endpoints["prefill"], **self._endpoints["decode"]})
        self._report()

    def _report(self) -> None:
        """Index metrics (the index itself logs each replica it can only guess, once)."""
        with self.lock:
            stats = self.index.stats()
        self.metrics.index(stats.num_blocks, len(stats.event_fed_replicas),
                           len(stats.guessed_replicas))
        num_events = self.events.num_events
        self.metrics.events(num_events - self._num_events_reported)
        self._num_events_reported = num_events

    # -- what the ingress asks ----------------------------------------------------------------

    def context(self, request_id: str, token_ids: Sequence[int] | None) -> RoutingContext:
        block_size = self.settings.block_size
        ctx = RoutingContext(request_id=request_id, block_size=block_size)
        if token_ids:
            ctx.prompt_token_ids = token_ids
            ctx.num_prompt_tokens = len(token_ids)
            ctx.block_hashes = hash_token_blocks(token_ids, block_size)
            with self.lock:
                matched = self.index.match(ctx.block_hashes)
            ctx.cached_tokens = {rid: n * block_size for rid, n in matched.items()}
        return ctx

    def candidates(self, role: str) -> list[Candidate]:
        now = time.monotonic()
        return [Candidate(rid, load) for rid, load in self._loads[role].items()
                if self._failed_until.get(rid, 0.0) <= now]

    def choose(self, ctx: RoutingContext) -> PairChoice | None:
        """The pair for this request; None while no decode replica is known yet."""
        decode = self.candidates("decode")
        if not decode:
            return None
        choice = self.pairs.select(self.candidates("prefill"), decode, ctx)
        if choice.is_local_prefill:
            self.count_local_prefill()
        else:
            self.metrics.decision("transfer")
        return choice

    def count_local_prefill(self) -> None:
        """A request is prefilled on its decode replica (chosen so, or no prefill succeeded)."""
        self.num_local_prefills += 1
        self.metrics.decision("local")

    def choose_prefill(self, ctx: RoutingContext) -> Candidate | None:
        """Another prefill replica for a retry (failed ones are left out)."""
        prefill = self.candidates("prefill")
        return self.pairs.prefill_policy.select(prefill, ctx) if prefill else None

    def mark_failed(self, replica_id: str) -> None:
        self._failed_until[replica_id] = time.monotonic() + self.settings.failed_replica_s
        self.metrics.decision("retry")

    def done(self, ctx: RoutingContext, replica_ids: Sequence[str]) -> None:
        """The request finished on ``replica_ids``: record guesses for replicas without events."""
        if ctx.block_hashes:
            with self.lock:
                for rid in replica_ids:
                    if not self.index.is_event_fed(rid):
                        self.index.record_routed(rid, ctx.block_hashes, self.settings.guess_ttl_s)
        for rid in replica_ids:
            self._policy("prefill" if rid in self._loads["prefill"] else "decode") \
                .on_request_done(rid, ctx)

    def _policy(self, role: str) -> RoutingPolicy:
        return self.pairs.prefill_policy if role == "prefill" else self.pairs.decode_policy


_coordinator: RoutingCoordinator | None = None


def get_coordinator(settings: CoordinatorSettings | None = None) -> RoutingCoordinator | None:
    """The ingress process's coordinator: created by the ingress (with settings), then shared
    with the request routers (without)."""
    global _coordinator
    if _coordinator is None and settings is not None:
        _coordinator = RoutingCoordinator(settings)
    return _coordinator
