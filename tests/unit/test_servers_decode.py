"""DecodeServer: streams never end silently, failures before the first token raise, and a
transfer nobody will pull is released (fake engine, no vLLM engine)."""

from __future__ import annotations

import json
from typing import Any

import pytest

import decode.server as decode_server
from cluster.engine import EngineServer
from cluster.sse import DONE_EVENT, error_body, event_data, event_error
from cluster.worker_health import UnhealthyError
from decode.server import DecodeServer, EngineStreamError
from tests.unit import fakes
from tests.unit.fakes import PARAMS

CHUNK = 'data: {"id": "c", "choices": [{"text": "a"}]}\n\n'
VLLM_ERROR_EVENT = "data: " + json.dumps(error_body(500, "engine boom",
                                                    "InternalServerError")) + "\n\n"


class DeadEngineError(RuntimeError):
    pass


class FakeEngine(fakes.FakeEngine):
    """``call`` returns a scripted body, or a stream made by ``result(engine)``, or raises
    ``call_error``."""

    def __init__(self, result: Any = None, call_error: Exception | None = None) -> None:
        super().__init__(result)
        self.call_error = call_error
        self.streams: list[Stream] = []

    async def call(self, kind: str, body: dict) -> Any:
        self.bodies.append(body)
        if self.call_error is not None:
            raise self.call_error
        if callable(self.result):
            stream = Stream(self.result(self))
            self.streams.append(stream)
            return stream
        return self.result


class Stream:
    """An async generator's surface (``__aiter__``, ``__anext__``, ``aclose``), recording
    whether it was closed."""

    def __init__(self, gen) -> None:
        self._gen = gen
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        self.closed = True
        await self._gen.aclose()


def chunks(*items, die_after: int | None = None, error: Exception | None = None):
    """A stream factory: yields ``items``; raises ``error`` after ``die_after`` of them (the
    engine dies first when ``error`` is a DeadEngineError)."""
    async def gen(engine):
        for i, item in enumerate(items):
            if die_after is not None and i == die_after:
                if isinstance(error, DeadEngineError):
                    engine.errored = True
                raise error
            yield item
        if die_after is not None and die_after >= len(items):
            if isinstance(error, DeadEngineError):
                engine.errored = True
            raise error
    return gen


@pytest.fixture
def released(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    monkeypatch.setattr(decode_server, "release_transfer", lambda params: calls.append(params))
    return calls


async def collect(server: DecodeServer, params=PARAMS) -> list:
    return [c async for c in server.generate_stream("completion", {"prompt": [1]}, params)]


async def test_a_normal_stream_passes_through(released) -> None:
    server = DecodeServer(FakeEngine(chunks(CHUNK, CHUNK, DONE_EVENT)))
    assert await collect(server) == [CHUNK, CHUNK, DONE_EVENT]
    assert released == [] and server.num_in_flight == 0
    assert server.engine.bodies[0]["kv_transfer_params"] == PARAMS


@pytest.mark.parametrize("error", [DeadEngineError("EngineCore died"), ValueError("bad")])
async def test_failure_after_the_first_chunk_ends_with_an_error_event(released, error) -> None:
    server = DecodeServer(FakeEngine(chunks(CHUNK, CHUNK, DONE_EVENT, die_after=2, error=error)))
    out = await collect(server)
    assert out[:2] == [CHUNK, CHUNK] and out[-1] == DONE_EVENT and len(out) == 4
    body = event_error("completion", out[2])
    assert body is not None
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == 500 and body["error"]["type"] == "InternalServerError"
    assert type(error).__name__ in body["error"]["message"]
    assert released == []  # the blocks were loaded before the first token
    assert server.health()["failures"]["stream_failed"] == 1


async def test_engines_own_error_event_mid_stream_passes_through_and_is_counted(released):
    server = DecodeServer(FakeEngine(chunks(CHUNK, VLLM_ERROR_EVENT, DONE_EVENT)))
    assert await collect(server) == [CHUNK, VLLM_ERROR_EVENT, DONE_EVENT]
    assert server.failures["stream_error_event"] == 1


async def test_a_stream_cut_without_done_gets_an_error_event(released) -> None:
    server = DecodeServer(FakeEngine(chunks(CHUNK, CHUNK)))
    out = await collect(server)
    assert out[:2] == [CHUNK, CHUNK] and event_error("completion", out[2]) and out[3] == DONE_EVENT


async def test_engine_death_before_the_first_chunk_raises_and_releases(released) -> None:
    engine = FakeEngine(chunks(CHUNK, die_after=0, error=DeadEngineError("EngineCore died")))
    server = DecodeServer(engine)
    with pytest.raises(EngineStreamError, match="EngineCore died"):
        await collect(server)
    assert released == [PARAMS]
    assert engine.streams[0].closed and server.num_in_flight == 0


async def test_error_event_as_first_chunk_raises(released) -> None:
    engine = FakeEngine(chunks(VLLM_ERROR_EVENT, DONE_EVENT))
    server = DecodeServer(engine)
    with pytest.raises(EngineStreamError, match="engine boom"):
        await collect(server)
    assert released == []  # the engine is alive and took the request: it frees its own
    assert engine.streams[0].closed


async def test_client_error_event_as_first_chunk_is_returned_as_a_body(released) -> None:
    """A 4xx error event first is the request's fault: returned as a body (no retry
    elsewhere), the stream closed and the transfer released."""
    refused = error_body(400, "bad logits processor", "BadRequestError")
    engine = FakeEngine(chunks("data: " + json.dumps(refused) + "\n\n", DONE_EVENT))
    assert await collect(DecodeServer(engine)) == [refused]
    assert engine.streams[0].closed and released == [PARAMS]


async def test_empty_stream_raises(released) -> None:
    with pytest.raises(EngineStreamError, match="ended before its first chunk"):
        await collect(DecodeServer(FakeEngine(chunks())))


async def test_refused_request_is_yielded_as_a_body_and_released(released) -> None:
    refused = error_body(400, "max_tokens too large", "BadRequestError", "max_tokens")
    server = DecodeServer(FakeEngine(refused))
    assert await collect(server) == [refused]
    assert released == [PARAMS]
    assert await server.generate("completion", {"prompt": [1]}, PARAMS) == refused
    assert released == [PARAMS, PARAMS]


async def test_dead_engine_call_raises_and_releases(released) -> None:
    engine = FakeEngine(call_error=DeadEngineError("EngineCore encountered an issue"))
    engine.errored = True
    server = DecodeServer(engine)
    with pytest.raises(DeadEngineError):
        await server.generate("completion", {"prompt": [1]}, PARAMS)
    with pytest.raises(DeadEngineError):
        await collect(server)
    assert released == [PARAMS, PARAMS]
    with pytest.raises(UnhealthyError):
        await server.check_health()
    assert server.health()["healthy"] is False


async def test_no_release_without_transfer_parameters(released) -> None:
    server = DecodeServer(FakeEngine(error_body(400, "bad", "BadRequestError")))
    await collect(server, params=None)
    assert released == []
    assert "kv_transfer_params" not in server.engine.bodies[0]


async def test_client_gone_mid_stream_closes_the_engine_stream(released) -> None:
    engine = FakeEngine(chunks(CHUNK, CHUNK, CHUNK, DONE_EVENT))
    server = DecodeServer(engine)
    gen = server.generate_stream("completion", {"prompt": [1]}, PARAMS)
    assert await gen.__anext__() == CHUNK
    assert await gen.__anext__() == CHUNK
    await gen.aclose()
    assert engine.streams[0].closed and server.num_in_flight == 0


def response_event(type_: str, **data: Any) -> str:
    return f"event: {type_}\ndata: {json.dumps({'type': type_, **data})}\n\n"


OPENING = response_event("response.created") + response_event("response.in_progress") + \
    response_event("response.output_text.delta", delta="a")
DELTA = response_event("response.output_text.delta", delta="b")
COMPLETED = response_event("response.completed")


async def collect_responses(server: DecodeServer) -> list:
    return [c async for c in server.generate_stream("responses", {"input": "a"}, PARAMS)]


async def test_a_responses_stream_passes_through_without_done(released) -> None:
    server = DecodeServer(FakeEngine(chunks(OPENING, DELTA, COMPLETED)))
    assert await collect_responses(server) == [OPENING, DELTA, COMPLETED]
    assert server.health()["failures"] == {} and released == []


@pytest.mark.parametrize("die", [True, False])
async def test_a_responses_stream_that_fails_ends_with_its_own_error_event(released,
                                                                          die) -> None:
    """Killed or cut short, a Responses stream ends with the Responses API's error event; it
    has no ``[DONE]`` to send."""
    script = chunks(OPENING, DELTA, COMPLETED, die_after=2, error=DeadEngineError("gone")) \
        if die else chunks(OPENING, DELTA)
    out = await collect_responses(DecodeServer(FakeEngine(script)))
    assert out[:2] == [OPENING, DELTA] and len(out) == 3
    assert out[2].startswith("event: error\n") and DONE_EVENT not in out
    assert event_error("responses", out[2])["error"]["code"] == 500
    assert event_data(out[2])["type"] == "error"


async def test_a_responses_error_event_as_first_chunk_raises(released) -> None:
    error = response_event("error", code="500", message="boom")
    with pytest.raises(EngineStreamError, match="boom"):
        await collect_responses(DecodeServer(FakeEngine(chunks(error))))


def test_record_routing_stats_reports_both_event_endpoints() -> None:
    engine = FakeEngine()
    engine.kv_events_endpoint = "tcp://10.0.0.1:4000"
    engine.kv_events_replay_endpoint = "tcp://10.0.0.1:4001"
    stats = EngineServer(engine).record_routing_stats()
    assert stats["kv_events_endpoint"] == "tcp://10.0.0.1:4000"
    assert stats["kv_events_replay_endpoint"] == "tcp://10.0.0.1:4001"
