"""gRPC messages to OpenAI request bodies and back, and HTTP statuses to gRPC status codes.

A request message becomes the OpenAI JSON body the HTTP route would have received: only the
fields the client set, under their OpenAI names, plus the keys of ``extra``. From there on both
front doors share everything (``router.openai_api`` checks, routing, the engines). Each answer
(a JSON body, or one streamed event) becomes its response message; fields the message does not
carry (vLLM's ``stop_reason``, ``kv_transfer_params``, ...) are left out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from router.grpc_api import pdserve_pb2 as pb
from router.openai_api import APIError

# The OpenAI status of an answer -> the gRPC status code the client gets. Other 4xx answers are
# INVALID_ARGUMENT, other 5xx INTERNAL.
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# Fields of request messages that are not OpenAI fields of the same name.
_RESHAPED = frozenset({"prompt", "prompts", "prompt_token_ids", "prompts_token_ids", "sampling",
                       "messages", "extra"})


def status_code(status: int) -> grpc.StatusCode:
    """The gRPC status code for an OpenAI answer's HTTP status."""
    if status in STATUS_CODES:
        return STATUS_CODES[status]
    return grpc.StatusCode.INVALID_ARGUMENT if status < 500 else grpc.StatusCode.INTERNAL


def completion_body(request: pb.CompletionRequest) -> dict[str, Any]:
    """The OpenAI ``/v1/completions`` body ``request`` stands for (``stream`` not set)."""
    body = _set_fields(request)
    kind = request.WhichOneof("prompt_kind")
    if kind == "prompt":
        body["prompt"] = request.prompt
    elif kind == "prompts":
        body["prompt"] = list(request.prompts.texts)
    elif kind == "prompt_token_ids":
        body["prompt"] = list(request.prompt_token_ids.ids)
    elif kind == "prompts_token_ids":
        body["prompt"] = [list(p.ids) for p in request.prompts_token_ids.prompts]
    body.update(_set_fields(request.sampling))
    return _with_extra(body, request.extra, "request")


def chat_body(request: pb.ChatCompletionRequest) -> dict[str, Any]:
    """The OpenAI ``/v1/chat/completions`` body ``request`` stands for (``stream`` not set)."""
    body = _set_fields(request)
    body["messages"] = [_with_extra(_set_fields(m), m.extra, f"messages[{i}]")
                        for i, m in enumerate(request.messages)]
    body.update(_set_fields(request.sampling))
    return _with_extra(body, request.extra, "request")


def _set_fields(message: Message) -> dict[str, Any]:
    """The fields of ``message`` that the client set, by name, as plain Python values."""
    return {field.name: list(value) if _is_repeated(field) else value
            for field, value in message.ListFields() if field.name not in _RESHAPED}


def _is_repeated(field: Any) -> bool:
    # protobuf >= 5.28 spells it ``is_repeated``; older runtimes only have ``label``.
    is_repeated = getattr(field, "is_repeated", None)
    return bool(is_repeated) if is_repeated is not None else field.label == field.LABEL_REPEATED


def _with_extra(body: dict[str, Any], extra: Any, where: str) -> dict[str, Any]:
    """``body`` with the keys of the ``extra`` Struct; a key a typed field already set is the
    client's error (it would be ambiguous which one counts)."""
    more = json_format.MessageToDict(extra) if extra.ListFields() else {}
    clash = sorted(set(more) & set(body))
    if clash:
        raise APIError(400, f"{where}: {', '.join(clash)} set both as a field and in `extra`",
                       param=clash[0])
    if "stream" in more:
        raise APIError(400, "stream is chosen by the method called (Completion or "
                       "StreamCompletion), not by `extra`", param="stream")
    return {**body, **more}


def to_message(data: dict[str, Any], message_type: type[Message]) -> Message:
    """An OpenAI response object (or streamed chunk) as ``message_type``."""
    return json_format.ParseDict(data, message_type(), ignore_unknown_fields=True)


def model_list(data: dict[str, Any]) -> pb.ListModelsResponse:
    return to_message(data, pb.ListModelsResponse)  # type: ignore[return-value]


def sse_events(text: str) -> Iterator[str]:
    """The ``data:`` payloads in a piece of a server-sent event stream."""
    for line in text.splitlines():
        if line.startswith("data:"):
            yield line[len("data:"):].strip()


def parse_event(payload: str) -> dict[str, Any] | None:
    """One event's JSON object; ``None`` for ``[DONE]``."""
    if payload == "[DONE]":
        return None
    return json.loads(payload)
