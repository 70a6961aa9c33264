"""The router's view of the cluster, one per ingress process.

``RoutingCoordinator`` owns the KV index (fed by the engines' KV cache events), the live replicas
of both pools with their load, and the joint prefill/decode choice (``router.pairing``). The Ray
Serve request routers of the prefill and decode handles report the replicas they see (``observe``)
and send a request where the coordinator pinned it; the ingress asks it for a pair per request
(``choose``), another replica after a failure (``choose_prefill``, ``choose_decode``), and reports
failures (``mark_failed``), fallbacks (``count_local_prefill``, ``count_decode_retry``), a prefill
that ended without a computed prompt (``prefill_given_up``), computed prompts (``prefill_done``)
and completions (``done``). What it sent and is not done yet counts in the replicas' load until
their next report shows it (``router.routed_work``). A replica whose call failed is left out of
both choices (``router.health``) for ``failed_replica_s`` (``busy_replica_s`` after a 503), or
until Ray Serve stops listing it.

Three threads use it: the ingress event loop (``choose``, ``mark_failed``, ``done``...), Ray
Serve's request routers, which run on a loop of their own in Ray 2.60 (``observe``), and the KV
event subscriber's thread (the index). Every public method that reads or changes the replicas,
their health or the policies runs under ``lock`` (re-entrant), as does every index access.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from router.health import Degradations, ReplicaHealth
from router.kvindex import KVIndex, hash_token_blocks_array
from router.metrics import RouterMetrics
from router.pairing import PairChoice, PairingSettings, PairSelector
from router.policies import make_policy
from router.policy import Candidate, ReplicaLoad, RoutingContext, RoutingPolicy
from router.routed_work import RoutedWork, fill_speeds

logger = logging.getLogger(__name__)
T = TypeVar("T")
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
    busy_replica_s: float = 1.0
    enable_metrics: bool = True  # export the router's metrics through Ray


def _locked(method: Callable[..., T]) -> Callable[..., T]:
    """Run ``method`` under the coordinator's lock: Ray Serve's request routers call
    ``observe`` from their own thread while the ingress routes on its event loop."""
    @functools.wraps(method)
    def wrapper(self: RoutingCoordinator, *args: Any, **kwargs: Any) -> T:
        with self.lock:
            return method(self, *args, **kwargs)

    return wrapper


class RoutingCoordinator:
    def __init__(self, settings: CoordinatorSettings) -> None:
        from router.kv_events import KVEventSubscriber

        self.settings = settings
        self.lock = threading.RLock()
        self.index = KVIndex()
        self.events = KVEventSubscriber(self.index, self.lock)
        self.pairs = PairSelector(
            make_policy(settings.prefill_policy, **settings.prefill_policy_kwargs),
            make_policy(settings.decode_policy, **settings.decode_policy_kwargs),
            PairingSettings(**settings.pairing),
        )
        self._loads: dict[str, dict[str, ReplicaLoad]] = {role: {} for role in ROLES}
        self._endpoints: dict[str, dict[str, str]] = {role: {} for role in ROLES}
        self._replay_endpoints: dict[str, dict[str, str]] = {role: {} for role in ROLES}
        self.health = ReplicaHealth()
        self.metrics = RouterMetrics(settings.enable_metrics)
        self.degradations = Degradations(self.metrics)
        self._events_reported: dict[str, int] = {}
        self.routed = RoutedWork()

    # -- what the request routers report ------------------------------------------------------

    @_locked
    def observe(self, role: str, replicas: dict[str, dict[str, Any] | None]) -> None:
        """The live replicas of ``role`` and their routing stats, as Ray Serve sees them."""
        from router.serve_router import load_of

        before = set(self._loads[role])
        self.health.forget_missing(role, set(replicas))
        self._loads[role] = {rid: load_of(stats) for rid, stats in replicas.items()}
        self._endpoints[role] = _stats_field(replicas, "kv_events_endpoint")
        self._replay_endpoints[role] = _stats_field(replicas, "kv_events_replay_endpoint")
        if set(replicas) != before:
            self._policy(role).on_replicas_changed(frozenset(replicas))
            with self.lock:
                for gone in before - set(replicas):
                    self.index.remove_replica(gone)
        self.events.sync({**self._endpoints["prefill"], **self._endpoints["decode"]},
                         replay_endpoints={**self._replay_endpoints["prefill"],
                                           **self._replay_endpoints["decode"]})
        self._report()

    def _report(self) -> None:
        """Index metrics (the index itself logs each replica it can only guess, once)."""
        with self.lock:
            stats = self.index.stats()
        self.metrics.index(stats.num_blocks, len(stats.event_fed_replicas),
                           len(stats.guessed_replicas), len(stats.dict_keyed_replicas))
        from router.metrics import EVENT_OUTCOMES

        totals = {outcome: getattr(self.events, name) for outcome, name in EVENT_OUTCOMES.items()}
        self.metrics.events({outcome: total - self._events_reported.get(outcome, 0)
                             for outcome, total in totals.items()})
        self._events_reported = totals

    # -- what the ingress asks ----------------------------------------------------------------

    def context(self, request_id: str, token_ids: Sequence[int] | None) -> RoutingContext:
        block_size = self.settings.block_size
        ctx = RoutingContext(request_id=request_id, block_size=block_size)
        if token_ids:
            ctx.prompt_token_ids = token_ids
            ctx.num_prompt_tokens = len(token_ids)
            chains = hash_token_blocks_array(token_ids, block_size)
            ctx.block_hashes = chains.tolist()  # the policies' own maps take ints
            with self.lock:
                matched = self.index.match(chains)
            ctx.cached_tokens = {rid: n * block_size for rid, n in matched.items()}
        return ctx

    @_locked
    def candidates(self, role: str, exclude: Sequence[str | None] = ()) -> list[Candidate]:
        """The live, healthy replicas of ``role``, but ``exclude``."""
        now = time.monotonic()
        return [Candidate(rid, self.routed.load(rid, load))
                for rid, load in fill_speeds(self._loads[role]).items()
                if rid not in exclude and self.health.is_healthy(rid, now)]

    @_locked
    def replicas(self, role: str) -> dict[str, ReplicaLoad]:
        """Every replica of ``role`` Ray Serve lists, failed or not, with its load."""
        return dict(self._loads[role])

    def is_healthy(self, replica_id: str) -> bool:
        return self.health.is_healthy(replica_id)

    @_locked
    def choose(self, ctx: RoutingContext) -> PairChoice | None:
        """The pair for this request; None while no healthy decode replica is known."""
        started_s = time.perf_counter()
        decode = self.candidates("decode")
        if not decode:
            return None
        prefill = self.candidates("prefill")
        choice = self.pairs.select(prefill, decode, ctx)
        self.metrics.decision_latency(time.perf_counter() - started_s)
        now = time.monotonic()
        computed_on = choice.decode if choice.is_local_prefill else choice.prefill
        self._sent_prefill(ctx, computed_on.replica_id, now)
        self.routed.decode(ctx.request_id, choice.decode.replica_id, now)
        if choice.is_local_prefill:
            self.count_local_prefill("policy" if prefill else "no_prefill_replica")
        else:
            self.metrics.decision("transfer")
        return choice

    def count_local_prefill(self, reason: str) -> None:
        """A request is prefilled on its decode replica, for ``reason``
        (``router.health.LOCAL_PREFILL_REASONS``)."""
        self.degradations.local_prefill(reason)
        self.metrics.decision("local")

    def count_decode_retry(self) -> None:
        self.degradations.decode_retry()

    @property
    def num_local_prefills(self) -> int:
        return sum(self.degradations.local_prefills.values())

    @_locked
    def choose_prefill(self, ctx: RoutingContext,
                       exclude: Sequence[str | None] = ()) -> Candidate | None:
        """A prefill replica for one prompt of several, or for a retry (failed ones and
        ``exclude``, the replicas already tried, are left out)."""
        prefill = self.candidates("prefill", exclude)
        if not prefill:
            return None
        choice = self.pairs.prefill_policy.select(prefill, _retry_context(ctx, exclude))
        self._sent_prefill(ctx, choice.replica_id, time.monotonic())
        return choice

    @_locked
    def prefill_given_up(self, ctx: RoutingContext, replica_id: str) -> None:
        """The request's prompt will not be computed on ``replica_id``, where its last prefill
        attempt went (every attempt failed, the engine refused it, or it was cancelled), and
        ``done`` will not name that replica."""
        self.pairs.prefill_policy.on_request_done(replica_id, ctx)

    @_locked
    def choose_decode(self, ctx: RoutingContext,
                      exclude: Sequence[str | None] = ()) -> Candidate | None:
        """A decode replica (for a request that skips the pairing, or a retry)."""
        decode = self.candidates("decode", exclude)
        if not decode:
            return None
        choice = self.pairs.decode_policy.select(decode, _retry_context(ctx, exclude))
        self.routed.decode(ctx.request_id, choice.replica_id, time.monotonic())
        return choice

    @_locked
    def prefill_done(self, ctx: RoutingContext) -> None:
        """The request's prompt was computed (or its prefill call ended): it no longer counts
        as queued prefill work on the replica it went to."""
        self.routed.prefill_done(ctx.request_id)

    @_locked
    def mark_failed(self, role: str, replica_id: str, reason: str, is_busy: bool = False) -> None:
        """A call to ``replica_id`` failed (``is_busy``: it answered 503, which leaves it out
        only for ``busy_replica_s``)."""
        was_healthy = self.health.is_healthy(replica_id)
        period_s = self.settings.busy_replica_s if is_busy else self.settings.failed_replica_s
        self.health.leave_out(role, replica_id, period_s)
        self.metrics.decision("retry")
        if is_busy:
            return
        self.degradations.replica_failure(role)
        if was_healthy:
            logger.warning("%s replica %s failed (%s): left out for %.0f s", role, replica_id,
                           reason, period_s)

    @_locked
    def fallbacks(self) -> dict[str, Any]:
        """What ``GET /routing`` shows of the router's fallbacks and left-out replicas."""
        d = self.degradations
        return {"local_prefills": dict(d.local_prefills),
                "num_local_prefills": self.num_local_prefills,
                "decode_retries": d.num_decode_retries,
                "replica_failures": dict(d.replica_failures),
                "failed_replicas": self.health.left_out()}

    @_locked
    def done(self, ctx: RoutingContext, replica_ids: Sequence[str]) -> None:
        """The request finished on ``replica_ids``: record guesses for replicas without events."""
        if ctx.block_hashes:
            with self.lock:
                for rid in replica_ids:
                    if not self.index.is_event_fed(rid):
                        self.index.record_routed(rid, ctx.block_hashes, self.settings.guess_ttl_s)
        for rid in replica_ids:
            self._policy(self._role(ctx.request_id, rid)).on_request_done(rid, ctx)
        self.routed.done(ctx.request_id)

    def _role(self, request_id: str, replica_id: str) -> str:
        """The pool ``replica_id`` served ``request_id`` from: as routed (a replica gone since
        keeps its role), else, once the ledger has forgotten the request (``routed_work.TTL_S``
        after it was routed), as listed now."""
        prefill_id, decode_id = self.routed.placed(request_id)
        if replica_id == decode_id:
            return "decode"  # a local prefill's replica too
        if replica_id == prefill_id:
            return "prefill"
        return "prefill" if replica_id in self._loads["prefill"] else "decode"

    def _sent_prefill(self, ctx: RoutingContext, replica_id: str, now_s: float) -> None:
        """The prompt's uncached tokens are to be computed on ``replica_id``."""
        self.routed.prefill(ctx.request_id, replica_id, ctx.uncached_tokens(replica_id), now_s)

    def _policy(self, role: str) -> RoutingPolicy:
        return self.pairs.prefill_policy if role == "prefill" else self.pairs.decode_policy


def _retry_context(ctx: RoutingContext, tried: Sequence[str | None]) -> RoutingContext:
    """``ctx`` marked as a retry when a policy already chose a replica for it (``tried`` names
    one; None is a replica Ray Serve chose, which no policy saw)."""
    if any(replica_id is not None for replica_id in tried):
        return dataclasses.replace(ctx, is_retry=True)
    return ctx


def _stats_field(replicas: dict[str, dict[str, Any] | None], name: str) -> dict[str, str]:
    """``replica_id -> stats[name]`` for the replicas whose routing stats have it."""
    return {rid: stats[name] for rid, stats in replicas.items() if stats and stats.get(name)}


_coordinator: RoutingCoordinator | None = None


def get_coordinator(settings: CoordinatorSettings | None = None) -> RoutingCoordinator | None:
    """The ingress process's coordinator: created by the ingress (with settings), then shared
    with the request routers (without)."""
    global _coordinator
    if _coordinator is None and settings is not None:
        _coordinator = RoutingCoordinator(settings)
    return _coordinator
