"""The ingress: pdserve's OpenAI-compatible HTTP front door.

For each request it checks the body, tokenizes the prompt once, and asks the
``RoutingCoordinator`` for a prefill/decode pair chosen together from what every replica has
cached (the KV index) and how loaded it is. A prefill replica computes the prompt and keeps its
KV blocks; the decode replica loads them and generates, and the router streams its output back.
Both calls are pinned to the chosen replicas (the ``pin`` keyword, honoured by
``router.serve_router``). When the decode replica already caches most of the prompt, or the
prefill pool is saturated, the decode replica prefills locally and nothing moves. A prefill
that fails or times out is retried on another prefill replica, then done locally: the client
sees a slower answer, not an error.

``PDRouter`` is a plain class taking its two handles; ``deploy/`` mounts its methods on a
FastAPI app (``ROUTES``) and makes it a Ray Serve deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from router.coordinator import CoordinatorSettings, get_coordinator
from router.openai_api import APIError, parse_body, status_of
from router.policy import RoutingContext
from router.tokenizing import PromptTokenizer

logger = logging.getLogger(__name__)
REFRESH_S = 2.0


class PDRouter:
    def __init__(self, prefill: Any, decode: Any, model_name: str, model_path: str,
                 max_model_len: int, prefill_timeout_s: float, prefill_retries: int,
                 coordinator: dict[str, Any]) -> None:
        self._prefill = prefill
        self._decode = decode
        self._model_name = model_name
        self._max_model_len = max_model_len
        self._prefill_timeout_s = prefill_timeout_s
        self._prefill_retries = prefill_retries
        self._tokenizer = PromptTokenizer(model_path)
        self.coordinator = get_coordinator(CoordinatorSettings(**coordinator))
        self._created = int(time.time())
        self._refresher: asyncio.Task | None = None

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

    async def routing_state(self) -> JSONResponse:
        """What the router knows: replicas, their load, the KV index (for operators and tests)."""
        c = self.coordinator
        with c.lock:
            index = dataclasses.asdict(c.index.stats())
        return JSONResponse({
            "replicas": {role: {cand.replica_id: dataclasses.asdict(cand.load)
                                for cand in c.candidates(role)} for role in ("prefill", "decode")},
            "event_fed": sorted(c.events.subscribed()), "index": index,
            "num_events": c.events.num_events, "num_local_prefills": c.num_local_prefills})

    async def _serve(self, kind: str, request: Request) -> Response:
        self._start_refreshing()
        try:
            body = parse_body(await request.body(), kind, self._model_name)
        except APIError as e:
            return JSONResponse(e.body, status_code=e.status)
        token_ids = await asyncio.to_thread(self._tokenizer.token_ids, kind, body)
        if kind == "completion" and token_ids is not None:
            body["prompt"] = token_ids  # the engines do not tokenize again
        ctx = self.coordinator.context(uuid.uuid4().hex, token_ids)
        choice = self.coordinator.choose(ctx)
        decode_pin = choice.decode.replica_id if choice else None
        used = [decode_pin] if decode_pin else []
        kv_params = None
        if choice is None or not choice.is_local_prefill:
            prefill_pin = choice.prefill.replica_id if choice else None
            kv_params = await self._run_prefill(kind, body, token_ids, ctx, prefill_pin, used)
            if isinstance(kv_params, Response):
                return kv_params
        if body.get("stream"):
            return await self._stream(kind, body, kv_params, decode_pin, ctx, used)
        try:
            result = await self._decode.generate.remote(kind, body, kv_params, pin=decode_pin)
        finally:
            self.coordinator.done(ctx, used)
        return JSONResponse(result, status_code=status_of(result))

    async def _run_prefill(self, kind: str, body: dict[str, Any], token_ids: list[int] | None,
                           ctx: RoutingContext, pin: str | None, used: list[str]
                           ) -> dict[str, Any] | Response | None:
        """Transfer parameters, a client error to return as is, or None to prefill on decode."""
        if token_ids is not None:  # prefill only needs the prompt's tokens
            kind, body = "completion", {"model": body.get("model"), "prompt": token_ids}
        for _ in range(1 + self._prefill_retries):
            result = await self._prefill_once(kind, body, pin)
            if isinstance(result, Response):
                return result
            if result is not None:
                if pin is not None:
                    used.append(pin)
                return result
            if pin is not None:
                self.coordinator.mark_failed(pin)
            retry = self.coordinator.choose_prefill(ctx)
            if retry is None:
                break
            pin = retry.replica_id
        self.coordinator.count_local_prefill()
        return None

    async def _prefill_once(self, kind: str, body: dict[str, Any],
                            pin: str | None) -> dict[str, Any] | Response | None:
        transfer_id = uuid.uuid4().hex
        response = self._prefill.prefill.remote(kind, body, transfer_id, pin=pin)
        try:
            result = await asyncio.wait_for(response, self._prefill_timeout_s)
        except asyncio.CancelledError:
            response.cancel()  # the client went away: abort the prefill too
            raise
        except Exception as e:  # replica died, timed out, or the call failed
            response.cancel()
            logger.warning("prefill %s on %s failed (%s: %s)", transfer_id, pin,
                           type(e).__name__, e)
            return None
        status = status_of(result)
        if 400 <= status < 500:
            return JSONResponse(result, status_code=status)
        if status != 200 or not result.get("kv_transfer_params"):
            logger.warning("prefill %s on %s answered %s", transfer_id, pin, result)
            return None
        return result["kv_transfer_params"]

    async def _stream(self, kind: str, body: dict[str, Any], kv_params: dict[str, Any] | None,
                      pin: str | None, ctx: RoutingContext, used: list[str]) -> Response:
        gen = self._decode.options(stream=True).generate_stream.remote(
            kind, body, kv_params, pin=pin)
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            self.coordinator.done(ctx, used)
            return JSONResponse({"error": {"message": "empty stream", "type": "InternalError",
                                           "param": None, "code": 500}}, status_code=500)
        if isinstance(first, dict):
            self.coordinator.done(ctx, used)
            return JSONResponse(first, status_code=status_of(first))

        async def sse():
            try:
                yield first
                async for chunk in gen:
                    yield chunk
            finally:
                gen.cancel()  # a client that went away must not leave the request running
                self.coordinator.done(ctx, used)

        return StreamingResponse(sse(), media_type="text/event-stream")

    def _start_refreshing(self) -> None:
        """Keep the coordinator's replica view fresh while idle: a cheap call through each
        handle makes its request router report the pool's replicas and their load."""
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        while True:
            for handle in (self._prefill, self._decode):
                with contextlib.suppress(Exception):  # a stalled replica must not stop this
                    await asyncio.wait_for(handle.record_routing_stats.remote(), REFRESH_S)
            await asyncio.sleep(REFRESH_S)


# (HTTP method, path, PDRouter method name): what deploy/ mounts on the FastAPI app.
ROUTES = (
    ("POST", "/v1/completions", "completions"),
    ("POST", "/v1/chat/completions", "chat_completions"),
    ("GET", "/v1/models", "models"),
    ("GET", "/health", "health"),
    ("GET", "/routing", "routing_state"),
)
