"""The decode server: continues a request from KV blocks computed elsewhere.

A plain class holding an engine whose connector is the ``kv_consumer``; ``deploy/`` turns it
into a Ray Serve deployment. Given the prefill's transfer parameters, the engine loads the
prompt's blocks instead of computing them (vLLM recomputes them if the load fails), then
generates. Without transfer parameters it prefills locally, like a plain vLLM server.
``pin`` (every method) is the replica the router chose; Ray Serve's request router reads it.

Failures:

- an error body (the request was refused before the engine took it, or its stream opened
  with a 4xx error event) is returned as is;
- an exception before the first streamed chunk (or an error event as the first chunk) is
  raised, so the router can send the request to another replica;
- a failure after the first chunk ends the stream with an OpenAI error event and
  ``data: [DONE]``: a stream is never cut silently.

Whenever a call fails before its engine took the request, or its engine died, the prefill
replica is told to free the blocks it holds for it (``release_transfer``): nobody will pull them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from cluster.engine import EngineServer, is_error
from cluster.sse import ends_stream, event_error, failed_stream_end
from kvtransfer.release import release_transfer


class EngineStreamError(RuntimeError):
    """The engine failed before a stream's first chunk: the router may try another replica."""


def decode_body(body: dict[str, Any], kv_transfer_params: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(body)
    out.pop("kv_transfer_params", None)
    if kv_transfer_params:
        out["kv_transfer_params"] = kv_transfer_params
    return out


def server_failure_end(message: str, kind: str) -> list[str]:
    """The end of a ``kind`` stream the server failed (a 500 error event, not the request's
    fault)."""
    return failed_stream_end(500, message, "InternalServerError", kind)


class DecodeServer(EngineServer):
    async def generate(self, kind: str, body: dict[str, Any],
                       kv_transfer_params: dict[str, Any] | None = None,
                       pin: str | None = None) -> dict[str, Any]:
        """Non-streaming: the whole response body, or an OpenAI error body."""
        self.num_in_flight += 1
        try:
            result = await self._call(kind, body, kv_transfer_params)
            if hasattr(result, "__aiter__"):
                await result.aclose()  # never iterated: the engine did not take the request
                self._release(kv_transfer_params, "a streaming request came to generate")
                raise ValueError("streaming requests go to generate_stream")
            return result
        finally:
            self.num_in_flight -= 1

    async def generate_stream(self, kind: str, body: dict[str, Any],
                              kv_transfer_params: dict[str, Any] | None = None,
                              pin: str | None = None) -> AsyncIterator[str | dict[str, Any]]:
        """Streaming: vLLM's SSE lines; a refusal before the first token comes as one dict, an
        engine failure before it as an exception, one after it as a final error event."""
        self.num_in_flight += 1
        stream = None
        try:
            result = await self._call(kind, body, kv_transfer_params)
            if is_error(result) or not hasattr(result, "__aiter__"):
                yield result
                return
            stream = result
            first = await self._first_chunk(kind, stream, kv_transfer_params)
            yield first
            if isinstance(first, dict):  # the engine refused the request: a client error
                return
            async with contextlib.aclosing(self._rest(kind, stream,
                                                      ends_stream(kind, first))) as rest:
                async for chunk in rest:
                    yield chunk
        finally:
            self.num_in_flight -= 1
            if stream is not None:
                await stream.aclose()  # a client gone mid-stream: the engine aborts the request

    async def _call(self, kind: str, body: dict[str, Any],
                    kv_transfer_params: dict[str, Any] | None) -> Any:
        try:
            result = await self.engine.call(kind, decode_body(body, kv_transfer_params))
        except Exception as e:
            if self.engine.is_dead:
                self._release(kv_transfer_params, "the decode engine is dead")
            self.count_failure("call_failed", f"a decode call failed: {type(e).__name__}: {e}")
            raise
        if is_error(result):
            # Rejected before the engine saw the transfer: the prefill side must not wait.
            self._release(kv_transfer_params, "the decode engine refused the request")
        return result

    async def _first_chunk(self, kind: str, stream: Any,
                           kv_transfer_params: dict[str, Any] | None) -> str | dict[str, Any]:
        """The stream's first chunk, or the error body of a 4xx error event (the request's
        fault); raises ``EngineStreamError`` when the engine failed first."""
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            failure = EngineStreamError("the engine's stream ended before its first chunk")
        except Exception as e:
            failure = EngineStreamError(f"the engine failed before the first token: "
                                        f"{type(e).__name__}: {e}")
            failure.__cause__ = e
        else:
            error = event_error(kind, first)
            if error is None:
                return first
            code = error["error"].get("code")
            if isinstance(code, int) and 400 <= code < 500:
                await stream.aclose()
                self._release(kv_transfer_params, "the decode engine refused the request")
                return error
            failure = EngineStreamError(f"the engine failed before the first token: "
                                        f"{error['error'].get('message')}")
        await stream.aclose()
        if self.engine.is_dead:
            self._release(kv_transfer_params, "the decode engine died before the first token")
        self.count_failure("stream_failed_before_first_chunk", f"a decode stream failed before "
                           f"its first chunk, raised so the router can retry: {failure}")
        raise failure

    async def _rest(self, kind: str, stream: Any, ended: bool) -> AsyncIterator[str]:
        """The chunks after the first; a failure, or an end without the stream's last event
        (``[DONE]``, or a Responses stream's end), becomes an error event and that end."""
        try:
            async for chunk in stream:
                if event_error(kind, chunk) is not None:
                    self.count_failure("stream_error_event",
                                       "a decode stream ended with an engine error event")
                ended = ends_stream(kind, chunk)
                yield chunk
        except Exception as e:
            why = "the decode engine died" if self.engine.is_dead else "the decode stream failed"
            self.count_failure("stream_failed", f"{why} mid-stream: {type(e).__name__}: {e}")
            for event in server_failure_end(f"{why} mid-stream ({type(e).__name__}: {e}); "
                                            "the response is incomplete", kind):
                yield event
            return
        if not ended:
            self.count_failure("stream_cut", "a decode stream ended without its last event")
            for event in server_failure_end("the decode stream ended early; the response "
                                            "is incomplete", kind):
                yield event

    def _release(self, params: dict[str, Any] | None, why: str) -> None:
        """Tell the prefill replica to free the blocks it holds for ``params``."""
        if not params:
            return
        self.count_failure("released", f"released a transfer the decode side will not pull "
                           f"({why})")
        release_transfer(params)
