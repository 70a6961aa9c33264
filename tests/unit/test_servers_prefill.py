"""PrefillServer: what it refuses (400), when it is busy (503), and the held-blocks gauge it
reads from the engine's stats (fake engine, no vLLM engine)."""

from __future__ import annotations

from typing import Any

import pytest

from cluster.engine import StatsSnapshot, apply_connector_stats, error_body
from prefill.server import PrefillServer, is_single_prompt
from tests.unit import fakes
from tests.unit.fakes import PARAMS


class FakeEngine(fakes.FakeEngine):
    def __init__(self, result: Any = None) -> None:
        super().__init__({"choices": [{"text": "x"}], "kv_transfer_params": PARAMS}
                         if result is None else result)


async def prefill(server: PrefillServer, body: dict, kind: str = "completion") -> dict:
    return await server.prefill(kind, body, "t1")


async def test_prefill_runs_one_token_and_returns_the_parameters() -> None:
    server = PrefillServer(FakeEngine())
    out = await prefill(server, {"prompt": [1, 2, 3], "n": 1, "best_of": 1, "stream": True})
    assert out == {"kv_transfer_params": PARAMS}
    (body,) = server.engine.bodies
    assert body["max_tokens"] == 1 and body["stream"] is False and "n" not in body
    assert body["kv_transfer_params"] == {"do_remote_decode": True, "transfer_id": "t1"}
    assert server.num_in_flight == 0 and server.queued_prefill_tokens == 0


@pytest.mark.parametrize("body, param", [
    ({"prompt": [1, 2], "n": 2}, "n"),
    ({"prompt": [1, 2], "n": "1"}, "n"),
    ({"prompt": [1, 2], "best_of": 3}, "best_of"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [[1], [2]]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, True]}, "prompt"),
    ({}, "prompt"),
])
async def test_refuses_anything_but_one_prompt_with_n_1(body, param) -> None:
    server = PrefillServer(FakeEngine())
    out = await prefill(server, body)
    assert out["error"]["code"] == 400 and out["error"]["type"] == "BadRequestError"
    assert out["error"]["param"] == param
    assert "routing bug" in out["error"]["message"] and "n == 1" in out["error"]["message"]
    assert server.engine.bodies == []  # never ran
    assert server.health()["failures"]["refused"] == 1


async def test_chat_with_n_2_is_refused() -> None:
    server = PrefillServer(FakeEngine())
    out = await prefill(server, {"messages": [{"role": "user", "content": "hi"}], "n": 2},
                        kind="chat")
    assert out["error"]["param"] == "n"
    out = await prefill(server, {"messages": [{"role": "user", "content": "hi"}]}, kind="chat")
    assert out == {"kv_transfer_params": PARAMS}


@pytest.mark.parametrize("prompt", ["text", [1, 2], ["text"], [[1, 2]]])
def test_single_prompt_forms(prompt) -> None:
    assert is_single_prompt(prompt)


async def test_busy_at_max_held_blocks_without_running_the_prompt() -> None:
    server = PrefillServer(FakeEngine(), max_held_blocks=10)
    server.engine.stats.num_held_blocks = 9
    assert await prefill(server, {"prompt": [1]}) == {"kv_transfer_params": PARAMS}
    server.engine.stats.num_held_blocks = 10
    out = await prefill(server, {"prompt": [1]})
    assert out["error"]["code"] == 503 and out["error"]["type"] == "ServiceUnavailableError"
    assert "busy" in out["error"]["message"] and "10 KV blocks" in out["error"]["message"]
    assert len(server.engine.bodies) == 1  # the second prompt never ran
    assert server.failures["busy"] == 1


@pytest.mark.parametrize("params", [{"busy": True}, None, {}])
async def test_scheduler_refusing_to_hold_is_busy(params) -> None:
    result = {"choices": [{"text": "x"}], "kv_transfer_params": params}
    out = await prefill(PrefillServer(FakeEngine(result), max_held_blocks=4), {"prompt": [1]})
    assert out["error"]["code"] == 503 and out["error"]["type"] == "ServiceUnavailableError"
    assert "busy" in out["error"]["message"]


async def test_engine_error_body_passes_through() -> None:
    refused = error_body(400, "prompt too long", "BadRequestError", "prompt")
    assert await prefill(PrefillServer(FakeEngine(refused)), {"prompt": [1]}) == refused


def test_no_cap_is_never_busy_and_bad_caps_are_refused() -> None:
    server = PrefillServer(FakeEngine())
    server.engine.stats.num_held_blocks = 10**6
    assert not server.is_busy()
    with pytest.raises(ValueError):
        PrefillServer(FakeEngine(), max_held_blocks=0)


def test_held_blocks_is_a_gauge_and_the_rest_are_counters() -> None:
    snapshot = StatsSnapshot()
    apply_connector_stats(snapshot, {"num_bytes_sent": 100, "num_held_blocks": 7})
    apply_connector_stats(snapshot, {"num_bytes_sent": 50, "num_held_blocks": 3})
    assert (snapshot.num_bytes_sent, snapshot.num_held_blocks) == (150, 3)
    apply_connector_stats(snapshot, {"num_bytes_sent": 1})  # no gauge reported: kept
    assert (snapshot.num_bytes_sent, snapshot.num_held_blocks) == (151, 3)
    apply_connector_stats(snapshot, {"num_held_blocks": 0, "num_auth_failures": 5,
                                     "num_loads": 1.5})
    apply_connector_stats(snapshot, {"num_auth_failures": 2})
    assert snapshot.num_held_blocks == 0 and snapshot.num_loads == 0
    assert snapshot.transfer == {"num_auth_failures": 7}


def test_every_transport_gauge_has_a_snapshot_field() -> None:
    from kvtransfer.stats import GAUGES

    assert all(hasattr(StatsSnapshot(), name) for name in GAUGES)


def test_health_names_the_ray_node_it_runs_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    from types import SimpleNamespace

    server = PrefillServer(FakeEngine())
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert server.health()["node_id"] is None  # not in Ray
    context = SimpleNamespace(get_node_id=lambda: "ab12")
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(
        is_initialized=lambda: True, get_runtime_context=lambda: context))
    assert server.health()["node_id"] == "ab12"


async def test_the_engines_own_times_come_back_with_the_parameters() -> None:
    """The prefill engine's queue and compute time for this request (vLLM's per-request stats,
    found by the request id the prefill body sets) go back to the router; others' do not."""
    from cluster.engine import RequestTiming

    engine = FakeEngine()
    server = PrefillServer(engine)
    engine.stats.record_timing("cmpl-pdt-other-0", RequestTiming(9.0, 9.0))
    engine.stats.record_timing("cmpl-pdt-t1-0", RequestTiming(0.25, 0.5))
    engine.stats.record_timing("cmpl-not-timed-0", RequestTiming(1.0, 1.0))  # not kept
    out = await prefill(server, {"prompt": [1, 2, 3]})
    assert out == {"kv_transfer_params": PARAMS, "timing": {"queue_s": 0.25, "compute_s": 0.5}}
    assert engine.bodies[0]["request_id"] == "pdt-t1"
    assert list(engine.stats.timings) == ["cmpl-pdt-other-0"]  # taken once, others kept
    assert await prefill(server, {"prompt": [1, 2, 3]}) == {"kv_transfer_params": PARAMS}


def test_timings_kept_are_bounded() -> None:
    from cluster.engine import TIMINGS_KEPT, RequestTiming

    stats = StatsSnapshot()
    for i in range(TIMINGS_KEPT + 5):
        stats.record_timing(f"cmpl-pdt-{i}-0", RequestTiming(0.0, 0.0))
    assert len(stats.timings) == TIMINGS_KEPT
    assert stats.take_timing("cmpl-pdt-0-0") is None  # the oldest went first
    assert stats.take_timing(f"cmpl-pdt-{TIMINGS_KEPT + 4}-0") is not None
