"""The ingress: pdserve's OpenAI-compatible HTTP front door.

For each request it checks the body, has a prefill replica compute the prompt and keep its KV
blocks, then has a decode replica load those blocks and generate, streaming the decode output
back. Replica choice happens in the handles' request routers (``router.serve_router``). A
prefill that fails or times out is not the client's problem: the decode replica then prefills
locally and the answer is only slower.

``PDRouter`` is a plain class taking its two handles; ``deploy/`` mounts its methods on a
FastAPI app (``ROUTES``) and makes it a Ray Serve deployment.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from router.openai_api import APIError, parse_body, status_of

logger = logging.getLogger(__name__)


class PDRouter:
    def __init__(self, prefill: Any, decode: Any, model_name: str, max_model_len: int,
                 prefill_timeout_s: float) -> None:
        self._prefill = prefill
        self._decode = decode
        self._model_name = model_name
        self._max_model_len = max_model_len
        self._prefill_timeout_s = prefill_timeout_s
        self._created = int(time.time())
        self.num_local_prefills = 0

    async def completions(self, request: Request) -> Response:
        return await self._serve("completion", request)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve("chat", request)

    async def models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{
            "id": self._model_name, "object": "model", "created": self._created,
            "owned_by": "pdserve", "root": self._model_name,
            "max_model_len": self._max_model_len}]})

    async def health(self) -> Response:
        return Response(status_code=200)

    async def _serve(self, kind: str, request: Request) -> Response:
        try:
            body = parse_body(await request.body(), kind, self._model_name)
        except APIError as e:
            return JSONResponse(e.body, status_code=e.status)
        kv_params = await self._run_prefill(kind, body)
        if isinstance(kv_params, Response):
            return kv_params
        if body.get("stream"):
            return await self._stream(kind, body, kv_params)
        result = await self._decode.generate.remote(kind, body, kv_params)
        return JSONResponse(result, status_code=status_of(result))

    async def _run_prefill(
        self, kind: str, body: dict[str, Any]
    ) -> dict[str, Any] | Response | None:
        """Transfer parameters, a client error to return as is, or None to prefill on decode."""
        transfer_id = uuid.uuid4().hex
        response = self._prefill.prefill.remote(kind, body, transfer_id)
        try:
            result = await asyncio.wait_for(response, self._prefill_timeout_s)
        except asyncio.CancelledError:
            response.cancel()  # the client went away: abort the prefill too
            raise
        except Exception as e:  # replica died, timed out, or the call failed
            response.cancel()
            logger.warning("prefill of %s failed (%s: %s); decode prefills locally",
                           transfer_id, type(e).__name__, e)
            self.num_local_prefills += 1
            return None
        status = status_of(result)
        if 400 <= status < 500:
            return JSONResponse(result, status_code=status)
        if status != 200 or not result.get("kv_transfer_params"):
            logger.warning("prefill of %s answered %s; decode prefills locally", transfer_id,
                           result)
            self.num_local_prefills += 1
            return None
        return result["kv_transfer_params"]

    async def _stream(self, kind: str, body: dict[str, Any],
                      kv_params: dict[str, Any] | None) -> Response:
        gen = self._decode.options(stream=True).generate_stream.remote(kind, body, kv_params)
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            return JSONResponse({"error": {"message": "empty stream", "type": "InternalError",
                                           "param": None, "code": 500}}, status_code=500)
        if isinstance(first, dict):
            return JSONResponse(first, status_code=status_of(first))

        async def sse():
            try:
                yield first
                async for chunk in gen:
                    yield chunk
            finally:
                gen.cancel()  # a client that went away must not leave the request running

        return StreamingResponse(sse(), media_type="text/event-stream")


# (HTTP method, path, PDRouter method name): what deploy/ mounts on the FastAPI app.
ROUTES = (
    ("POST", "/v1/completions", "completions"),
    ("POST", "/v1/chat/completions", "chat_completions"),
    ("GET", "/v1/models", "models"),
    ("GET", "/health", "health"),
)
