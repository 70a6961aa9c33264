"""Engine and transfer metrics (cluster/metrics.py) without Ray, and the Grafana dashboard
(deploy/grafana/pdserve.json): importable, and every query names only metric families that
the code defines (ours, vLLM's Ray stat logger's, Ray Serve's)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from cluster.metrics import (
    COUNTER_FAMILIES,
    GAUGE_FAMILIES,
    SAMPLE_FAMILIES,
    TRANSFER_FAMILIES,
    TransferMetrics,
    engine_role,
    in_ray_actor,
    role_prometheus_logger,
)
from router.metrics import ROUTER_FAMILIES

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pdserve.json"
# Ray Serve's own metrics the dashboard reads: name -> where Ray defines it.
RAY_SERVE_METRICS = {"serve_deployment_replica_healthy": ("gauge", "serve/_private/"
                                                           "deployment_state.py")}
# Ray Serve's per-protocol proxy counters, named from the protocol (an f-string in its source).
RAY_SERVE_PROTOCOL_COUNTERS = ("serve_num_{protocol_name}_requests",
                               "serve_num_{protocol_name}_error_requests")
PROTOCOLS = ("http", "grpc")
# What the dashboard must show (issue 7): a family for each.
REQUIRED = ("ray_pdserve_router_time_to_first_token_seconds_bucket",
            "ray_pdserve_router_inter_token_latency_seconds_bucket",
            "ray_pdserve_router_e2e_request_latency_seconds_bucket",
            "ray_vllm_time_to_first_token_seconds_bucket",
            "ray_vllm_inter_token_latency_seconds_bucket",
            "ray_vllm_num_requests_waiting", "ray_vllm_num_requests_running",
            "ray_vllm_kv_cache_usage_perc", "ray_vllm_prefix_cache_hits_total",
            "ray_vllm_prefix_cache_queries_total", "ray_pdserve_kv_bytes_transferred_total",
            "ray_pdserve_kv_num_failed_transfers_total", "ray_pdserve_router_local_prefills_total",
            "ray_serve_deployment_replica_healthy", "ray_pdserve_kv_num_held_blocks",
            "ray_pdserve_router_decision_latency_seconds_bucket")


def exported_names(name: str, kind: str) -> set[str]:
    """What Ray's Prometheus endpoint calls a metric: ``ray_`` prefix, ``:`` -> ``_``,
    ``_total`` on counters, ``_bucket``/``_sum``/``_count`` on histograms."""
    base = "ray_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)
    if kind == "counter":
        return {base + "_total"}
    if kind == "histogram":
        return {base + suffix for suffix in ("_bucket", "_sum", "_count")}
    return {base}


def vllm_logger_families() -> dict[str, str]:
    """``vllm:x`` -> kind, from the source of vLLM's PrometheusStatLogger."""
    import vllm.v1.metrics.loggers as loggers

    source = Path(loggers.__file__).read_text()
    found = re.findall(r'self\._(counter|gauge|histogram)_cls\(\s*name="(vllm:\w+)"', source)
    assert len(found) > 30, "vLLM's logger source changed shape"
    return {name: kind for kind, name in found}


def ray_serve_families() -> dict[str, str]:
    import ray

    root = Path(ray.__file__).parent
    for name, (kind, path) in RAY_SERVE_METRICS.items():
        source = (root / path).read_text()
        assert re.search(rf'metrics\.{kind.capitalize()}\(\s*"{name}"', source), name
    families = {name: kind for name, (kind, _) in RAY_SERVE_METRICS.items()}
    from ray.serve._private.common import RequestProtocol

    source = (root / "serve/_private/request_ingress_metrics.py").read_text()
    assert {p.value.lower() for p in RequestProtocol} >= set(PROTOCOLS)
    for template in RAY_SERVE_PROTOCOL_COUNTERS:
        assert re.search(rf'metrics\.Counter\(\s*f"{re.escape(template)}"', source), template
        families.update({template.format(protocol_name=p): "counter" for p in PROTOCOLS})
    return families


def known_names() -> set[str]:
    families = {**vllm_logger_families(), **ray_serve_families()}
    families.update({name: kind for name, (kind, _, _) in TRANSFER_FAMILIES.items()})
    families.update({name: kind for name, kind, _, _ in ROUTER_FAMILIES.values()})
    return set().union(*(exported_names(n, k) for n, k in families.items()))


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def queries() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


# -- the dashboard --------------------------------------------------------------------------

def test_dashboard_queries_name_only_defined_metrics() -> None:
    known = known_names()
    for expr in queries():
        used = set(re.findall(r"\bray_\w+", expr))
        assert used, f"no metric in {expr!r}"
        assert used <= known, f"unknown metric(s) {used - known} in {expr!r}"


def test_dashboard_shows_what_issue_7_asks_for() -> None:
    used = set().union(*(re.findall(r"\bray_\w+", e) for e in queries()))
    assert set(REQUIRED) <= used, set(REQUIRED) - used


def test_dashboard_is_importable_with_a_datasource_variable() -> None:
    d = dashboard()
    assert d["title"] and d["uid"] and d["schemaVersion"] >= 27
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + \
            p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["refId"]
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]


def test_exported_names_follow_ray() -> None:
    assert exported_names("vllm:generation_tokens", "counter") == \
        {"ray_vllm_generation_tokens_total"}
    assert exported_names("pdserve_kv_num_held_blocks", "gauge") == \
        {"ray_pdserve_kv_num_held_blocks"}


# -- engine and transfer metrics ------------------------------------------------------------

def test_engine_role() -> None:
    assert engine_role({"kv_role": "kv_producer"}) == "prefill"
    assert engine_role({"kv_role": "kv_consumer"}) == "decode"
    assert engine_role(None) == "standalone"
    with pytest.raises(ValueError, match="unknown kv_role"):
        engine_role({"kv_role": "kv_sideways"})


def test_every_connector_stat_has_its_family() -> None:
    from kvtransfer.stats import COUNTERS, GAUGES

    assert set(COUNTERS) <= set(COUNTER_FAMILIES), set(COUNTERS) - set(COUNTER_FAMILIES)
    assert set(GAUGES) <= set(GAUGE_FAMILIES)
    for family, extra in COUNTER_FAMILIES.values():
        kind, _, tag_keys = TRANSFER_FAMILIES[family]
        assert kind == "counter" and set(extra) == set(tag_keys), family
    for family in (*GAUGE_FAMILIES.values(), *SAMPLE_FAMILIES.values()):
        assert family in TRANSFER_FAMILIES


class FakeFamily:
    """Stands in for a Ray metric: keeps what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("inc", value, tags))

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("set", value, tags))

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("observe", value, tags))


def fake_transfer_metrics(role: str = "decode") -> tuple[TransferMetrics, dict[str, FakeFamily]]:
    families = {name: FakeFamily() for name in TRANSFER_FAMILIES}
    return TransferMetrics(role, "r1", families), families


def test_transfer_counters_become_tagged_families() -> None:
    metrics, families = fake_transfer_metrics()
    metrics.record({"num_bytes_received": 4096, "num_loads": 2, "num_failed_loads": 1,
                    "num_links_opened": 1, "num_pulls": 0, "num_claims_sent": 3})
    tags = {"role": "decode", "ReplicaId": "r1"}
    assert families["pdserve_kv_bytes_transferred"].calls == [("inc", 4096, tags)]
    assert families["pdserve_kv_num_transfers"].calls == [("inc", 2, tags)]  # 0 pulls: no inc
    assert families["pdserve_kv_num_failed_transfers"].calls == [
        ("inc", 1, {**tags, "reason": "load"})]
    assert families["pdserve_kv_num_links"].calls == [("inc", 1, {**tags, "event": "opened"})]
    assert families["pdserve_kv_num_claims"].calls == [("inc", 3, tags)]


def test_gauges_are_set_samples_observed_unknown_counters_kept() -> None:
    metrics, families = fake_transfer_metrics("prefill")
    tags = {"role": "prefill", "ReplicaId": "r1"}
    metrics.record({"num_held_blocks": 7, "num_new_kind": 2,
                    "xfer_time_seconds": [0.01, 0.02], "num_blocks_per_transfer": [4]})
    metrics.record({"num_held_blocks": 0})  # a level: set, even to 0
    assert families["pdserve_kv_num_held_blocks"].calls == [("set", 7, tags), ("set", 0, tags)]
    assert families["pdserve_kv_connector_counters"].calls == [
        ("inc", 2, {**tags, "counter": "num_new_kind"})]
    assert families["pdserve_kv_xfer_time_seconds"].calls == [
        ("observe", 0.01, tags), ("observe", 0.02, tags)]
    assert families["pdserve_kv_num_blocks_per_transfer"].calls == [("observe", 4, tags)]


def test_stats_without_a_metric_are_logged_once(caplog) -> None:
    metrics, families = fake_transfer_metrics()
    with caplog.at_level("WARNING"):
        metrics.record({"avg_ms": 1.5, "some_list": [1]})
        metrics.record({"avg_ms": 2.5})
    assert sum("'avg_ms'" in r.message for r in caplog.records) == 1
    assert all(not f.calls for f in families.values())


def test_outside_ray_there_is_nothing_to_export() -> None:
    assert not in_ray_actor()
    metrics = TransferMetrics.create("decode")
    assert not metrics.is_enabled
    metrics.record({"num_bytes_received": 10, "num_held_blocks": 1, "xfer_time_seconds": [1.0]})


def test_stat_loggers_outside_ray_are_ours_alone() -> None:
    from cluster.engine import StatsSnapshot, stat_loggers

    loggers = stat_loggers(StatsSnapshot(), "decode")
    assert len(loggers) == 1 and loggers[0].__name__ == "EngineStats"


def test_engine_stats_hand_connector_stats_to_the_transfer_metrics() -> None:
    from vllm.v1.metrics.stats import SchedulerStats

    from cluster.engine import StatsSnapshot, make_stats_logger_class

    metrics, families = fake_transfer_metrics()
    snapshot = StatsSnapshot()
    logger = make_stats_logger_class(snapshot, metrics)(None)
    logger.record(SchedulerStats(kv_connector_stats={"num_bytes_received": 64}), None)
    logger.record(SchedulerStats(), None)
    assert snapshot.num_bytes_received == 64
    assert families["pdserve_kv_bytes_transferred"].calls == [
        ("inc", 64, {"role": "decode", "ReplicaId": "r1"})]


def test_vllm_metrics_get_a_role_tag() -> None:
    logger_cls = role_prometheus_logger("prefill")
    assert role_prometheus_logger("prefill") is logger_cls
    gauge = logger_cls._gauge_cls("vllm:test_role_gauge", "doc", ["model_name", "engine"])
    assert gauge.metric._tag_keys == ("model_name", "engine", "ReplicaId", "role")
    assert gauge.labels("m", "0")._tags == {"model_name": "m", "engine": "0",
                                             "ReplicaId": "", "role": "prefill"}
    assert gauge.labels(model_name="m", engine=1)._tags["engine"] == "1"
    with pytest.raises(ValueError, match="expected 2 labels"):
        gauge.labels("m")
    histogram = logger_cls._histogram_cls("vllm:test_role_histogram", "doc", None, [1.0])
    assert histogram._tags == {"ReplicaId": "", "role": "prefill"}
    for part in ("_kv_connector_cls", "_spec_decoding_cls", "_perf_metrics_cls"):
        assert getattr(logger_cls, part)._counter_cls is logger_cls._counter_cls
