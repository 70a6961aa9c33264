"""One vLLM engine with vLLM's own OpenAI serving layer on top, as prefill and decode use it.

``OpenAIEngine.start`` builds an unmodified ``AsyncLLM`` from the same flags ``vllm serve``
takes, then vLLM's ``OpenAIServingCompletion`` / ``OpenAIServingChat`` over it (no HTTP server:
the router is the only front door). Responses are exactly what vLLM's OpenAI server answers.
``EngineStats`` listens to the engine's own per-step statistics (load, KV usage, where prompt
tokens came from, KV blocks held for decode); the router and the tests read them. Inside a Ray
Serve replica the engine also exports vLLM's metrics and the transfer's through Ray, tagged with
its role (``stat_loggers``, cluster/metrics.py).
``EngineHealth`` (cluster/worker_health.py) tells whether the engine and its KV transfer
threads are alive; ``EngineServer.check_health`` is what Ray Serve calls.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from cluster.engine_watch import WATCH_ENV
from cluster.metrics import engine_role
from cluster.ports import KV_EVENTS_CONFIG, kv_event_endpoints
from cluster.speeds import EngineSpeeds
from cluster.sse import error_body, responses_events
from cluster.worker_extension import EXTENSION_CLS, WARM_UP_METHOD
from cluster.worker_health import EngineHealth

if TYPE_CHECKING:
    from cluster.config import EngineConfig
    from cluster.metrics import TransferMetrics

logger = logging.getLogger(__name__)

CONNECTOR = {"kv_connector": "PDConnector", "kv_connector_module_path": "kvtransfer.connector"}


# Requests whose engine-side times are kept (``StatsSnapshot.timings``): their OpenAI request id
# starts with this (``request_id`` in the body; vLLM prepends "cmpl-" and appends "-<prompt>").
TIMED_REQUEST_PREFIX = "pdt-"
TIMINGS_KEPT = 1024  # the newest finished requests' timings, until their caller takes them


@dataclasses.dataclass(frozen=True)
class RequestTiming:
    """One finished request's time inside its engine, from vLLM's own per-request stats."""

    queue_s: float  # queued, until first scheduled
    compute_s: float  # first scheduled, until its first token


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
    # A gauge (kvtransfer.stats.GAUGES): KV blocks the prefill engine holds for decode now.
    num_held_blocks: int = 0
    # Every other connector counter (kvtransfer.stats.COUNTERS: refusals, protocol errors,
    # links, claims...), by name.
    transfer: dict[str, int] = dataclasses.field(default_factory=dict)
    # Decode step time and prefill speed measured on the engine's own steps (for the router).
    speeds: EngineSpeeds = dataclasses.field(default_factory=EngineSpeeds)
    # Engine request id -> its timing, for timed requests (TIMED_REQUEST_PREFIX) only.
    timings: collections.OrderedDict[str, RequestTiming] = dataclasses.field(
        default_factory=collections.OrderedDict, repr=False)

    def record_timing(self, request_id: str | None, timing: RequestTiming) -> None:
        if request_id is None or TIMED_REQUEST_PREFIX not in request_id:
            return
        self.timings[request_id] = timing
        while len(self.timings) > TIMINGS_KEPT:
            self.timings.popitem(last=False)

    def take_timing(self, request_id: str) -> RequestTiming | None:
        return self.timings.pop(request_id, None)


def apply_connector_stats(snapshot: StatsSnapshot, stats: dict[str, Any]) -> None:
    """Add the connector's counters to ``snapshot``'s totals; set its gauges (levels, not
    deltas: the newest reported value wins; kvtransfer/stats.py explains why)."""
    from kvtransfer.stats import is_gauge

    for name, value in stats.items():
        if type(value) is not int:
            continue
        if not hasattr(snapshot, name) or name == "transfer":
            snapshot.transfer[name] = snapshot.transfer.get(name, 0) + value
        elif is_gauge(name):
            setattr(snapshot, name, value)
        else:
            setattr(snapshot, name, getattr(snapshot, name) + value)


def make_stats_logger_class(snapshot: StatsSnapshot, transfer: TransferMetrics | None = None,
                            ) -> type:
    """A vLLM stat logger class that accumulates into ``snapshot`` (one per engine), and hands
    the connector's counters to ``transfer`` (Ray metrics) when given."""
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
                apply_connector_stats(snapshot, scheduler_stats.kv_connector_stats or {})
                if transfer is not None:
                    transfer.record(scheduler_stats.kv_connector_stats or {})
            if iteration_stats is not None:
                for done in iteration_stats.finished_requests:
                    snapshot.record_timing(done.request_id, RequestTiming(
                        done.queued_time, done.prefill_time))
                snapshot.speeds.record(iteration_stats)
                snapshot.generation_tokens_total += iteration_stats.num_generation_tokens
                pts = iteration_stats.prompt_token_stats
                snapshot.prompt_tokens_total += pts.total
                snapshot.prompt_tokens_computed += pts.computed
                snapshot.prompt_tokens_local_cache_hit += pts.local_cache_hit
                snapshot.prompt_tokens_external += pts.external_kv_transfer

        def log_engine_initialized(self) -> None:
            pass

    return EngineStats


def stat_loggers(snapshot: StatsSnapshot, role: str, export: bool = True) -> list[type]:
    """What the engine reports its statistics to: ``EngineStats`` (into ``snapshot``), and,
    inside a Ray actor when ``export``, vLLM's Ray Prometheus logger plus our transfer metrics,
    tagged with ``role`` (cluster/metrics.py)."""
    from cluster.metrics import TransferMetrics, in_ray_actor, role_prometheus_logger

    if not export or not in_ray_actor():
        return [make_stats_logger_class(snapshot)]
    return [make_stats_logger_class(snapshot, TransferMetrics.create(role)),
            role_prometheus_logger(role)]


def engine_flags(cfg: EngineConfig, kv_transfer: dict[str, Any] | None,
                 kv_events: bool = False) -> list[str]:
    """The ``vllm serve`` flags for ``cfg``. With ``kv_transfer``, the engine loads our
    connector and the workers' health extension. With ``kv_events``, it publishes its KV cache
    events (block stored / removed / all cleared) and serves replays of recent ones, each on a
    port the engine binds itself on ``VLLM_HOST_IP`` (vLLM's ``tcp://*:0``) and reports back."""
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
    if cfg.distributed_executor_backend is not None:
        flags += ["--distributed-executor-backend", cfg.distributed_executor_backend]
    if kv_transfer is not None:
        flags += ["--kv-transfer-config", json.dumps(kv_transfer),
                  "--worker-extension-cls", EXTENSION_CLS]
    if kv_events:
        flags += ["--kv-events-config", json.dumps(KV_EVENTS_CONFIG)]
    return flags + list(cfg.extra_args)


def renderer_flags(cfg: EngineConfig) -> list[str]:
    """The flags of an engine that only renders prompts (the router's): ``cfg``'s, which hold
    its tokenizer, chat template and tool and reasoning parsers, on one process."""
    return engine_flags(cfg, None) + ["--tensor-parallel-size", "1",
                                      "--pipeline-parallel-size", "1",
                                      "--distributed-executor-backend", "uni"]


def kv_transfer_config(role: str, extra: dict[str, Any]) -> dict[str, Any]:
    """vLLM's kv_transfer_config that loads our connector in ``role``."""
    return {**CONNECTOR, "kv_role": role, "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": extra}


def use_replica_placement_group(vllm_config: Any) -> None:
    """With vLLM's Ray executor, run the workers in the placement group Ray Serve made for
    this replica (bundles from cluster/pools.py). The engine-core process is no Ray worker and
    cannot see the group itself; without it vLLM would make a group of its own, outside the
    pool."""
    parallel = vllm_config.parallel_config
    if parallel.distributed_executor_backend != "ray" or parallel.placement_group is not None:
        return
    import ray

    parallel.placement_group = ray.util.get_current_placement_group()


def parse_flags(flags: list[str]) -> argparse.Namespace:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser()).parse_args(flags)


async def warm_up(engine: Any) -> None:
    """Compile at start-up what vLLM's sampler compiles on first use
    (``cluster.worker_extension``). Only an optimization: a failure is logged, and the engine
    serves, compiling in its first step that asks for logprobs."""
    try:
        seconds = await engine.collective_rpc(WARM_UP_METHOD)
    except Exception as e:  # a compiler missing on this host, for instance
        logger.warning("sampler warm-up failed (%s: %s); the first request that asks for "
                       "logprobs will compile it and stall the engine meanwhile",
                       type(e).__name__, e)
        return
    logger.info("sampler warmed up in %.1f s", max(seconds))


class OpenAIEngine:
    """An AsyncLLM plus vLLM's OpenAI completion and chat handlers, and its health checks."""

    def __init__(self, engine: Any, state: Any, stats: StatsSnapshot, config: EngineConfig,
                 kv_events_endpoint: str | None = None,
                 kv_events_replay_endpoint: str | None = None,
                 health: EngineHealth | None = None):
        self.engine = engine
        self.stats = stats
        self.config = config
        self.kv_events_endpoint = kv_events_endpoint
        self.kv_events_replay_endpoint = kv_events_replay_endpoint
        self.health = health or EngineHealth(engine, probe_workers=False)
        self._handlers = {
            "completion": state.openai_serving_completion.create_completion,
            "chat": state.openai_serving_chat.create_chat_completion,
        }
        if state.openai_serving_responses is not None:
            self._handlers["responses"] = state.openai_serving_responses.create_responses

    @classmethod
    async def start(
        cls, cfg: EngineConfig, kv_transfer: dict[str, Any] | None = None,
        cpu_cores: str | None = None, kv_events_host: str | None = None,
        export_metrics: bool = True,
    ) -> OpenAIEngine:
        """Start the engine; with ``kv_events_host``, it publishes KV cache events, and serves
        replays of them, on two ports it binds on that host (``kv_events_endpoint``,
        ``kv_events_replay_endpoint``). ``export_metrics``: export its metrics through Ray."""
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        # The engine-core process inherits these when it is spawned.
        os.environ[WATCH_ENV] = str(os.getpid())  # it ends with this process (engine_watch)
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.cpu_kvcache_space_gib)
        if cpu_cores is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores
        if kv_events_host is not None:
            os.environ["VLLM_HOST_IP"] = kv_events_host  # where "tcp://*:0" binds
        args = parse_flags(engine_flags(cfg, kv_transfer, kv_events_host is not None))
        stats = StatsSnapshot()
        engine_args = AsyncEngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config(UsageContext.ENGINE_CONTEXT)
        use_replica_placement_group(vllm_config)
        engine = AsyncLLM.from_vllm_config(
            vllm_config,
            stat_loggers=stat_loggers(stats, engine_role(kv_transfer), export_metrics),
            enable_log_requests=engine_args.enable_log_requests,
            disable_log_stats=engine_args.disable_log_stats,
        )
        try:
            state = State()
            await init_app_state(engine, state, args,
                                 supported_tasks=await engine.get_supported_tasks())
            endpoints = (None, None) if kv_events_host is None \
                else kv_event_endpoints(engine, kv_events_host)
            if kv_transfer is not None:  # the engines that load pdserve's worker extension
                await warm_up(engine)
        except BaseException:
            engine.shutdown()
            raise
        health = EngineHealth(engine, probe_workers=kv_transfer is not None,
                              progress=lambda: stats.num_steps)
        return cls(engine, state, stats, cfg, *endpoints, health=health)

    @property
    def is_dead(self) -> bool:
        """The engine can never answer again (its EngineCore is gone)."""
        return bool(self.engine.errored)

    async def call(self, kind: str, body: dict[str, Any]) -> dict[str, Any] | AsyncIterator[str]:
        """Run an OpenAI request (``kind`` "completion", "chat" or "responses") given as its
        JSON body.

        Returns the response body, an error body (``{"error": {..., "code": status}}``), or,
        for ``stream: true``, vLLM's server-sent events (``cluster.sse``).
        """
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.is_dead:
            raise EngineDeadError()
        try:
            if kind not in self._handlers:
                return error_body(404, f"this model does not serve the {kind} API",
                                  "NotFoundError")
            request = request_model(kind).model_validate(body)
            result = await self._handlers[kind](request, raw_request=None)
        except (VLLMClientError, ValueError) as e:  # pydantic's ValidationError is a ValueError
            return error_body(400, str(e), "BadRequestError", getattr(e, "parameter", None))
        except MALFORMED_INPUT_ERRORS as e:
            if self.is_dead:
                raise
            # vLLM's request preprocessing crashes on some content its validators let through
            # (a message object where a map is expected): this request's fault, not the
            # engine's, so it must not count against the replica.
            logger.info("request refused: %s: %s", type(e).__name__, e)
            return error_body(400, f"the request could not be processed ({type(e).__name__}: "
                              f"{str(e)[:200]})", "BadRequestError")
        if isinstance(result, ErrorResponse):
            return result.model_dump()
        if hasattr(result, "__aiter__"):
            return responses_events(result) if kind == "responses" else result
        if kind == "responses":  # as vLLM's server writes it
            return result.model_dump(mode="json", by_alias=True)
        return result.model_dump(exclude_none=True)

    def shutdown(self) -> None:
        self.engine.shutdown()


# Raised by vLLM's request preprocessing for malformed content that passed validation.
MALFORMED_INPUT_ERRORS = (TypeError, KeyError, IndexError, AttributeError, UnicodeError)


def request_model(kind: str) -> type:
    """vLLM's pydantic model for an OpenAI request of ``kind``."""
    if kind == "completion":
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        return CompletionRequest
    if kind == "chat":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return ChatCompletionRequest
    if kind == "responses":
        from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

        return ResponsesRequest
    raise ValueError(f"unknown request kind {kind!r}")


def ray_node_id() -> str | None:
    """The Ray node this process runs on (hex id), or None outside a Ray worker."""
    ray = sys.modules.get("ray")  # never imported here: a replica has it already
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def is_error(body: Any) -> bool:
    return isinstance(body, dict) and "error" in body and "choices" not in body


class EngineServer:
    """What prefill and decode servers share: the engine, its health, the load they report,
    and counters of what went wrong (each kind logged the first time)."""

    def __init__(self, engine: OpenAIEngine) -> None:
        self.engine = engine
        self.num_in_flight = 0
        self.queued_prefill_tokens = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self._is_shut_down = False

    async def check_health(self) -> None:
        """Ray Serve's health check: raises when the engine or a KV transfer thread is dead
        (or the workers stopped answering); Ray Serve then replaces this replica."""
        await self.engine.health.check()

    def health(self, pin: str | None = None) -> dict[str, Any]:
        """What the last health check found, the failures counted since start, and where this
        replica runs (its process, and its Ray node when in Ray)."""
        return {**self.engine.health.summary(), "failures": dict(self.failures),
                "pid": os.getpid(), "node_id": ray_node_id()}

    def record_routing_stats(self) -> dict[str, Any]:
        """Load figures for the router (Ray Serve polls this on every replica)."""
        s = self.engine.stats
        return {"num_running": max(s.num_running, self.num_in_flight),
                "num_waiting": s.num_waiting, "kv_usage": s.kv_usage,
                "queued_prefill_tokens": self.queued_prefill_tokens,
                "prefill_tokens_per_s": s.speeds.prefill_tokens_per_s,
                "decode_step_s": s.speeds.decode_step_s,
                "kv_events_endpoint": self.engine.kv_events_endpoint,
                "kv_events_replay_endpoint": self.engine.kv_events_replay_endpoint}

    def stats(self, pin: str | None = None) -> dict[str, Any]:
        """The engine's counters: load, where prompt tokens came from, KV bytes moved; ``pin``
        names the replica to ask (read by the request router)."""
        return {**dataclasses.asdict(self.engine.stats), "pid": os.getpid()}

    def count_failure(self, kind: str, message: str) -> None:
        """Count one ``kind`` of failure; log it the first time it happens."""
        self.failures[kind] += 1
        if self.failures[kind] == 1:
            logger.warning("%s (first time; counted in health()['failures'][%r])", message, kind)

    def shutdown(self) -> None:
        """Stop the engine, once (Ray Serve's graceful stop calls the replica's ``__del__``)."""
        if self._is_shut_down:
            return
        self._is_shut_down = True
        try:
            self.engine.shutdown()
        except Exception as e:  # a dead engine may fail to stop: nothing is left to stop
            logger.warning("engine shutdown failed: %s: %s", type(e).__name__, e)
