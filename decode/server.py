"""The decode server: continues a request from KV blocks computed elsewhere.

A plain class holding an engine whose connector is the ``kv_consumer``; ``deploy/`` turns it
into a Ray Serve deployment. Given the prefill's transfer parameters, the engine loads the
prompt's blocks instead of computing them (vLLM recomputes them if the load fails), then
generates. Without transfer parameters it prefills locally, like a plain vLLM server.
``pin`` (every method) is the replica the router chose; Ray Serve's request router reads it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from cluster.engine import EngineServer, is_error
from kvtransfer.release import release_transfer


def decode_body(body: dict[str, Any], kv_transfer_params: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(body)
    out.pop("kv_transfer_params", None)
    if kv_transfer_params:
        out["kv_transfer_params"] = kv_transfer_params
    return out


class DecodeServer(EngineServer):
    async def generate(self, kind: str, body: dict[str, Any],
                       kv_transfer_params: dict[str, Any] | None = None,
                       pin: str | None = None) -> dict[str, Any]:
        """Non-streaming: the whole response body, or an OpenAI error body."""
        self.num_in_flight += 1
        try:
            result = await self._call(kind, body, kv_transfer_params)
            if hasattr(result, "__aiter__"):
                raise ValueError("streaming requests go to generate_stream")
            return result
        finally:
            self.num_in_flight -= 1

    async def generate_stream(self, kind: str, body: dict[str, Any],
                              kv_transfer_params: dict[str, Any] | None = None,
                              pin: str | None = None) -> AsyncIterator[str | dict[str, Any]]:
        """Streaming: vLLM's SSE lines; an error before the first token comes as one dict."""
        self.num_in_flight += 1
        try:
            result = await self._call(kind, body, kv_transfer_params)
            if is_error(result) or not hasattr(result, "__aiter__"):
                yield result
                return
            async for chunk in result:
                yield chunk
        finally:
            self.num_in_flight -= 1

    async def _call(self, kind: str, body: dict[str, Any],
                    kv_transfer_params: dict[str, Any] | None) -> Any:
        result = await self.engine.call(kind, decode_body(body, kv_transfer_params))
        if kv_transfer_params and is_error(result):
            # Rejected before the engine saw the transfer: the prefill side must not wait.
            release_transfer(kv_transfer_params)
        return result
