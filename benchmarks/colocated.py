"""The baseline pdserve is compared with: plain vLLM engines, each doing its own prefill and
decode, behind Ray Serve.

One Ray Serve deployment whose replicas each hold an ``OpenAIEngine`` without a KV connector
and answer ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models`` through it, as a
``vllm serve`` would. Replica ``i`` pins its engine to ``cores[i]``; Ray Serve's proxy spreads
requests over the replicas (power of two choices on their queue lengths).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from cluster.config import EngineConfig
from cluster.engine import OpenAIEngine, is_error
from cluster.sse import error_body

ROUTES = (
    ("POST", "/v1/completions", "completions"),
    ("POST", "/v1/chat/completions", "chat_completions"),
    ("GET", "/v1/models", "models"),
)


class ColocatedReplica:
    """One vLLM engine serving whole requests, prefill and decode alike."""

    async def __init__(self, engine: dict[str, Any], cores: list[str]) -> None:
        from ray import serve

        self.config = EngineConfig.model_validate(engine)
        rank = serve.get_replica_context().rank.rank
        self.engine: OpenAIEngine | None = await OpenAIEngine.start(
            self.config, cpu_cores=cores[rank % len(cores)])

    async def completions(self, request: Request) -> Response:
        return await self._serve("completion", request)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve("chat", request)

    async def models(self) -> dict[str, Any]:
        name = self.config.name
        return {"object": "list", "data": [{"id": name, "object": "model", "root": name,
                                            "max_model_len": self.config.max_model_len}]}

    async def _serve(self, kind: str, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError as e:
            return JSONResponse(error_body(400, f"invalid JSON: {e}", "BadRequestError"), 400)
        result = await self.engine.call(kind, body)
        if isinstance(result, dict):
            return JSONResponse(result, result["error"]["code"] if is_error(result) else 200)
        return StreamingResponse(result, media_type="text/event-stream")

    def __del__(self) -> None:
        """Ray Serve's graceful stop calls this: stop the engine (its EngineCore too)."""
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()
            self.engine = None


def build_app(engine: EngineConfig, cores: list[str]) -> Any:
    """The baseline as a Serve application: one replica per entry of ``cores``."""
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI(title="colocated vLLM")
    for method, path, name in ROUTES:
        app.add_api_route(path, getattr(ColocatedReplica, name), methods=[method])
    deployment = serve.deployment(
        serve.ingress(app)(ColocatedReplica),
        name="colocated",
        num_replicas=len(cores),
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(8, engine.max_num_seqs * 2),
    )
    return deployment.bind(engine.model_dump(), list(cores))
