"""The ingress's calls to the prefill and decode replicas, with deadlines and retries.

``ReplicaCalls.prefill`` runs the prompt on a prefill replica and returns its transfer
parameters. A replica that fails, times out or answers 5xx is left out (``mark_failed``) and
another is tried, up to ``prefill_retries`` more; with none left the decode replica prefills
locally (``None``), counted as ``prefill_failed``, or ``busy`` when every replica tried answered
503. A 4xx answer is the client's error and goes back as is.

``ReplicaCalls.decode`` runs the request on a decode replica. A streaming call has
``decode_first_token_timeout_s`` until its first chunk, a non-streaming one ``decode_timeout_s``
for the whole call. A call that fails or times out before its first token is left out and
retried on another decode replica (up to ``decode_retries``) with the same transfer parameters:
if the first replica already took the blocks, the next one recomputes the prompt (vLLM's
``kv_load_failure_policy="recompute"``). With no replica left the client gets a 503. After the
first chunk a failure ends the stream with an OpenAI error event (then ``data: [DONE]``, but
for the Responses API, whose streams have none).

Every call is pinned to the replica the coordinator chose (``pin``, read by
``router.serve_router``); ``None`` lets Ray Serve choose (no replica known yet).

Each answered request's client-side latencies go to the router's metrics
(``router.metrics.RequestTimer``), labelled with the path it took: ``disaggregated`` (decode
got transfer parameters), ``fallback`` (its prefill failed or was busy everywhere), or
``prefilled_on_decode``. Times run from ``arrival_s`` when the ingress gives it, else from the
request's first replica call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.sse import carries_output, error_body, failed_stream_end
from router.coordinator import RoutingCoordinator
from router.metrics import FirstTokenPhases, RequestTimer
from router.openai_api import status_of
from router.policy import RoutingContext

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CallLimits:
    prefill_timeout_s: float = 120.0
    prefill_retries: int = 1
    decode_timeout_s: float = 600.0
    decode_first_token_timeout_s: float = 120.0
    decode_retries: int = 1


class CallFailed(Exception):
    """A replica call failed in a way another replica may absorb (``is_busy``: a 503)."""

    def __init__(self, reason: str, is_busy: bool = False,
                 is_replica_fault: bool = True) -> None:
        super().__init__(reason)
        self.is_busy = is_busy
        self.is_replica_fault = is_replica_fault


# What a replica raises when it, not the request, is at fault (its engine died or failed
# before the first token); any other exception raised inside a live replica is the request's.
REPLICA_FAULTS = ("EngineDeadError", "EngineGenerateError", "EngineStreamError")


def is_replica_fault(error: BaseException) -> bool:
    """Whether ``error`` (from a replica call) says the replica is unhealthy: its actor is gone
    or unreachable, or its engine failed. A request-specific exception raised inside a live
    replica, or one raised here before the call left (a body Ray cannot serialize), is not."""
    from ray import exceptions

    if isinstance(error, exceptions.RayTaskError):
        cause = getattr(error, "cause", None)
        return type(cause).__name__ in REPLICA_FAULTS or isinstance(
            cause, exceptions.RayActorError)
    return isinstance(error, exceptions.RayError)


def unavailable(role: str) -> JSONResponse:
    return JSONResponse(error_body(503, f"no {role} replica could serve the request; retry "
                                   "later", "ServiceUnavailableError"), status_code=503)


def _check_answer(result: Any) -> Any:
    """``result`` unless it is a 5xx error body (an engine that failed, or 503 busy)."""
    status = status_of(result)
    if status >= 500:
        message = result["error"].get("message", "") if isinstance(result, dict) else ""
        raise CallFailed(f"answered {status}: {str(message)[:200]}", is_busy=status == 503)
    return result


@dataclasses.dataclass
class _Request:
    """One client request across its replica calls."""

    arrival_s: float  # time.monotonic
    fell_back: bool = False  # its prefill failed or was refused: prefilled on decode
    phases: FirstTokenPhases = dataclasses.field(default_factory=FirstTokenPhases)


class ReplicaCalls:
    def __init__(self, prefill: Any, decode: Any, coordinator: RoutingCoordinator,
                 limits: CallLimits) -> None:
        self._prefill = prefill
        self._decode = decode
        self._coordinator = coordinator
        self.limits = limits
        # id(ctx) -> what happened to its request so far; an entry goes with its ctx.
        self._requests: dict[int, _Request] = {}

    # -- prefill ------------------------------------------------------------------------------

    async def prefill(self, kind: str, body: dict[str, Any], ctx: RoutingContext,
                      pin: str | None, used: list[str],
                      arrival_s: float | None = None) -> dict[str, Any] | Response | None:
        """Transfer parameters, a client error to return as is, or None to prefill on decode.

        ``body`` is what the prefill engine runs for one prompt (never several: one transfer
        id serves one engine request). ``arrival_s``: when the request arrived
        (``time.monotonic``)."""
        request = self._track(ctx, arrival_s)
        request.phases.prefill_sent_s = time.monotonic()
        try:
            return await self._prefill_attempts(kind, body, ctx, pin, used, request)
        finally:
            self._coordinator.prefill_done(ctx)

    async def _prefill_attempts(self, kind: str, body: dict[str, Any], ctx: RoutingContext,
                                pin: str | None, used: list[str],
                                request: _Request) -> dict[str, Any] | Response | None:
        phases = request.phases
        tried: list[str | None] = []
        is_all_busy = True
        attempts = 1 + self.limits.prefill_retries
        try:
            for attempt in range(attempts):
                try:
                    result = await self._prefill_once(kind, body, pin, phases)
                except CallFailed as e:
                    is_all_busy = is_all_busy and e.is_busy
                    self._failed("prefill", pin, e)
                    tried.append(pin)
                    retry = None if attempt + 1 == attempts else \
                        self._coordinator.choose_prefill(ctx, exclude=tried)
                    if retry is None:
                        break
                    pin = retry.replica_id
                    continue
                if pin is not None and not isinstance(result, Response):
                    used.append(pin)
                return result
            self._coordinator.count_local_prefill("busy" if is_all_busy else "prefill_failed")
            request.fell_back = True
            return None
        finally:
            # Failed everywhere, refused (4xx) or cancelled: the prompt is not computed where
            # the prefill policy last sent it, and ``done`` will not name that replica.
            if pin is not None and pin not in used:
                self._coordinator.prefill_given_up(ctx, pin)

    async def _prefill_once(self, kind: str, body: dict[str, Any], pin: str | None,
                            phases: FirstTokenPhases) -> dict[str, Any] | Response:
        transfer_id = uuid.uuid4().hex
        response = self._prefill.prefill.remote(kind, body, transfer_id, pin=pin)
        result = _check_answer(await self._bounded(response, self.limits.prefill_timeout_s))
        status = status_of(result)
        if 400 <= status < 500:
            return JSONResponse(result, status_code=status)
        if not isinstance(result, dict) or not result.get("kv_transfer_params"):
            raise CallFailed(f"answered without transfer parameters: {str(result)[:200]}")
        phases.prefill_done_s = time.monotonic()
        timing = result.get("timing")
        if isinstance(timing, dict):
            phases.prefill_queue_s = timing.get("queue_s")
            phases.prefill_compute_s = timing.get("compute_s")
        return result["kv_transfer_params"]

    def prefilled_apart(self, ctx: RoutingContext, arrival_s: float, sent_s: float,
                        done_s: float, fell_back: bool = False) -> None:
        """``ctx``'s request had its prompts prefilled under contexts of their own (one per
        prompt of several), from ``sent_s`` to ``done_s``: its TTFT phases show that span
        as the prefill call. ``fell_back``: none of them got a transfer."""
        request = self._track(ctx, arrival_s)
        request.phases.prefill_sent_s, request.phases.prefill_done_s = sent_s, done_s
        request.fell_back = fell_back

    # -- decode -------------------------------------------------------------------------------

    async def decode(self, kind: str, body: dict[str, Any], kv_params: dict[str, Any] | None,
                     ctx: RoutingContext, pin: str | None, used: list[str],
                     arrival_s: float | None = None) -> Response:
        """The client's response from the first decode replica that starts answering.

        Calls ``coordinator.done(ctx, used)`` once the request is over (for a stream: when it
        ends or the client leaves)."""
        request = self._track(ctx, arrival_s)
        request.phases.decode_sent_s = time.monotonic()
        path = "disaggregated" if kv_params is not None else \
            "fallback" if request.fell_back else "prefilled_on_decode"
        timer = RequestTimer(self._coordinator.metrics, path, request.arrival_s,
                             phases=request.phases)
        try:
            return await self._decode_attempts(kind, body, kv_params, ctx, pin, used, timer)
        except asyncio.CancelledError:  # the client went away
            self._coordinator.done(ctx, used)
            raise

    async def _decode_attempts(self, kind: str, body: dict[str, Any],
                               kv_params: dict[str, Any] | None, ctx: RoutingContext,
                               pin: str | None, used: list[str], timer: RequestTimer) -> Response:
        tried: list[str | None] = []
        for attempt in range(1 + self.limits.decode_retries):
            if attempt:
                retry = self._coordinator.choose_decode(ctx, exclude=tried)
                if retry is None:
                    break
                pin = retry.replica_id
                self._coordinator.count_decode_retry()
            try:
                if body.get("stream"):
                    return await self._stream(kind, body, kv_params, ctx, pin, used, timer)
                result = await self._bounded(
                    self._decode.generate.remote(kind, body, kv_params, pin=pin),
                    self.limits.decode_timeout_s)
                result = _check_answer(result)
            except CallFailed as e:
                self._failed("decode", pin, e)
                tried.append(pin)
                continue
            used.extend([pin] if pin else [])
            self._coordinator.done(ctx, used)
            if status_of(result) < 400:
                timer.end()
            return JSONResponse(result, status_code=status_of(result))
        self._coordinator.done(ctx, used)
        return unavailable("decode")

    async def _stream(self, kind: str, body: dict[str, Any], kv_params: dict[str, Any] | None,
                      ctx: RoutingContext, pin: str | None, used: list[str],
                      timer: RequestTimer) -> Response:
        gen = self._decode.options(stream=True).generate_stream.remote(
            kind, body, kv_params, pin=pin)
        try:
            first = _check_answer(await self._bounded(
                gen.__anext__(), self.limits.decode_first_token_timeout_s, gen))
        except BaseException:
            gen.cancel()
            raise
        if isinstance(first, dict):  # the engine refused the request: a client error
            gen.cancel()
            self._coordinator.done(ctx, used)
            return JSONResponse(first, status_code=status_of(first))
        self._coordinator.prefill_done(ctx)  # a local prefill is over once a token came
        used.extend([pin] if pin else [])
        return StreamingResponse(self._relay(kind, first, gen, ctx, pin, used, timer),
                                 media_type="text/event-stream")

    async def _relay(self, kind: str, first: str, gen: Any, ctx: RoutingContext,
                     pin: str | None, used: list[str], timer: RequestTimer) -> AsyncIterator[str]:
        """The stream after its first chunk; a failure ends it with an error event (in the
        stream's own dialect, ``cluster.sse``). Each chunk that carries output is timed as it
        goes out; a stream that ends well, as a whole."""
        num_chunks = 1
        try:
            timer.chunk()
            yield first
            async for chunk in gen:
                if isinstance(chunk, dict):  # an error body mid-stream
                    for event in failed_stream_end(status_of(chunk),
                                                   str(chunk["error"].get("message")),
                                                   str(chunk["error"].get("type")), kind):
                        yield event
                    return
                num_chunks += 1
                if carries_output(kind, chunk):
                    timer.chunk()
                yield chunk
            timer.end()
        except Exception as e:  # the replica died mid-stream: say so, never cut silently
            self._failed("decode", pin, CallFailed(f"{type(e).__name__}: {e}"))
            logger.warning("decode stream on %s failed after %d chunks", pin, num_chunks)
            for event in failed_stream_end(503, f"the decode replica failed after "
                                           f"{num_chunks} chunks", "ServiceUnavailableError",
                                           kind):
                yield event
        finally:
            gen.cancel()  # a client that went away must not leave the request running
            self._coordinator.done(ctx, used)

    # -- shared -------------------------------------------------------------------------------

    def _track(self, ctx: RoutingContext, arrival_s: float | None) -> _Request:
        """What happened to ``ctx``'s request so far, kept from its first call until the ctx
        is gone."""
        key = id(ctx)
        request = self._requests.get(key)
        if request is None:
            request = _Request(time.monotonic() if arrival_s is None else arrival_s)
            try:
                weakref.finalize(ctx, self._requests.pop, key, None)
            except TypeError:  # not weakly referenceable: time this call alone
                return request
            self._requests[key] = request
        elif arrival_s is not None:
            request.arrival_s = arrival_s
        return request

    @staticmethod
    async def _bounded(awaitable: Any, timeout_s: float, owner: Any = None) -> Any:
        """Await a replica call for at most ``timeout_s``; any failure becomes ``CallFailed``.
        The call is cancelled when it fails or the client goes away."""
        owner = awaitable if owner is None else owner
        try:
            return await asyncio.wait_for(awaitable, timeout_s)
        except asyncio.CancelledError:
            owner.cancel()  # the client went away: abort the call too
            raise
        except asyncio.TimeoutError:
            owner.cancel()
            raise CallFailed(f"no answer within {timeout_s:g} s") from None
        except StopAsyncIteration:
            raise CallFailed("the stream ended before its first chunk") from None
        except Exception as e:  # replica died, actor unavailable, backpressure...
            owner.cancel()
            raise CallFailed(f"{type(e).__name__}: {e}",
                             is_busy=type(e).__name__ == "BackPressureError",
                             is_replica_fault=is_replica_fault(e)) from None

    def _failed(self, role: str, pin: str | None, error: CallFailed) -> None:
        logger.debug("%s call on %s failed: %s", role, pin, error)
        if not error.is_replica_fault and not error.is_busy:
            logger.warning("a %s call failed because of the request, not %s: %s", role, pin,
                           error)
            return
        if pin is not None:
            self._coordinator.mark_failed(role, pin, str(error), is_busy=error.is_busy)
