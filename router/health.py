"""Which replicas the router leaves out, and how often it had to work around a failure.

``ReplicaHealth`` keeps, per pool, the replicas whose calls failed and until when they are left
out. A replica comes back when its period ends, or is forgotten when Ray Serve stops listing it
(a replacement replica has a new id, so it is never left out for its predecessor's failure).

``Degradations`` counts what the router did instead of the planned path: requests prefilled on
their decode replica, by reason (``LOCAL_PREFILL_REASONS``), decode retries, and replica
failures by pool. Each reason is logged at WARNING the first time it happens, then only counted
(``GET /routing`` and the Ray metrics show the counts).

Both are used only under the coordinator's lock.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from router.metrics import RouterMetrics

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
# Why a request was prefilled on its decode replica:
# policy: the pairing chose it (a cache hit on the decode replica, a saturated prefill pool);
# prefill_failed: every prefill replica tried failed or timed out;
# no_prefill_replica: no healthy prefill replica was known;
# busy: the prefill replicas tried answered 503 (backpressure, not a failure);
# batch: best_of > 1 or beam search, whose engine requests the engine makes itself, or several
# prompts that are not prefilled apart (more than 64 distinct ones, a suffix, truncation; a
# request of several prompts otherwise counts each prompt that falls back, under its own
# reason);
# prompt_logprobs: the prompt's own logprobs were asked for (vLLM then computes the whole
# prompt whatever is cached or transferred);
# unrendered: a Responses request the router could not render (it continues a stored response,
# or its input holds media); its prefill would need the Responses API and the engine's store.
LOCAL_PREFILL_REASONS = ("policy", "prefill_failed", "no_prefill_replica", "busy", "batch",
                         "prompt_logprobs", "unrendered")


class ReplicaHealth:
    """Replicas left out of routing until a time on the monotonic clock."""

    def __init__(self) -> None:
        self._until: dict[str, dict[str, float]] = {role: {} for role in ROLES}

    def leave_out(self, role: str, replica_id: str, period_s: float) -> None:
        """Leave ``replica_id`` out for ``period_s`` from now (never shortens a longer one)."""
        until = time.monotonic() + period_s
        self._until[role][replica_id] = max(until, self._until[role].get(replica_id, 0.0))

    def is_healthy(self, replica_id: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return all(pool.get(replica_id, 0.0) <= now for pool in self._until.values())

    def forget_missing(self, role: str, live_ids: set[str]) -> None:
        """Drop entries of replicas Ray Serve no longer lists, and expired ones."""
        now = time.monotonic()
        pool = self._until[role]
        for rid in [rid for rid, until in pool.items() if rid not in live_ids or until <= now]:
            del pool[rid]

    def left_out(self) -> dict[str, dict[str, float]]:
        """``{role: {replica_id: seconds left}}`` of the replicas left out now."""
        now = time.monotonic()
        return {role: {rid: round(until - now, 3) for rid, until in pool.items() if until > now}
                for role, pool in self._until.items()}


class Degradations:
    """Counters of the router's fallbacks, logged once per kind, exported as metrics."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self._metrics = metrics
        self.local_prefills: Counter[str] = Counter()
        self.replica_failures: Counter[str] = Counter()
        self.num_decode_retries = 0
        self._logged: set[str] = set()

    def local_prefill(self, reason: str) -> None:
        if reason not in LOCAL_PREFILL_REASONS:
            raise ValueError(f"unknown local prefill reason {reason!r}")
        self.local_prefills[reason] += 1
        self._metrics.local_prefill(reason)
        if reason != "policy":  # the pairing's own choice is no degradation
            self._log_once(f"local_prefill:{reason}", "requests are prefilled on their decode "
                           "replica (reason %s); counted from now on in GET /routing", reason)

    def replica_failure(self, role: str) -> None:
        """Count a failed call (the coordinator logs each replica it leaves out)."""
        self.replica_failures[role] += 1
        self._metrics.replica_failure(role)

    def decode_retry(self) -> None:
        self.num_decode_retries += 1
        self._metrics.decode_retry()
        self._log_once("decode_retry", "a decode call failed before its first token and was "
                       "retried on another decode replica; later retries are counted")

    def _log_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning(message, *args)
