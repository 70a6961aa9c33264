"""Each OpenAI API's stream dialect (cluster/sse.py): how a stream ends, what an error event
looks like, and vLLM's Responses events turned into server-sent events."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cluster.sse import (
    DONE_EVENT,
    carries_output,
    closing_events,
    ends_stream,
    error_event,
    event_data,
    event_error,
    failed_stream_end,
    responses_events,
)

CHAT_CHUNK = 'data: {"id": "c", "choices": [{"delta": {"content": "data: {\\"error\\""}}]}\n\n'


def response_event(type_: str, **data: Any) -> str:
    return f"event: {type_}\ndata: {json.dumps({'type': type_, **data})}\n\n"


def test_completion_error_events_are_found_and_nothing_else() -> None:
    event = error_event(500, "engine boom", "InternalServerError")
    assert event_error("chat", event) == {"error": {
        "message": "engine boom", "type": "InternalServerError", "param": None, "code": 500}}
    for chunk in (CHAT_CHUNK, DONE_EVENT, "data: {not json", 'data: {"error": 1}\n\n', None, {},
                  response_event("error", code="500", message="x")):
        assert event_error("completion", chunk) is None


def test_responses_error_events_carry_their_status() -> None:
    event = error_event(503, "replica gone", "ServiceUnavailableError", "responses")
    assert event.startswith("event: error\n")
    assert event_data(event) == {"type": "error", "code": "503", "message": "replica gone",
                                 "param": None, "sequence_number": 0}
    assert event_error("responses", event)["error"]["code"] == 503
    # A code that is no HTTP status (the API's own "server_error") is a 500.
    other = response_event("error", code="server_error", message="x")
    assert event_error("responses", other)["error"]["code"] == 500
    for chunk in (response_event("response.output_text.delta", delta="error"), CHAT_CHUNK,
                  error_event(500, "x", "X")):
        assert event_error("responses", chunk) is None


@pytest.mark.parametrize(("kind", "chunk", "ends"), [
    ("completion", DONE_EVENT, True),
    ("chat", CHAT_CHUNK, False),
    ("chat", response_event("response.completed"), False),
    ("responses", response_event("response.completed"), True),
    ("responses", response_event("response.incomplete"), True),
    ("responses", response_event("response.failed"), True),
    ("responses", response_event("error", code="500"), True),
    ("responses", response_event("response.output_text.delta", delta="response.completed"),
     False),
    ("responses", DONE_EVENT, False),
])
def test_how_each_stream_ends(kind, chunk, ends) -> None:
    assert ends_stream(kind, chunk) is ends


def test_closing_events_and_output() -> None:
    assert closing_events("chat") == [DONE_EVENT] and closing_events("responses") == []
    assert failed_stream_end(503, "gone", "X", "chat") == [error_event(503, "gone", "X"),
                                                           DONE_EVENT]
    assert failed_stream_end(503, "gone", "X", "responses") == [
        error_event(503, "gone", "X", "responses")]
    assert carries_output("chat", CHAT_CHUNK) and not carries_output("chat", DONE_EVENT)
    assert carries_output("responses", response_event("response.output_text.delta", delta="a"))
    assert not carries_output("responses", response_event("response.output_item.added"))


async def test_responses_events_open_with_the_first_output() -> None:
    """The opening events go out with the first event the engine's output made, so a stream's
    first chunk means the engine ran the request, as for the other APIs."""
    from openai.types.responses import ResponseTextDeltaEvent
    from vllm import SamplingParams
    from vllm.entrypoints.openai.responses.protocol import (
        ResponseCompletedEvent,
        ResponseCreatedEvent,
        ResponseInProgressEvent,
        ResponsesRequest,
        ResponsesResponse,
    )

    response = ResponsesResponse.from_request(
        ResponsesRequest(input="a"), SamplingParams(), model_name="m", created_time=0,
        output=[], status="in_progress", usage=None).model_dump(mode="json", by_alias=True)
    events = [
        ResponseCreatedEvent(type="response.created", sequence_number=0, response=response),
        ResponseInProgressEvent(type="response.in_progress", sequence_number=1,
                                response=response),
        ResponseTextDeltaEvent(type="response.output_text.delta", sequence_number=2,
                               item_id="m1", output_index=0, content_index=0, delta="hi",
                               logprobs=[]),
        ResponseCompletedEvent(type="response.completed", sequence_number=3,
                               response={**response, "status": "completed"}),
    ]
    closed = []

    async def source():
        try:
            for event in events:
                yield event
        finally:
            closed.append(True)

    out = [chunk async for chunk in responses_events(source())]
    assert len(out) == 2
    assert [line.split("\n")[0] for line in out[0].split("\n\n") if line] == [
        "event: response.created", "event: response.in_progress",
        "event: response.output_text.delta"]
    assert event_data(out[0])["delta"] == "hi" and ends_stream("responses", out[1])
    assert event_data(out[1])["response"]["status"] == "completed" and closed == [True]
