"""One vLLM engine with vLLM's own OpenAI serving layer on top, as prefill and decode use it.

``OpenAIEngine.start`` builds an unmodified ``AsyncLLM`` from the same flags ``vllm serve``
takes, then vLLM's ``OpenAIServingCompletion`` / ``OpenAIServingChat`` over it (no HTTP server:
the router is the only front door). Responses are exactly what vLLM's OpenAI server answers.
``EngineStats`` listens to the engine's own per-step statistics (load, KV usage, where prompt
tokens came from); the router and the tests read them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from cluster.ports import free_port_block

if TYPE_CHECKING:
    from deploy.config import EngineConfig

logger = logging.getLogger(__name__)

CONNECTOR = {"kv_connector": "PDConnector", "kv_connector_module_path": "kvtransfer.connector"}


@dataclasses.dataclass
class StatsSnapshot:
    """The engine's latest scheduler figures and its prompt-token counters since start."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_steps: int = 0
    prompt_tokens_total: int = 0
    prompt_tokens_computed: int = 0
    prompt_tokens_local_cache_hit: int = 0
    prompt_tokens_external: int = 0
    generation_tokens_total: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # KV transfer counters from our connector (zero without one).
    num_bytes_sent: int = 0
    num_bytes_received: int = 0
    num_loads: int = 0
    num_failed_loads: int = 0


def make_stats_logger_class(snapshot: StatsSnapshot) -> type:
    """A vLLM stat logger class that accumulates into ``snapshot`` (one per engine)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class EngineStats(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            if scheduler_stats is not None:
                snapshot.num_running = scheduler_stats.num_running_reqs
                snapshot.num_waiting = scheduler_stats.num_waiting_reqs
                snapshot.kv_usage = scheduler_stats.kv_cache_usage
                snapshot.num_steps += 1
                pcs = scheduler_stats.prefix_cache_stats
                snapshot.prefix_cache_queries += pcs.queries
                snapshot.prefix_cache_hits += pcs.hits
                for name, value in (scheduler_stats.kv_connector_stats or {}).items():
                    if isinstance(value, int) and hasattr(snapshot, name):
                        setattr(snapshot, name, getattr(snapshot, name) + value)
            if iteration_stats is not None:
                snapshot.generation_tokens_total += iteration_stats.num_generation_tokens
                pts = iteration_stats.prompt_token_stats
                snapshot.prompt_tokens_total += pts.total
                snapshot.prompt_tokens_computed += pts.computed
                snapshot.prompt_tokens_local_cache_hit += pts.local_cache_hit
                snapshot.prompt_tokens_external += pts.external_kv_transfer

        def log_engine_initialized(self) -> None:
            pass

    return EngineStats


def engine_flags(cfg: EngineConfig, kv_transfer: dict[str, Any] | None,
                 kv_events_port: int | None = None) -> list[str]:
    """The ``vllm serve`` flags for ``cfg``; with ``kv_events_port``, the engine publishes its
    KV cache events (block stored / removed / all cleared) on that port."""
    flags = [
        "--model", cfg.model,
        "--served-model-name", cfg.name,
        "--dtype", cfg.dtype,
        "--max-model-len", str(cfg.max_model_len),
        "--block-size", str(cfg.block_size),
        "--tensor-parallel-size", str(cfg.tensor_parallel_size),
        "--pipeline-parallel-size", str(cfg.pipeline_parallel_size),
        "--max-num-seqs", str(cfg.max_num_seqs),
        "--enable-prefix-caching" if cfg.enable_prefix_caching else "--no-enable-prefix-caching",
    ]
    if cfg.enforce_eager:
        flags.append("--enforce-eager")
    if kv_transfer is not None:
        flags += ["--kv-transfer-config", json.dumps(kv_transfer)]
    if kv_events_port is not None:
        flags += ["--kv-events-config", json.dumps({
            "enable_kv_cache_events": True, "publisher": "zmq",
            "endpoint": f"tcp://*:{kv_events_port}"})]
    return flags + list(cfg.extra_args)


def kv_transfer_config(role: str, extra: dict[str, Any]) -> dict[str, Any]:
    """vLLM's kv_transfer_config that loads our connector in ``role``."""
    return {**CONNECTOR, "kv_role": role, "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra}


def parse_flags(flags: list[str]) -> argparse.Namespace:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser()).parse_args(flags)


class OpenAIEngine:
    """An AsyncLLM plus vLLM's OpenAI completion and chat handlers."""

    def __init__(self, engine: Any, state: Any, stats: StatsSnapshot, config: EngineConfig,
                 kv_events_endpoint: str | None = None):
        self.engine = engine
        self.stats = stats
        self.config = config
        self.kv_events_endpoint = kv_events_endpoint
        self._completion = state.openai_serving_completion
        self._chat = state.openai_serving_chat

    @classmethod
    async def start(
        cls, cfg: EngineConfig, kv_transfer: dict[str, Any] | None = None,
        cpu_cores: str | None = None, kv_events_host: str | None = None,
    ) -> OpenAIEngine:
        """Start the engine; with ``kv_events_host``, it publishes KV cache events on a free
        port of that host (``kv_events_endpoint``)."""
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.v1.engine.async_llm import AsyncLLM

        # The engine-core process inherits these when it is spawned.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.cpu_kvcache_space_gib)
        if cpu_cores is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores
        events_port = None if kv_events_host is None else free_port_block(kv_events_host, 1)
        args = parse_flags(engine_flags(cfg, kv_transfer, events_port))
        stats = StatsSnapshot()
        engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs.from_cli_args(args), stat_loggers=[make_stats_logger_class(stats)]
        )
        state = State()
        await init_app_state(engine, state, args,
                             supported_tasks=await engine.get_supported_tasks())
        endpoint = None if events_port is None else f"tcp://{kv_events_host}:{events_port}"
        return cls(engine, state, stats, cfg, endpoint)

    async def call(self, kind: str, body: dict[str, Any]) -> dict[str, Any] | AsyncIterator[str]:
        """Run an OpenAI request (``kind`` "completion" or "chat") given as its JSON body.

        Returns the response body, an error body (``{"error": {..., "code": status}}``), or,
        for ``stream: true``, vLLM's server-sent-event lines.
        """
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMClientError

        try:
            request = request_model(kind).model_validate(body)
            handler = self._completion.create_completion if kind == "completion" \
                else self._chat.create_chat_completion
            result = await handler(request, raw_request=None)
        except (VLLMClientError, ValueError) as e:  # pydantic's ValidationError is a ValueError
            return error_body(400, str(e), "BadRequestError", getattr(e, "parameter", None))
        if isinstance(result, ErrorResponse):
            return result.model_dump()
        if hasattr(result, "__aiter__"):
            return result
        return result.model_dump(exclude_none=True)

    def shutdown(self) -> None:
        self.engine.shutdown()


def request_model(kind: str) -> type:
    """vLLM's pydantic model for an OpenAI request of ``kind``."""
    if kind == "completion":
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        return CompletionRequest
    if kind == "chat":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return ChatCompletionRequest
    raise ValueError(f"unknown request kind {kind!r}")


def error_body(status: int, message: str, type_: str, param: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error body, as vLLM's server writes it (the status in ``code``)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def is_error(body: Any) -> bool:
    return isinstance(body, dict) and "error" in body and "choices" not in body


class EngineServer:
    """What prefill and decode servers share: the engine, and the load they report."""

    def __init__(self, engine: OpenAIEngine) -> None:
        self.engine = engine
        self.num_in_flight = 0
        self.queued_prefill_tokens = 0

    def record_routing_stats(self) -> dict[str, Any]:
        """Load figures for the router (Ray Serve polls this on every replica)."""
        s = self.engine.stats
        return {"num_running": max(s.num_running, self.num_in_flight),
                "num_waiting": s.num_waiting, "kv_usage": s.kv_usage,
                "queued_prefill_tokens": self.queued_prefill_tokens,
                "kv_events_endpoint": self.engine.kv_events_endpoint}

    def stats(self, pin: str | None = None) -> dict[str, Any]:
        """The engine's counters: load, where prompt tokens came from, KV bytes moved; ``pin``
        names the replica to ask (read by the request router)."""
        return {**dataclasses.asdict(self.engine.stats), "pid": os.getpid()}
