"""The ingress's gRPC methods (``pdserve.v1.PDServe`` in pdserve.proto).

Ray Serve's gRPC proxy calls the ingress method named like the RPC with the request message and
``grpc_context`` (Ray's ``RayServegRPCContext``). Each method turns the message into the OpenAI
body the HTTP route would have received (``router.grpc_api.convert``) and hands it to the same
checks and the same routing, then turns the answer back into messages.

Errors: an answer with a 4xx/5xx status becomes that status's gRPC code
(``convert.status_code``) with the OpenAI error message as details. A unary call sets them on
the context and returns an empty message (Ray's documented way); a streaming call raises
``GrpcError`` after setting them, before or after its first message, so the stream ends with
that status. A client that cancels a stream closes the relayed decode stream (every generator
on the way is closed at once, ``contextlib.aclosing``), which cancels the decode call: the
engine aborts the request and frees its blocks, as when an HTTP client leaves.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from cluster.engine import is_error
from router.grpc_api import convert
from router.grpc_api import pdserve_pb2 as pb
from router.openai_api import APIError, check_api_key, check_size, status_of, validate_body

if TYPE_CHECKING:
    from fastapi.responses import Response
    from google.protobuf.message import Message

ToBody = Callable[[Any], dict[str, Any]]


class GrpcError(Exception):
    """Ends a gRPC call with the status code already set on its context."""


def _metadata(grpc_context: Any) -> dict[str, str]:
    return {key.lower(): value for key, value in grpc_context.invocation_metadata()
            if isinstance(value, str)}


def _fail(grpc_context: Any, status: int, data: Any) -> None:
    grpc_context.set_code(convert.status_code(status))
    error = data.get("error") if isinstance(data, dict) else None
    grpc_context.set_details(str(error.get("message")) if isinstance(error, dict) else
                             f"failed with status {status}")


class GrpcIngress:
    """gRPC methods for an ingress class that provides ``settings``
    (``router.app.IngressSettings``), ``model_name``, ``model_list()`` (the OpenAI model list) and
    ``route_body(kind, body, arrival_s)`` (routes a checked body, returns the HTTP response)."""

    async def Completion(self, request: pb.CompletionRequest,  # noqa: N802 (the RPC's name)
                         grpc_context: Any) -> Message:
        return await self._unary("completion", convert.completion_body, request,
                                 pb.CompletionResponse, grpc_context)

    async def StreamCompletion(self, request: pb.CompletionRequest,  # noqa: N802
                               grpc_context: Any) -> AsyncIterator[Message]:
        async with contextlib.aclosing(self._streamed(
                "completion", convert.completion_body, request, pb.CompletionResponse,
                grpc_context)) as messages:
            async for message in messages:
                yield message

    async def ChatCompletion(self, request: pb.ChatCompletionRequest,  # noqa: N802
                             grpc_context: Any) -> Message:
        return await self._unary("chat", convert.chat_body, request, pb.ChatCompletionResponse,
                                 grpc_context)

    async def StreamChatCompletion(self, request: pb.ChatCompletionRequest,  # noqa: N802
                                   grpc_context: Any) -> AsyncIterator[Message]:
        async with contextlib.aclosing(self._streamed(
                "chat", convert.chat_body, request, pb.ChatCompletionChunk,
                grpc_context)) as messages:
            async for message in messages:
                yield message

    async def ListModels(self, request: pb.ListModelsRequest,  # noqa: N802
                         grpc_context: Any) -> Message:
        try:
            check_api_key(_metadata(grpc_context), self.settings.api_key)
        except APIError as e:
            _fail(grpc_context, e.status, e.body)
            return pb.ListModelsResponse()
        return convert.to_message(self.model_list(), pb.ListModelsResponse)

    async def _route(self, kind: str, to_body: ToBody, request: Message, grpc_context: Any,
                     stream: bool) -> Response:
        arrival_s = time.monotonic()
        s = self.settings
        try:
            check_api_key(_metadata(grpc_context), s.api_key)
            check_size(request.ByteSize(), s.max_request_bytes)
            body = validate_body({**to_body(request), "stream": stream}, kind, self.model_name)
        except APIError as e:
            return e.response()
        return await self.route_body(kind, body, arrival_s)

    async def _unary(self, kind: str, to_body: ToBody, request: Message,
                     message_type: type[Message], grpc_context: Any) -> Message:
        response = await self._route(kind, to_body, request, grpc_context, stream=False)
        data = json.loads(response.body)
        if response.status_code >= 400:
            _fail(grpc_context, response.status_code, data)
            return message_type()
        return convert.to_message(data, message_type)

    async def _streamed(self, kind: str, to_body: ToBody, request: Message,
                        message_type: type[Message],
                        grpc_context: Any) -> AsyncIterator[Message]:
        response = await self._route(kind, to_body, request, grpc_context, stream=True)
        events = getattr(response, "body_iterator", None)
        if events is None:  # refused before any token: an error body
            data = json.loads(response.body)
            _fail(grpc_context, response.status_code, data)
            raise GrpcError(grpc_context.details())
        try:
            async for piece in events:
                text = piece.decode() if isinstance(piece, bytes) else piece
                for payload in convert.sse_events(text):
                    data = convert.parse_event(payload)
                    if data is None:  # [DONE]: the relay ends next, and times the request
                        continue
                    if is_error(data):  # failed mid-stream
                        _fail(grpc_context, status_of(data), data)
                        raise GrpcError(grpc_context.details())
                    yield convert.to_message(data, message_type)
        finally:
            await events.aclose()  # a cancelled call stops the decode stream too
