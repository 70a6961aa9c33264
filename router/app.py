"""The ingress: pdserve's OpenAI-compatible front door (completions, chat completions and the
Responses API), over HTTP and gRPC.

For each request it checks the API key, the body size and the body, tokenizes the prompt once,
and asks the ``RoutingCoordinator`` for a prefill/decode pair chosen together from what every
replica has cached (the KV index) and how loaded it is. A prefill replica computes the prompt
and keeps its KV blocks; the decode replica loads them and generates, and the router streams
its output back. Both calls are pinned to the chosen replicas (the ``pin`` keyword, honoured by
``router.serve_router``); ``router.calls`` makes them, with deadlines and retries on other
replicas. A completion with several prompts has each distinct prompt prefilled on its own
(in parallel, each on the prefill replica the policy picks for it), then all of them decoded
on one decode replica, which loads every prompt's blocks; ``n > 1`` is prefilled once and its
n sequences load it once. When the decode replica already caches most of the prompt, the
prefill pool is saturated or unhealthy, the engine makes the request's engine requests itself
(best_of > 1, beam search), or the prompt's own logprobs are asked for (which only the engine
computing the whole prompt has), the decode replica prefills locally and nothing moves; each
such request is counted by reason (``GET /routing``, Ray metrics). The client sees a slower
answer, not an error, unless no decode replica can serve it (503).

Authentication (``IngressSettings.api_key``) covers /v1/* and /routing; /health stays open so
that load balancers can probe it without a key.

``PDRouter`` is a plain class taking its two handles; ``deploy/`` mounts its methods on a
FastAPI app (``ROUTES``, then ``router.openai_api.install_openapi``) and makes it a Ray Serve
deployment. Its gRPC methods (``router.grpc_api.service.GrpcIngress``), which Ray Serve's gRPC
proxy calls, turn each message into the same OpenAI body and go through ``route_body`` too.
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
from fastapi.responses import JSONResponse, Response

from kvtransfer.params import batch_params
from kvtransfer.release import claim_transfer, release_transfer
from router.calls import CallLimits, ReplicaCalls
from router.coordinator import CoordinatorSettings, get_coordinator
from router.grpc_api.service import GrpcIngress
from router.openai_api import (
    APIError,
    check_api_key,
    check_chat_template,
    check_token_ids,
    has_several_prompts,
    local_prefill_reason,
    parse_body,
    read_body,
)
from router.tokenizing import PromptTokenizer

logger = logging.getLogger(__name__)
REFRESH_S = 2.0
# Distinct prompts of one request that are prefilled apart (in parallel); a request with more is
# prefilled on its decode replica (each engine request carries every prompt's parameters).
MAX_TRANSFER_PROMPTS = 64


@dataclasses.dataclass(frozen=True)
class IngressSettings:
    """The ingress's own settings (``cluster.config.RouterConfig.ingress_settings()``)."""

    api_key: str | None = dataclasses.field(default=None, repr=False)
    max_request_bytes: int = 8 * 1024 * 1024
    allow_request_chat_template: bool = False
    decode_timeout_s: float = 600.0
    decode_first_token_timeout_s: float = 120.0
    decode_retries: int = 1


class PDRouter(GrpcIngress):
    def __init__(self, prefill: Any, decode: Any, model_name: str, model_path: str,
                 max_model_len: int, prefill_timeout_s: float, prefill_retries: int,
                 coordinator: dict[str, Any], ingress: dict[str, Any] | None = None,
                 engine_flags: list[str] | None = None) -> None:
        """``engine_flags``: the decode engines' vLLM flags, which the router's chat renderer
        follows (``cluster.engine.renderer_flags``; by default the model's defaults)."""
        self.settings = IngressSettings(**(ingress or {}))
        self._prefill = prefill
        self._decode = decode
        self.model_name = model_name
        self._max_model_len = max_model_len
        self._tokenizer = PromptTokenizer(model_path, engine_flags)
        self.coordinator = get_coordinator(CoordinatorSettings(**coordinator))
        s = self.settings
        self.calls = ReplicaCalls(prefill, decode, self.coordinator, CallLimits(
            prefill_timeout_s, prefill_retries, s.decode_timeout_s,
            s.decode_first_token_timeout_s, s.decode_retries))
        self._created = int(time.time())
        self._refresher: asyncio.Task | None = None

    async def completions(self, request: Request) -> Response:
        return await self._serve("completion", request)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve("chat", request)

    async def responses(self, request: Request) -> Response:
        return await self._serve("responses", request)

    async def models(self, request: Request) -> JSONResponse:
        try:
            check_api_key(request.headers, self.settings.api_key)
        except APIError as e:
            return e.response()
        return JSONResponse(self.model_list())

    async def model(self, request: Request) -> JSONResponse:
        """One model's card (the OpenAI API's model retrieval), or a 404."""
        try:
            check_api_key(request.headers, self.settings.api_key)
            model_id = request.path_params["model_id"]
            if model_id != self.model_name:
                raise APIError(404, f"The model `{model_id}` does not exist.", "NotFoundError",
                               "model")
        except APIError as e:
            return e.response()
        return JSONResponse(self.model_list()["data"][0])

    def model_list(self) -> dict[str, Any]:
        """The OpenAI model list: the one model this app serves."""
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self._created,
            "owned_by": "pdserve", "root": self.model_name,
            "max_model_len": self._max_model_len}]}

    async def health(self) -> Response:
        """Open to everyone (no API key): load balancers probe it."""
        return Response(status_code=200)

    async def routing_state(self, request: Request) -> JSONResponse:
        """What the router knows: replicas, their load, the KV index, the fallbacks it took
        (for operators and tests)."""
        try:
            check_api_key(request.headers, self.settings.api_key)
        except APIError as e:
            return e.response()
        c = self.coordinator
        with c.lock:
            index = dataclasses.asdict(c.index.stats())
        return JSONResponse({
            "replicas": {role: {rid: dataclasses.asdict(load)
                                for rid, load in c.replicas(role).items()}
                         for role in ("prefill", "decode")},
            "event_fed": sorted(c.events.subscribed()), "index": index,
            "num_events": c.events.num_events, "kv_events": c.events.stats(),
            **c.fallbacks()})

    async def _serve(self, kind: str, request: Request) -> Response:
        arrival_s = time.monotonic()  # client-side latencies count from here
        s = self.settings
        try:
            check_api_key(request.headers, s.api_key)
            body = parse_body(await read_body(request, s.max_request_bytes), kind,
                              self.model_name)
        except APIError as e:
            return e.response()
        return await self.route_body(kind, body, arrival_s)

    async def route_body(self, kind: str, body: dict[str, Any], arrival_s: float) -> Response:
        """Answer a request whose body vLLM's request model parsed (``validate_body``), from
        HTTP or gRPC (``router.grpc_api``): content checks, tokenizing, the pair, the calls.
        ``arrival_s``: when it arrived (``time.monotonic``)."""
        self._start_refreshing()
        try:
            self._check_content(kind, body)
        except APIError as e:
            return e.response()
        reason = local_prefill_reason(kind, body)
        if reason is not None:
            return await self._prefill_on_decode(kind, body, arrival_s, reason)
        if has_several_prompts(kind, body):
            prompts = await asyncio.to_thread(self._tokenizer.prompts_ids, body)
            if prompts is None:
                return await self._prefill_on_decode(kind, body, arrival_s, "batch")
            return await self._route_prompts(body, prompts, arrival_s)
        if kind == "completion":
            token_ids = await asyncio.to_thread(self._tokenizer.token_ids, body)
            if token_ids is not None and not body.get("echo"):
                body["prompt"] = token_ids  # the engines do not tokenize again
        elif kind == "chat":
            token_ids = await self._tokenizer.chat_ids(body)
        else:
            token_ids = await self._tokenizer.responses_ids(body)
            if token_ids is None:  # its prefill would need the Responses API and its store
                return await self._prefill_on_decode(kind, body, arrival_s, "unrendered")
        ctx = self.coordinator.context(uuid.uuid4().hex, token_ids)
        choice = self.coordinator.choose(ctx)
        kv_params = None
        used: list[str] = []
        if choice is None or not choice.is_local_prefill:
            prefill_body = {k: v for k, v in body.items() if k != "n"} if token_ids is None \
                else {"model": body.get("model"), "prompt": token_ids}  # only tokens needed
            try:
                kv_params = await self.calls.prefill(
                    "completion" if token_ids is not None else kind, prefill_body, ctx,
                    choice.prefill.replica_id if choice else None, used, arrival_s=arrival_s)
            except BaseException:  # the client went away: nothing more goes to decode
                self.coordinator.done(ctx, used)
                raise
            if isinstance(kv_params, Response):
                self.coordinator.done(ctx, used)
                return kv_params
            if kind != "completion" and kv_params is not None and token_ids is not None:
                # The decode engine takes the rendered prompt too (vLLM's token reuse).
                kv_params = {**kv_params, "prompt_token_ids": token_ids}
        return await self.calls.decode(kind, body, kv_params, ctx,
                                       choice.decode.replica_id if choice else None, used,
                                       arrival_s=arrival_s)

    async def _prefill_on_decode(self, kind: str, body: dict[str, Any], arrival_s: float,
                                 reason: str) -> Response:
        """A request only its decode engine can prefill (``local_prefill_reason``)."""
        ctx = self.coordinator.context(uuid.uuid4().hex, None)
        decode = self.coordinator.choose_decode(ctx)
        self.coordinator.count_local_prefill(reason)
        return await self.calls.decode(kind, body, None, ctx,
                                       decode.replica_id if decode else None, [],
                                       arrival_s=arrival_s)

    async def _route_prompts(self, body: dict[str, Any], prompts: list[list[int]],
                             arrival_s: float) -> Response:
        """A completion with several prompts: one decode replica for the request, one prefill
        (and one transfer) per distinct prompt, all in parallel. Each transfer is claimed as
        its prefill ends, so its blocks outlast the wait for the others; if the request ends
        before the decode call (the client left), they are released at once; after it, only the
        decode side releases them (a decode replica that timed out may still be reading them),
        and a request no decode replica took leaves them to ``claim_lease_s``. A prompt whose
        prefill found no replica or failed everywhere has no transfer and is computed by the
        decode engine (counted); one a prefill engine refused (4xx) too, and the decode engine
        then answers the request's error itself, releasing the other prompts' blocks. More than
        ``MAX_TRANSFER_PROMPTS`` distinct prompts are prefilled on decode."""
        distinct = [list(ids) for ids in dict.fromkeys(map(tuple, prompts))]
        if len(distinct) > MAX_TRANSFER_PROMPTS:
            return await self._prefill_on_decode("completion", body, arrival_s, "batch")
        ctx = self.coordinator.context(uuid.uuid4().hex, None)
        ctx.num_prompt_tokens = sum(map(len, prompts))
        decode = self.coordinator.choose_decode(ctx)
        if not body.get("echo"):  # an echo returns the prompts as sent
            body["prompt"] = prompts  # the engines do not tokenize again
        sent_s = time.monotonic()
        tasks = [asyncio.ensure_future(self._prefill_prompt(body.get("model"), ids, arrival_s,
                                                            decode is not None))
                 for ids in distinct]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # a prefill may still end (and claim) after its cancel
                task.cancel()
                task.add_done_callback(_release_result)
            self.coordinator.done(ctx, [])
            raise
        entries = [params for params in results if params is not None]
        self.calls.prefilled_apart(ctx, arrival_s, sent_s, time.monotonic(),
                                   fell_back=not entries)
        return await self.calls.decode("completion", body,
                                       batch_params(entries) if entries else None, ctx,
                                       decode.replica_id if decode else None, [],
                                       arrival_s=arrival_s)

    async def _prefill_prompt(self, model: Any, ids: list[int], arrival_s: float,
                              replicas_known: bool) -> dict[str, Any] | None:
        """One prompt of several on the prefill replica its policy picks: its transfer
        parameters (claimed), or None: no replica or every one failed (counted), or refused.
        Until the router knows any replica (``replicas_known``: it knows a decode one) Ray
        Serve picks the prefill replica, as for a single prompt."""
        ctx = self.coordinator.context(uuid.uuid4().hex, ids)
        choice = self.coordinator.choose_prefill(ctx)
        if choice is None and replicas_known:
            self.coordinator.count_local_prefill("no_prefill_replica")
            return None
        self.coordinator.metrics.decision("transfer")
        used: list[str] = []
        try:
            params = await self.calls.prefill("completion", {"model": model, "prompt": ids},
                                              ctx, choice.replica_id if choice else None,
                                              used, arrival_s=arrival_s)
        finally:
            self.coordinator.done(ctx, used)
        if not isinstance(params, dict):
            return None
        try:
            claim_transfer(params)
        except Exception as e:  # the transfer keeps its first lease (lease_s)
            logger.warning("cannot claim a prefilled prompt's transfer: %s", e)
        return params

    def _check_content(self, kind: str, body: dict[str, Any]) -> None:
        """What vLLM's request model lets through but this server refuses (400)."""
        if kind == "completion":
            check_token_ids(body, self._tokenizer.vocab_size)
        else:
            check_chat_template(body, self.settings.allow_request_chat_template)

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


def _release_result(task: asyncio.Future) -> None:
    """Release the transfer a finished prompt's prefill task returned, if any."""
    if not task.cancelled() and task.exception() is None and task.result() is not None:
        release_transfer(task.result())


# (HTTP method, path, PDRouter method name): what deploy/ mounts on the FastAPI app.
ROUTES = (
    ("POST", "/v1/completions", "completions"),
    ("POST", "/v1/chat/completions", "chat_completions"),
    ("POST", "/v1/responses", "responses"),
    ("GET", "/v1/models", "models"),
    ("GET", "/v1/models/{model_id:path}", "model"),
    ("GET", "/health", "health"),
    ("GET", "/routing", "routing_state"),
)
