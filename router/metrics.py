"""The router's metrics, exported through Ray's metrics agent (Prometheus, Ray dashboard).

Outside a Ray worker (unit tests, the simulator) every call is a no-op.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


# KV-event outcome -> the subscriber's counter behind it.
EVENT_OUTCOMES = {"applied": "num_events", "bad": "num_bad_events", "gap": "num_gaps",
                  "resync": "num_resyncs"}


class RouterMetrics:
    def __init__(self) -> None:
        self._m: dict[str, Any] = {}
        try:
            import ray
            from ray.util import metrics

            if not ray.is_initialized():
                return
        except ImportError:
            return
        self._m = {
            "index_blocks": metrics.Gauge(
                "pdserve_router_index_blocks", "Blocks in the router's KV index."),
            "replicas": metrics.Gauge(
                "pdserve_router_replicas", "Replicas in the KV index, by how it learns what "
                "they cache: event_fed (the engine's KV events) or guessed (routing history).",
                tag_keys=("mode",)),
            "kv_events": metrics.Counter(
                "pdserve_router_kv_events", "KV cache event stream, by outcome: applied (events "
                "applied to the index), bad (frames or events refused), gap (sequence gaps "
                "seen), resync (a replica's entries dropped and rebuilt).",
                tag_keys=("outcome",)),
            "decisions": metrics.Counter(
                "pdserve_router_decisions", "Routing decisions, by outcome: transfer (prefill "
                "replica then decode), local (decode prefills), retry (a replica call failed "
                "or answered busy, and the replica was left out).", tag_keys=("outcome",)),
            "local_prefills": metrics.Counter(
                "pdserve_router_local_prefills", "Requests prefilled on their decode replica, "
                "by reason: policy, prefill_failed, no_prefill_replica, busy, batch.",
                tag_keys=("reason",)),
            "decode_retries": metrics.Counter(
                "pdserve_router_decode_retries", "Decode calls retried on another decode "
                "replica after a failure or timeout before their first token."),
            "replica_failures": metrics.Counter(
                "pdserve_router_replica_failures", "Failed or timed-out calls to a replica, "
                "by pool (prefill or decode).", tag_keys=("role",)),
        }

    def index(self, num_blocks: int, num_event_fed: int, num_guessed: int) -> None:
        if self._m:
            self._m["index_blocks"].set(num_blocks)
            self._m["replicas"].set(num_event_fed, tags={"mode": "event_fed"})
            self._m["replicas"].set(num_guessed, tags={"mode": "guessed"})

    def events(self, deltas: dict[str, int]) -> None:
        """New KV-event outcomes since the last call (``EVENT_OUTCOMES`` keys)."""
        if not self._m:
            return
        for outcome, count in deltas.items():
            if count > 0:
                self._m["kv_events"].inc(count, tags={"outcome": outcome})

    def decision(self, outcome: str) -> None:
        if self._m:
            self._m["decisions"].inc(1, tags={"outcome": outcome})

    def local_prefill(self, reason: str) -> None:
        if self._m:
            self._m["local_prefills"].inc(1, tags={"reason": reason})

    def decode_retry(self) -> None:
        if self._m:
            self._m["decode_retries"].inc(1)

    def replica_failure(self, role: str) -> None:
        if self._m:
            self._m["replica_failures"].inc(1, tags={"role": role})
