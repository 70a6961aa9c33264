"""The router's metrics, exported through Ray's metrics agent (Prometheus, Ray dashboard).

``ROUTER_FAMILIES`` lists them; Ray prefixes each name with ``ray_`` (and a counter's with the
``_total`` suffix). Besides the fallbacks and the KV index, the router measures what its
clients see, by the path a request took (``PATHS``): time to first token, inter-token latency
(between two chunks of a stream) and end-to-end latency, from the request's arrival to the
first chunk, between chunks, and to the end (a non-streaming request: end to end only), with
vLLM's own buckets so that they compare with the engines' ``ray_vllm_*`` histograms.
``RequestTimer`` turns one request's chunks into those observations.

Outside a Ray worker (unit tests, the simulator) every call is a no-op.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

# KV-event outcome -> the subscriber's counter behind it.
EVENT_OUTCOMES = {"applied": "num_events", "bad": "num_bad_events", "gap": "num_gaps",
                  "resync": "num_resyncs"}

# The path a request took: prefilled on a prefill replica and transferred; prefilled on its
# decode replica (the pairing's choice, best_of or beam search, no prefill replica known);
# prefilled on its decode replica because the prefill failed or every prefill replica was busy.
# A request of several prompts is disaggregated when at least one prompt was transferred.
PATHS = ("disaggregated", "prefilled_on_decode", "fallback")

# vLLM's bucket families (vllm/v1/metrics/buckets.py) of the latency histograms.
LATENCY_BUCKETS = {"ttft": "time_to_first_token", "itl": "inter_token_latency",
                   "e2e": "request_latency", "ttft_phase": "time_to_first_token"}
# Where a stream's time to first token goes (``RouterMetrics.ttft_phases``): the router itself
# (parse, tokenize, choose the pair), the prefill engine's queue and compute (its own stats),
# the rest of the prefill call (Ray Serve's hops, the replica's own work, failed attempts), or
# the whole prefill call when its engine did not tell, and the decode call until its first
# chunk (the KV load, the decode queue, the first step, the hops).
TTFT_PHASES = ("route", "prefill_queue", "prefill_compute", "prefill_hops", "prefill_call",
               "decode")
# The phases' buckets: vLLM's TTFT buckets, with more below 20 ms, where the route phase and
# short queues fall, so that a median read from them means something there.
PHASE_EXTRA_BUCKETS = (2.5e-4, 5e-4, 0.002, 0.003, 0.0075, 0.015)
DECISION_BUCKETS = [1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025,
                    0.05, 0.1]

# key -> (metric name, kind, description, tag keys)
ROUTER_FAMILIES: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "index_blocks": ("pdserve_router_index_blocks", "gauge",
                     "Blocks in the router's KV index.", ()),
    "replicas": ("pdserve_router_replicas", "gauge", "Replicas in the KV index, by how it "
                 "learns what they cache: event_fed (the engine's KV events) or guessed "
                 "(routing history); dict_keyed counts the event_fed ones whose engine block "
                 "hashes are not 64-bit ints, indexed through a Python dict (slower).",
                 ("mode",)),
    "kv_events": ("pdserve_router_kv_events", "counter", "KV cache event stream, by outcome: "
                  "applied (events applied to the index), bad (frames or events refused), gap "
                  "(sequence gaps seen), resync (a replica's entries dropped and rebuilt).",
                  ("outcome",)),
    "decisions": ("pdserve_router_decisions", "counter", "Routing decisions, by outcome: "
                  "transfer (prefill replica then decode), local (decode prefills), retry (a "
                  "replica call failed or answered busy, and the replica was left out).",
                  ("outcome",)),
    "local_prefills": ("pdserve_router_local_prefills", "counter", "Requests prefilled on "
                       "their decode replica, by reason: policy, prefill_failed, "
                       "no_prefill_replica, busy, batch, prompt_logprobs, unrendered.",
                       ("reason",)),
    "decode_retries": ("pdserve_router_decode_retries", "counter", "Decode calls retried on "
                       "another decode replica after a failure or timeout before their first "
                       "token.", ()),
    "replica_failures": ("pdserve_router_replica_failures", "counter", "Failed or timed-out "
                         "calls to a replica, by pool (prefill or decode).", ("role",)),
    "ttft": ("pdserve_router_time_to_first_token_seconds", "histogram", "Client-side time "
             "from the request's arrival to the first chunk of its stream, by path.",
             ("path",)),
    "itl": ("pdserve_router_inter_token_latency_seconds", "histogram", "Client-side time "
            "between two chunks of a stream, by path.", ("path",)),
    "e2e": ("pdserve_router_e2e_request_latency_seconds", "histogram", "Client-side time from "
            "the request's arrival to the end of its answer, by path (successful answers).",
            ("path",)),
    "decision": ("pdserve_router_decision_latency_seconds", "histogram", "Time the "
                 "coordinator took to choose a prefill/decode pair.", ()),
    "ttft_phase": ("pdserve_router_ttft_phase_seconds", "histogram", "A stream's time to "
                   "first token by phase: route (the router's own work), prefill_queue and "
                   "prefill_compute (the prefill engine's), prefill_hops (the rest of the "
                   "prefill call), prefill_call (the whole call, when the engine did not "
                   "tell), decode (decode call to first chunk).", ("phase",)),
}


def _make(key: str) -> Any:
    from ray.util import metrics

    name, kind, description, tag_keys = ROUTER_FAMILIES[key]
    if kind == "gauge":
        return metrics.Gauge(name, description, tag_keys=tag_keys)
    if kind == "counter":
        return metrics.Counter(name, description, tag_keys=tag_keys)
    if key in LATENCY_BUCKETS:
        from vllm.v1.metrics.buckets import histogram_buckets

        boundaries = histogram_buckets(LATENCY_BUCKETS[key])
        if key == "ttft_phase":
            boundaries = sorted({*boundaries, *PHASE_EXTRA_BUCKETS})
    else:
        boundaries = DECISION_BUCKETS
    return metrics.Histogram(name, description, boundaries=boundaries, tag_keys=tag_keys)


class RouterMetrics:
    """The router's metric families; a no-op when not ``enabled`` or outside Ray."""

    def __init__(self, enabled: bool = True) -> None:
        self._m: dict[str, Any] = {}
        if not enabled:
            return
        try:
            import ray

            if not ray.is_initialized():
                return
        except ImportError:
            return
        self._m = {key: _make(key) for key in ROUTER_FAMILIES}

    @property
    def is_enabled(self) -> bool:
        return bool(self._m)

    def index(self, num_blocks: int, num_event_fed: int, num_guessed: int,
              num_dict_keyed: int = 0) -> None:
        if self._m:
            self._m["index_blocks"].set(num_blocks)
            self._m["replicas"].set(num_event_fed, tags={"mode": "event_fed"})
            self._m["replicas"].set(num_guessed, tags={"mode": "guessed"})
            self._m["replicas"].set(num_dict_keyed, tags={"mode": "dict_keyed"})

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

    def decision_latency(self, seconds: float) -> None:
        """How long one joint choice (``RoutingCoordinator.choose``) took."""
        if self._m:
            self._m["decision"].observe(seconds)

    def local_prefill(self, reason: str) -> None:
        if self._m:
            self._m["local_prefills"].inc(1, tags={"reason": reason})

    def decode_retry(self) -> None:
        if self._m:
            self._m["decode_retries"].inc(1)

    def replica_failure(self, role: str) -> None:
        if self._m:
            self._m["replica_failures"].inc(1, tags={"role": role})

    def ttft_phases(self, phases: dict[str, float]) -> None:
        """One stream's time to first token, split by ``TTFT_PHASES`` (those it went through)."""
        if self._m:
            for phase, seconds in phases.items():
                self._m["ttft_phase"].observe(max(0.0, seconds), tags={"phase": phase})

    def latency(self, kind: str, path: str, seconds: float) -> None:
        """One client-side observation: ``kind`` ttft, itl or e2e, on ``path`` (``PATHS``)."""
        if kind not in LATENCY_BUCKETS:
            raise ValueError(f"unknown latency kind {kind!r}; expected one of "
                             f"{list(LATENCY_BUCKETS)}")
        if path not in PATHS:
            raise ValueError(f"unknown request path {path!r}; expected one of {list(PATHS)}")
        if self._m:
            self._m[kind].observe(max(0.0, seconds), tags={"path": path})


@dataclasses.dataclass
class FirstTokenPhases:
    """When a request's calls went out and came back (``time.monotonic``), and what the prefill
    engine said of its own time; ``split`` turns them into ``TTFT_PHASES``."""

    prefill_sent_s: float | None = None
    prefill_done_s: float | None = None
    prefill_queue_s: float | None = None  # from the prefill engine, when it told
    prefill_compute_s: float | None = None
    decode_sent_s: float | None = None

    def split(self, arrival_s: float, first_chunk_s: float) -> dict[str, float]:
        first_call_s = self.prefill_sent_s if self.prefill_sent_s is not None \
            else self.decode_sent_s
        phases: dict[str, float] = {}
        if first_call_s is not None:
            phases["route"] = first_call_s - arrival_s
        if self.prefill_sent_s is not None:  # done, or failed (then until decode was called)
            done_s = self.prefill_done_s if self.prefill_done_s is not None else \
                self.decode_sent_s if self.decode_sent_s is not None else first_chunk_s
            call_s = done_s - self.prefill_sent_s
            if self.prefill_queue_s is not None and self.prefill_compute_s is not None:
                phases["prefill_queue"] = self.prefill_queue_s
                phases["prefill_compute"] = self.prefill_compute_s
                phases["prefill_hops"] = call_s - self.prefill_queue_s - self.prefill_compute_s
            else:
                phases["prefill_call"] = call_s
        if self.decode_sent_s is not None:
            phases["decode"] = first_chunk_s - self.decode_sent_s
        return phases


class RequestTimer:
    """One request's client-side latencies: ``chunk()`` as each chunk of a stream goes out,
    ``end()`` when the answer is complete. Times run from ``arrival_s`` (``time.monotonic``),
    by default the timer's creation."""

    def __init__(self, metrics: RouterMetrics, path: str, arrival_s: float | None = None,
                 clock: Any = time.monotonic, phases: FirstTokenPhases | None = None) -> None:
        if path not in PATHS:
            raise ValueError(f"unknown request path {path!r}; expected one of {list(PATHS)}")
        self.metrics = metrics
        self.path = path
        self._clock = clock
        self.arrival_s = clock() if arrival_s is None else arrival_s
        self.phases = phases
        self._last_s: float | None = None
        self.num_chunks = 0
        self.is_ended = False

    def chunk(self) -> None:
        """A chunk of the stream goes to the client: the first gives the time to first
        token (and its phases), every later one an inter-token latency."""
        now = self._clock()
        if self._last_s is None:
            self.metrics.latency("ttft", self.path, now - self.arrival_s)
            if self.phases is not None:
                split = self.phases.split(self.arrival_s, now)
                self.metrics.ttft_phases(split)
                logger.debug("TTFT %.1f ms (%s): %s", 1e3 * (now - self.arrival_s), self.path,
                             ", ".join(f"{k} {1e3 * v:.1f}" for k, v in split.items()))
        else:
            self.metrics.latency("itl", self.path, now - self._last_s)
        self._last_s = now
        self.num_chunks += 1

    def end(self) -> None:
        """The answer is complete (recorded once)."""
        if not self.is_ended:
            self.is_ended = True
            self.metrics.latency("e2e", self.path, self._clock() - self.arrival_s)
