"""The server-sent events of the OpenAI streams pdserve relays, in each API's own dialect.

A request's ``kind`` names its API: ``completion`` and ``chat`` stream ``data: {json}`` events
and end with ``data: [DONE]``; an error is ``data: {"error": {...}}``. ``responses`` (the
Responses API) streams typed events (``event: <type>`` then ``data: {json}``), ends with
``response.completed``, ``response.incomplete`` or ``response.failed``, has no ``[DONE]``, and
an error is an ``error`` event (``{"type": "error", "code": ..., "message": ...}``).

The decode server and the router read streams through these functions only, so each knows
when a stream ended well, when it carried an error, and how to end one that failed, whatever
its API.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

# The last server-sent event of a completion or chat stream.
DONE_EVENT = "data: [DONE]\n\n"
# The events that end a Responses stream.
RESPONSE_END_TYPES = frozenset({"response.completed", "response.incomplete", "response.failed"})
# The events a Responses stream opens with, before its engine has produced anything.
RESPONSE_OPENING_TYPES = frozenset({"response.created", "response.in_progress"})


def error_body(status: int, message: str, type_: str, param: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error body, as vLLM's server writes it (the status in ``code``)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def error_event(status: int, message: str, type_: str, kind: str = "completion") -> str:
    """An OpenAI-style error as a server-sent event of ``kind``'s stream."""
    if kind == "responses":
        data = {"type": "error", "code": str(status), "message": message, "param": None,
                "sequence_number": 0}
        return f"event: error\ndata: {json.dumps(data)}\n\n"
    return f"data: {json.dumps(error_body(status, message, type_))}\n\n"


def closing_events(kind: str) -> list[str]:
    """What ends a stream of ``kind`` after an error event."""
    return [] if kind == "responses" else [DONE_EVENT]


def failed_stream_end(status: int, message: str, type_: str, kind: str) -> list[str]:
    """The last events of a ``kind`` stream that failed: its error event, then its end."""
    return [error_event(status, message, type_, kind), *closing_events(kind)]


def event_data(chunk: Any) -> dict[str, Any] | None:
    """The JSON object the last event of a chunk of server-sent events carries (its ``data:``
    line), or None (``[DONE]``, not an event, not an object)."""
    if not isinstance(chunk, str):
        return None
    events = [e for e in chunk.split("\n\n") if e.strip()]
    lines = [line for line in (events[-1] if events else "").split("\n")
             if line.startswith("data:")]
    if not lines:
        return None
    payload = lines[0][len("data:"):].strip()
    if not payload.startswith("{"):
        return None
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def event_error(kind: str, chunk: Any) -> dict[str, Any] | None:
    """The error a chunk of ``kind``'s stream carries, as an OpenAI error body (its status in
    ``code``), or None."""
    if not isinstance(chunk, str):
        return None
    if kind == "responses":
        if "event: error" not in chunk:
            return None
        data = event_data(chunk) or {}
        code = data.get("code")
        status = int(code) if isinstance(code, (int, str)) and str(code).isdigit() else 500
        return error_body(status if 400 <= status < 600 else 500,
                          str(data.get("message", "the engine failed")), "InternalServerError")
    if not chunk.startswith("data:") or '"error"' not in chunk[:24]:
        return None
    data = event_data(chunk)
    if data is None or "choices" in data or not isinstance(data.get("error"), dict):
        return None
    return data


def ends_stream(kind: str, chunk: Any) -> bool:
    """Whether ``chunk`` is the last event of a stream of ``kind`` (after an error event, a
    Responses stream has nothing more to send)."""
    if kind != "responses":
        return chunk == DONE_EVENT
    return isinstance(chunk, str) and any(f"event: {t}\n" in chunk
                                          for t in (*RESPONSE_END_TYPES, "error"))


def carries_output(kind: str, chunk: Any) -> bool:
    """Whether ``chunk`` carries generated output (what inter-token latencies time)."""
    if kind != "responses":
        return isinstance(chunk, str) and not chunk.startswith(DONE_EVENT.strip())
    return isinstance(chunk, str) and ".delta\n" in chunk


def responses_events(events: AsyncIterator[Any]) -> AsyncIterator[str]:
    """vLLM's Responses stream (pydantic events) as server-sent events, the way vLLM's server
    writes them. The opening events (``response.created``, ``response.in_progress``) go out
    with the first event after them, which comes once the engine produced output: a stream's
    first chunk means, as for the other APIs, that the engine took the request and ran it."""

    async def sse() -> AsyncIterator[str]:
        held = ""
        try:
            async for event in events:
                kind = getattr(event, "type", "unknown")
                text = (f"event: {kind}\ndata: "
                        f"{event.model_dump_json(indent=None, by_alias=True)}\n\n")
                if kind in RESPONSE_OPENING_TYPES:
                    held += text
                    continue
                yield held + text
                held = ""
            if held:
                yield held
        finally:
            await events.aclose()

    return sse()
