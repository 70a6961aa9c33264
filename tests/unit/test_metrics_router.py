"""The router's client-side latencies: ``RequestTimer``'s arithmetic, ``RouterMetrics`` without
Ray, and which path each request is labelled with, through the real ingress over fake handles
(tests/unit/test_router_app.py)."""

from __future__ import annotations

from typing import Any

import pytest

from router.metrics import (
    PATHS,
    ROUTER_FAMILIES,
    TTFT_PHASES,
    FirstTokenPhases,
    RequestTimer,
    RouterMetrics,
)
from tests.unit.test_router_app import completion, make, model_dir  # noqa: F401 (fixtures)


class Recorder:
    """Stands in for ``RouterMetrics``: keeps every latency observation."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, float]] = []
        self.phases: list[dict[str, float]] = []

    def latency(self, kind: str, path: str, seconds: float) -> None:
        self.seen.append((kind, path, seconds))

    def ttft_phases(self, phases: dict[str, float]) -> None:
        self.phases.append(phases)

    def kinds(self) -> list[tuple[str, str]]:
        return [(kind, path) for kind, path, _ in self.seen]

    def __getattr__(self, name: str) -> Any:  # every other RouterMetrics method: a no-op
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_timer_measures_from_arrival_then_between_chunks() -> None:
    recorder, clock = Recorder(), Clock()
    timer = RequestTimer(recorder, "disaggregated", arrival_s=99.5, clock=clock)
    clock.now = 100.25
    timer.chunk()
    clock.now = 100.5
    timer.chunk()
    clock.now = 101.0
    timer.chunk()
    timer.end()
    timer.end()  # once only
    assert recorder.seen == [("ttft", "disaggregated", 0.75), ("itl", "disaggregated", 0.25),
                             ("itl", "disaggregated", 0.5), ("e2e", "disaggregated", 1.5)]
    assert timer.num_chunks == 3


def test_timer_without_arrival_starts_at_creation() -> None:
    recorder, clock = Recorder(), Clock(5.0)
    timer = RequestTimer(recorder, "fallback", clock=clock)
    clock.now = 7.0
    timer.end()
    assert recorder.seen == [("e2e", "fallback", 2.0)]


def test_timer_refuses_an_unknown_path() -> None:
    with pytest.raises(ValueError, match="unknown request path"):
        RequestTimer(Recorder(), "sideways")


def test_router_metrics_without_ray_are_no_ops() -> None:
    m = RouterMetrics()
    assert not m.is_enabled
    m.index(3, 1, 0, 1)
    m.events({"applied": 2})
    m.decision("transfer")
    m.decision_latency(0.001)
    m.local_prefill("policy")
    m.decode_retry()
    m.replica_failure("decode")
    for path in PATHS:
        m.latency("ttft", path, 0.1)
    timer = RequestTimer(m, "disaggregated")
    timer.chunk()
    timer.end()


def test_router_metrics_refuse_unknown_kinds_and_paths_even_without_ray() -> None:
    m = RouterMetrics()
    with pytest.raises(ValueError, match="unknown latency kind"):
        m.latency("tpot", "disaggregated", 0.1)
    with pytest.raises(ValueError, match="unknown request path"):
        m.latency("ttft", "elsewhere", 0.1)


def test_families_have_ray_legal_names() -> None:
    import re

    for name, kind, description, tags in ROUTER_FAMILIES.values():
        assert re.fullmatch(r"pdserve_router_[a-z0-9_]+", name), name
        assert kind in ("gauge", "counter", "histogram") and description
        assert all(isinstance(t, str) for t in tags)
    assert "path" in ROUTER_FAMILIES["ttft"][3]


# -- which path each request is labelled with, through the real ingress ----------------------

@pytest.fixture
async def routed(make):  # noqa: F811 (the fixture imported above)
    h = make()
    recorder = Recorder()
    h.pd.coordinator.metrics = recorder
    return h, recorder


async def test_a_transferred_request_is_disaggregated(routed) -> None:
    h, recorder = routed
    r = await h.client.post("/v1/completions", json=completion())
    assert r.status_code == 200
    assert recorder.kinds() == [("e2e", "disaggregated")]
    assert 0 <= recorder.seen[0][2] < 5


async def test_a_failed_prefill_is_a_fallback(routed) -> None:
    h, recorder = routed
    h.prefill.behaviour.update(p0="raise", p1="raise")
    r = await h.client.post("/v1/completions", json=completion())
    assert r.status_code == 200
    assert recorder.kinds() == [("e2e", "fallback")]


async def test_several_prompts_are_disaggregated_and_beam_search_is_not(routed) -> None:
    h, recorder = routed
    r = await h.client.post("/v1/completions", json=completion(["hello world", "the cat"]))
    assert r.status_code == 200
    assert recorder.kinds() == [("e2e", "disaggregated")]
    r = await h.client.post("/v1/completions", json=completion(use_beam_search=True, n=2))
    assert r.status_code == 200
    assert recorder.kinds()[1:] == [("e2e", "prefilled_on_decode")]


async def test_a_stream_records_ttft_each_later_chunk_and_its_end(routed) -> None:
    h, recorder = routed
    r = await h.client.post("/v1/completions", json=completion(stream=True))
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    # two chunks then [DONE]: one first token, one inter-token gap, the whole request
    assert recorder.kinds() == [("ttft", "disaggregated"), ("itl", "disaggregated"),
                                ("e2e", "disaggregated")]
    ttft, e2e = recorder.seen[0][2], recorder.seen[2][2]
    assert 0 <= ttft <= e2e


async def test_a_stream_that_breaks_has_no_end_to_end_latency(routed) -> None:
    h, recorder = routed
    h.decode.behaviour.update(d0="midfail", d1="midfail")
    r = await h.client.post("/v1/completions", json=completion(stream=True))
    assert '"error"' in r.text
    assert recorder.kinds() == [("ttft", "disaggregated")]


async def test_errors_record_nothing(routed) -> None:
    h, recorder = routed
    h.decode.behaviour.update(d0="client_error", d1="client_error")
    r = await h.client.post("/v1/completions", json=completion())
    assert r.status_code == 400
    h.decode.behaviour.update(d0="raise", d1="raise")
    r = await h.client.post("/v1/completions", json=completion("the mat"))
    assert r.status_code == 503
    assert recorder.seen == []


async def test_request_state_goes_with_the_request(routed) -> None:
    import gc

    h, recorder = routed
    h.prefill.behaviour.update(p0="raise", p1="raise")
    for _ in range(3):
        await h.client.post("/v1/completions", json=completion())
    gc.collect()
    assert h.pd.calls._requests == {}


# -- where the time to first token goes --------------------------------------------------------


def test_phases_of_a_transferred_request_add_up_to_the_ttft() -> None:
    phases = FirstTokenPhases(prefill_sent_s=10.002, prefill_done_s=10.5, prefill_queue_s=0.1,
                              prefill_compute_s=0.3, decode_sent_s=10.501)
    split = phases.split(arrival_s=10.0, first_chunk_s=10.8)
    assert split == pytest.approx({"route": 0.002, "prefill_queue": 0.1, "prefill_compute": 0.3,
                                   "prefill_hops": 0.098, "decode": 0.299})
    assert sum(split.values()) == pytest.approx(0.8 - 0.001)  # 1 ms between the two calls
    assert set(split) <= set(TTFT_PHASES)


def test_phases_without_the_engines_times_or_a_prefill() -> None:
    untold = FirstTokenPhases(prefill_sent_s=1.0, prefill_done_s=1.5, decode_sent_s=1.5)
    assert untold.split(0.9, 2.0) == pytest.approx(
        {"route": 0.1, "prefill_call": 0.5, "decode": 0.5})
    failed = FirstTokenPhases(prefill_sent_s=1.0, decode_sent_s=1.75)  # then prefilled on decode
    assert failed.split(0.9, 2.0) == pytest.approx(
        {"route": 0.1, "prefill_call": 0.75, "decode": 0.25})
    local = FirstTokenPhases(decode_sent_s=1.0)
    assert local.split(0.5, 2.0) == pytest.approx({"route": 0.5, "decode": 1.0})


async def test_a_stream_records_its_ttft_phases(routed) -> None:
    h, recorder = routed
    r = await h.client.post("/v1/completions", json=completion(stream=True))
    assert r.status_code == 200
    [phases] = recorder.phases
    assert list(phases) == ["route", "prefill_queue", "prefill_compute", "prefill_hops",
                            "decode"]
    assert (phases["prefill_queue"], phases["prefill_compute"]) == (0.125, 0.25)  # the fake's
    ttft = recorder.seen[0][2]
    assert 0 <= phases["route"] < ttft
    # The engine's times exceed the fake call's real duration: the hops come out negative.
    assert sum(phases.values()) <= ttft + 1e-6


async def test_a_stream_of_several_prompts_records_their_prefills_as_one_call(routed) -> None:
    h, recorder = routed
    r = await h.client.post("/v1/completions",
                            json=completion(["hello world", "the cat"], stream=True))
    assert r.status_code == 200
    [phases] = recorder.phases  # one request: its prompts' own prefills record no phases
    assert list(phases) == ["route", "prefill_call", "decode"]
    assert 0 <= sum(phases.values()) <= recorder.seen[0][2] + 1e-6


async def test_a_non_streaming_request_records_no_phases(routed) -> None:
    h, recorder = routed
    r = await h.client.post("/v1/completions", json=completion())
    assert r.status_code == 200 and recorder.phases == []
