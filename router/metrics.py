"""The router's metrics, exported through Ray's metrics agent (Prometheus, Ray dashboard).

Outside a Ray worker (unit tests, the simulator) every call is a no-op.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


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
                "pdserve_router_kv_events", "KV cache events applied to the index."),
            "decisions": metrics.Counter(
                "pdserve_router_decisions", "Routing decisions, by outcome: transfer (prefill "
                "replica then decode), local (decode prefills), retry (a prefill failed and "
                "another was tried).", tag_keys=("outcome",)),
        }

    def index(self, num_blocks: int, num_event_fed: int, num_guessed: int) -> None:
        if self._m:
            self._m["index_blocks"].set(num_blocks)
            self._m["replicas"].set(num_event_fed, tags={"mode": "event_fed"})
            self._m["replicas"].set(num_guessed, tags={"mode": "guessed"})

    def events(self, count: int) -> None:
        if self._m and count:
            self._m["kv_events"].inc(count)

    def decision(self, outcome: str) -> None:
        if self._m:
            self._m["decisions"].inc(1, tags={"outcome": outcome})
