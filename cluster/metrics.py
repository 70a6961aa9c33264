"""Each replica's engine and KV-transfer metrics, exported through Ray's metrics agent.

Engine metrics are vLLM's own: ``role_prometheus_logger(role)`` is vLLM's
``RayPrometheusStatLogger`` (what Ray Serve LLM passes to its engines: ``vllm:x`` becomes
``ray_vllm_x`` with a ``ReplicaId`` tag) whose every metric also carries a constant ``role``
tag (``prefill``, ``decode``), so that a dashboard tells the two pools apart without joins.

Transfer metrics are ours (``TransferMetrics``): the connector's counters
(``kvtransfer.stats.COUNTERS``, carried to the stat loggers by vLLM as ``kv_connector_stats``)
become ``pdserve_kv_*`` families named like vLLM's NIXL connector metrics, tagged with the
engine's ``role`` and its Serve ``ReplicaId``. ``TRANSFER_FAMILIES`` lists them.

Both exist only inside a Ray actor (a Serve replica); elsewhere (tests, a plain engine)
``in_ray_actor()`` is False and nothing is created: the engine keeps its own counters
(``cluster.engine.EngineStats``) either way.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)

# vLLM's kv_role -> the role tag of a replica's metrics.
ROLE_BY_KV_ROLE = {"kv_producer": "prefill", "kv_consumer": "decode", "kv_both": "both"}
STANDALONE = "standalone"  # an engine without our connector

# Metric family -> (kind, description, extra tag keys). Every family also has role, ReplicaId.
TRANSFER_FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "pdserve_kv_bytes_transferred": (
        "counter", "KV cache bytes moved: sent (role prefill) or received (role decode).", ()),
    "pdserve_kv_num_transfers": (
        "counter", "KV transfers: loads finished, ok or not (decode); pulls served (prefill).",
        ()),
    "pdserve_kv_num_failed_transfers": (
        "counter", "Failed KV transfers and refused peers, by reason: load (a decode load "
        "failed and the prompt is recomputed), send, link (a link setup failed), layout, auth, "
        "protocol, busy_link (too many peers), internal, bad_spec, hook_error.", ("reason",)),
    "pdserve_kv_num_refused_holds": (
        "counter", "Holds the prefill scheduler refused, by reason: busy (max_held_blocks "
        "reached, answered 503), duplicate (a transfer id already held).", ("reason",)),
    "pdserve_kv_num_expired_holds": (
        "counter", "Held transfers whose lease ran out before decode confirmed them.", ()),
    "pdserve_kv_num_links": (
        "counter", "KV links between a prefill and a decode worker, by event: opened (a pair "
        "set up), closed, direct_reads (a pair set up with no link: decode reads the blocks "
        "itself), read_fallback (a pair offered direct reads that could not use them).",
        ("event",)),
    "pdserve_kv_num_claims": ("counter", "CLAIM messages decode workers sent.", ()),
    "pdserve_kv_num_shared_loads": (
        "counter", "Decode requests that shared a transfer with another (n > 1 siblings).", ()),
    "pdserve_kv_connector_counters": (
        "counter", "Any other connector counter, by its name.", ("counter",)),
    "pdserve_kv_num_held_blocks": (
        "gauge", "KV blocks the prefill engine holds for decode now.", ()),
    "pdserve_kv_xfer_time_seconds": (
        "histogram", "Duration of one KV transfer (a decode load), in seconds.", ()),
    "pdserve_kv_pull_wait_seconds": (
        "histogram", "Part of a KV transfer: from a decode worker's PULL to the prefill "
        "worker's SENDING (its queue and, over Gloo, its gather), in seconds.", ()),
    "pdserve_kv_num_blocks_per_transfer": (
        "histogram", "KV blocks moved by one transfer.", ()),
}

# Connector counter -> (family, its extra tags).
COUNTER_FAMILIES: dict[str, tuple[str, dict[str, str]]] = {
    "num_bytes_sent": ("pdserve_kv_bytes_transferred", {}),
    "num_bytes_received": ("pdserve_kv_bytes_transferred", {}),
    "num_loads": ("pdserve_kv_num_transfers", {}),
    "num_pulls": ("pdserve_kv_num_transfers", {}),
    "num_failed_loads": ("pdserve_kv_num_failed_transfers", {"reason": "load"}),
    "num_failed_sends": ("pdserve_kv_num_failed_transfers", {"reason": "send"}),
    "num_link_failures": ("pdserve_kv_num_failed_transfers", {"reason": "link"}),
    "num_layout_mismatches": ("pdserve_kv_num_failed_transfers", {"reason": "layout"}),
    "num_auth_failures": ("pdserve_kv_num_failed_transfers", {"reason": "auth"}),
    "num_protocol_errors": ("pdserve_kv_num_failed_transfers", {"reason": "protocol"}),
    "num_busy": ("pdserve_kv_num_failed_transfers", {"reason": "busy_link"}),
    "num_internal_errors": ("pdserve_kv_num_failed_transfers", {"reason": "internal"}),
    "num_bad_specs": ("pdserve_kv_num_failed_transfers", {"reason": "bad_spec"}),
    "num_hook_errors": ("pdserve_kv_num_failed_transfers", {"reason": "hook_error"}),
    "num_busy_holds": ("pdserve_kv_num_refused_holds", {"reason": "busy"}),
    "num_duplicate_holds": ("pdserve_kv_num_refused_holds", {"reason": "duplicate"}),
    "num_expired_holds": ("pdserve_kv_num_expired_holds", {}),
    "num_links_opened": ("pdserve_kv_num_links", {"event": "opened"}),
    "num_links_closed": ("pdserve_kv_num_links", {"event": "closed"}),
    "num_read_pairs": ("pdserve_kv_num_links", {"event": "direct_reads"}),
    "num_read_fallbacks": ("pdserve_kv_num_links", {"event": "read_fallback"}),
    "num_claims_sent": ("pdserve_kv_num_claims", {}),
    "num_duplicate_loads": ("pdserve_kv_num_shared_loads", {}),
}
GAUGE_FAMILIES = {"num_held_blocks": "pdserve_kv_num_held_blocks"}
# Per-transfer samples (a list of values per report) -> histogram family.
SAMPLE_FAMILIES = {"xfer_time_seconds": "pdserve_kv_xfer_time_seconds",
                   "pull_wait_seconds": "pdserve_kv_pull_wait_seconds",
                   "num_blocks_per_transfer": "pdserve_kv_num_blocks_per_transfer"}
# vLLM's NIXL buckets: 5 ms .. 5 s for transfer times.
XFER_TIME_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0]
BLOCK_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]


def engine_role(kv_transfer: dict[str, Any] | None) -> str:
    """The ``role`` tag of an engine started with vLLM's ``kv_transfer`` config."""
    if kv_transfer is None:
        return STANDALONE
    kv_role = kv_transfer.get("kv_role")
    if kv_role not in ROLE_BY_KV_ROLE:
        raise ValueError(f"unknown kv_role {kv_role!r}; expected one of {list(ROLE_BY_KV_ROLE)}")
    return ROLE_BY_KV_ROLE[kv_role]


def in_ray_actor() -> bool:
    """Whether this process is a Ray actor (a Serve replica) whose metrics Ray exports."""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def replica_id() -> str:
    """This Serve replica's id (vLLM's ``ReplicaId`` tag), or "" outside a replica."""
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except serve.exceptions.RayServeException:
        return ""


@functools.cache
def role_prometheus_logger(role: str) -> type:
    """vLLM's ``RayPrometheusStatLogger`` whose every metric has a ``role`` tag set to
    ``role``, next to vLLM's own labels (``model_name``, ``engine``) and ``ReplicaId``."""
    from vllm.v1.metrics import ray_wrappers as rw

    def tagged(base: type) -> type:
        class RoleTagged(base):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self._tags = {**self._tags, "role": role}

            def _get_tag_keys(self, labelnames: list[str] | None) -> tuple[str, ...]:
                return (*base._get_tag_keys(labelnames), "role")

            def _build_tags(self, *labels: Any, **labelskwargs: Any) -> dict[str, str]:
                if labels:  # positional labels name the metric's own labels, in order
                    own = [k for k in self.metric._tag_keys if k not in ("ReplicaId", "role")]
                    if len(labels) != len(own):
                        raise ValueError(f"expected {len(own)} labels ({own}), got {len(labels)}")
                    labelskwargs.update(zip(own, labels, strict=True))
                return {**base._build_tags(self, **labelskwargs), "role": role}

        RoleTagged.__name__ = RoleTagged.__qualname__ = f"Role{base.__name__}"
        return RoleTagged

    gauge, counter, histogram = (tagged(rw.RayGaugeWrapper), tagged(rw.RayCounterWrapper),
                                 tagged(rw.RayHistogramWrapper))

    def subclass(name: str, base: type, **attrs: Any) -> type:
        return type(name, (base,), {**attrs, "__module__": __name__})

    return subclass(
        f"RayPrometheusStatLogger_{role}", rw.RayPrometheusStatLogger,
        _gauge_cls=gauge, _counter_cls=counter, _histogram_cls=histogram,
        _spec_decoding_cls=subclass("RoleSpecDecodingProm", rw.RaySpecDecodingProm,
                                    _counter_cls=counter),
        _kv_connector_cls=subclass("RoleKVConnectorProm", rw.RayKVConnectorProm,
                                   _gauge_cls=gauge, _counter_cls=counter,
                                   _histogram_cls=histogram),
        _perf_metrics_cls=subclass("RolePerfMetricsProm", rw.RayPerfMetricsProm,
                                   _counter_cls=counter))


class TransferMetrics:
    """The connector's counters as ``pdserve_kv_*`` Ray metrics of one engine.

    ``record`` takes one ``kv_connector_stats`` report: counters are deltas (added), gauges
    levels (set), sample lists observed one by one (``kvtransfer/stats.py``). Without
    ``families`` (outside a Ray actor: ``TransferMetrics.create``) it does nothing.
    """

    def __init__(self, role: str, replica: str, families: dict[str, Any] | None = None) -> None:
        self.tags = {"role": role, "ReplicaId": replica}
        self._families = families or {}
        self._unknown_logged: set[str] = set()

    @classmethod
    def create(cls, role: str) -> TransferMetrics:
        """Ray metrics inside a Ray actor, a no-op elsewhere."""
        if not in_ray_actor():
            return cls(role, "")
        return cls(role, replica_id(), make_ray_families())

    @property
    def is_enabled(self) -> bool:
        return bool(self._families)

    def record(self, stats: dict[str, Any]) -> None:
        from kvtransfer.stats import is_gauge

        if not self._families:
            return
        for name, value in stats.items():
            if isinstance(value, list) and name in SAMPLE_FAMILIES:
                for sample in value:
                    self._families[SAMPLE_FAMILIES[name]].observe(sample, tags=self.tags)
            elif type(value) is not int:
                self._log_unknown(name, value)
            elif is_gauge(name):
                if name in GAUGE_FAMILIES:
                    self._families[GAUGE_FAMILIES[name]].set(value, tags=self.tags)
                else:
                    self._log_unknown(name, value)
            elif value > 0:
                family, extra = COUNTER_FAMILIES.get(
                    name, ("pdserve_kv_connector_counters", {"counter": name}))
                self._families[family].inc(value, tags={**self.tags, **extra})

    def _log_unknown(self, name: str, value: Any) -> None:
        if name not in self._unknown_logged:
            self._unknown_logged.add(name)
            logger.warning("KV connector stat %r (%s) has no metric; not exported", name,
                           type(value).__name__)


def make_ray_families() -> dict[str, Any]:
    """One Ray metric per ``TRANSFER_FAMILIES`` entry (Ray prefixes each name with ``ray_``)."""
    from ray.util import metrics

    families: dict[str, Any] = {}
    for name, (kind, description, extra) in TRANSFER_FAMILIES.items():
        tag_keys = ("role", "ReplicaId", *extra)
        if kind == "counter":
            families[name] = metrics.Counter(name, description, tag_keys=tag_keys)
        elif kind == "gauge":
            families[name] = metrics.Gauge(name, description, tag_keys=tag_keys)
        else:
            buckets = XFER_TIME_BUCKETS if name.endswith("_seconds") else BLOCK_BUCKETS
            families[name] = metrics.Histogram(name, description, boundaries=buckets,
                                               tag_keys=tag_keys)
    return families
