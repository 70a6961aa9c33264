"""The only place that turns pdserve's classes into Ray Serve deployments and binds them.

    serve run deploy.app:build_app                      # the embedded default
    serve run deploy.app:build_app config_file=my.yaml  # any PDConfig YAML
    serve run deploy/local.yaml                         # a Serve config file

Three deployments: ``prefill`` and ``decode`` (each on its own resource pool, each scaled on its
own) and ``router`` (the HTTP and gRPC ingress, holding a handle to each). Ray Serve's proxies
carry both protocols; ``grpc_options`` is what its gRPC proxy needs to serve pdserve's service.

Health: Ray Serve calls each prefill and decode replica's ``check_health`` every
``HEALTH_CHECK_PERIOD_S``; it raises when the engine is dead, a KV transfer thread died, or the
workers stopped answering (cluster/worker_health.py); a check without an answer within
``HEALTH_CHECK_TIMEOUT_S`` fails too. After three failed checks in a row (Ray Serve's
``REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD``), or at once if the replica's actor died, Ray Serve
marks the replica unhealthy, stops it (waiting up to ``GRACEFUL_SHUTDOWN_TIMEOUT_S`` for its
requests, then calling ``__del__``, which stops the engine), and starts a replacement. So a dead
engine is found about 3 x 2 s after it died; the replacement then needs the old replica's stop
and its own engine's start. The workers' transfer threads are asked at most every
``cluster.worker_health.PROBE_PERIOD_S`` while they answer healthy, so a dead one is found
within that much more.

Secret: every build makes one KV transport secret (``secrets.token_hex(32)``, unless
``PDSERVE_KV_SECRET`` is set where the app is built) and gives it to the prefill and decode
replicas and the router (which claims and releases the transfers of a request with several
prompts) only as an environment variable of their runtime_env; engine-core processes inherit
it, and ``kvtransfer.env.kv_secret()`` reads it. It is in no config and never logged.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

from cluster.config import PDConfig, PoolConfig
from cluster.engine import OpenAIEngine, kv_transfer_config, renderer_flags
from cluster.local import parse_cores
from cluster.pools import deployment_options
from cluster.service_config import RouterConfig
from decode.server import DecodeServer
from kvtransfer.env import KV_SECRET_ENV, kv_secret_text
from prefill.server import PrefillServer
from router.app import ROUTES, PDRouter

logger = logging.getLogger(__name__)

ROUTER_CLASS = "router.serve_router:PolicyRequestRouter"
# What Ray Serve's gRPC proxy adds to its server: pdserve's service (router/grpc_api).
GRPC_SERVICER_FUNCTIONS = ["router.grpc_api.pdserve_pb2_grpc.add_PDServeServicer_to_server"]
DEFAULT_GRPC_PORT = 9000
HEALTH_CHECK_PERIOD_S = 2.0
# Longer than the slowest healthy check: EngineHealth waits up to 5 s for the workers' answer.
HEALTH_CHECK_TIMEOUT_S = 15.0
GRACEFUL_SHUTDOWN_TIMEOUT_S = 10.0


def grpc_options(port: int = DEFAULT_GRPC_PORT) -> dict[str, Any]:
    """``serve.start``'s ``grpc_options`` serving pdserve's gRPC API on ``port``."""
    return {"port": port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS}


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def connector_extra(cfg: PDConfig, host: str) -> dict[str, Any]:
    """The connector's settings (kvtransfer.settings): every KVTransferConfig field, this
    node's address, and port 0 (each prefill worker binds a free port and reports it)."""
    return {**cfg.kv_transfer.model_dump(), "host": host, "port": 0}


def kv_secret_env() -> dict[str, str]:
    """The replicas' environment carrying the deployment's KV transport secret."""
    return {KV_SECRET_ENV: kv_secret_text() or secrets.token_hex(32)}


def _join_pool_cores(cfg: PDConfig, pool: PoolConfig) -> None:
    """With ``serving_cores``, move the thread that starts the engine, and so the EngineCore
    process it spawns, onto the pool's ``cpu_cores`` (the replica's other threads stay on the
    serving cores): the engine's scheduling loop then shares its workers' cores rather than
    waiting behind the router and the proxy."""
    if cfg.serving_cores is None or pool.cpu_cores is None:
        return
    cores = parse_cores(pool.cpu_cores.replace("|", ","))
    logger.info("this replica's EngineCore runs on cores %s", sorted(cores))
    os.sched_setaffinity(0, cores)  # 0: the calling thread


class _Replica:
    def __del__(self) -> None:
        """Ray Serve's graceful stop calls this: stop the engine (its EngineCore too)."""
        if getattr(self, "engine", None) is not None:
            self.shutdown()


class PrefillReplica(_Replica, PrefillServer):
    """A prefill replica: starts its engine with the producer connector."""

    async def __init__(self, config: dict[str, Any]) -> None:
        cfg = PDConfig.model_validate(config)
        host = _node_ip()
        _join_pool_cores(cfg, cfg.prefill)
        engine = await OpenAIEngine.start(
            cfg.prefill.engine, kv_transfer_config("kv_producer", connector_extra(cfg, host)),
            cfg.prefill.cpu_cores, kv_events_host=host,
            export_metrics=cfg.enable_metrics)
        super().__init__(engine, max_held_blocks=cfg.kv_transfer.max_held_blocks)


class DecodeReplica(_Replica, DecodeServer):
    """A decode replica: starts its engine with the consumer connector."""

    async def __init__(self, config: dict[str, Any]) -> None:
        cfg = PDConfig.model_validate(config)
        host = _node_ip()
        _join_pool_cores(cfg, cfg.decode)
        engine = await OpenAIEngine.start(
            cfg.decode.engine, kv_transfer_config("kv_consumer", connector_extra(cfg, host)),
            cfg.decode.cpu_cores, kv_events_host=host,
            export_metrics=cfg.enable_metrics)
        super().__init__(engine)


def _ingress_class() -> type:
    from fastapi import FastAPI
    from ray import serve

    from router.openai_api import install_error_handlers, install_openapi

    app = FastAPI(title="pdserve")
    for method, path, name in ROUTES:
        app.add_api_route(path, getattr(PDRouter, name), methods=[method])
    install_openapi(app)
    install_error_handlers(app)
    return serve.ingress(app)(PDRouter)


def _pool_deployment(cls: type, name: str, pool: PoolConfig, router: RouterConfig,
                     env_vars: dict[str, str]) -> Any:
    """One pool's deployment: its replicas placed as cluster/pools.py says (a placement
    group per replica of several workers), routed by the pool's policy."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    return serve.deployment(
        cls,
        name=name,
        num_replicas=pool.num_replicas,
        **deployment_options(pool, name, env_vars),
        max_ongoing_requests=max(8, pool.engine.max_num_seqs * 2),
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S,
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_CLASS,
            request_router_kwargs={"role": name, "policy": router.policy(name),
                                   "policy_kwargs": router.policy_kwargs(name)},
            request_routing_stats_period_s=1,
        ),
    )


def build_app_from_config(cfg: PDConfig) -> Any:
    """Bind the three deployments of ``cfg`` into one Serve application."""
    from ray import serve

    config = cfg.model_dump()
    env_vars = kv_secret_env()
    prefill = _pool_deployment(PrefillReplica, "prefill", cfg.prefill, cfg.router, env_vars)
    decode = _pool_deployment(DecodeReplica, "decode", cfg.decode, cfg.router, env_vars)
    # The router claims and releases the transfers of requests with several prompts.
    router = serve.deployment(_ingress_class(), name="router", num_replicas=1,
                              ray_actor_options={"num_cpus": 0,
                                                 "runtime_env": {"env_vars": env_vars}},
                              max_ongoing_requests=1000)
    engine = cfg.prefill.engine
    return router.bind(
        prefill.bind(config), decode.bind(config), cfg.model_name, engine.model,
        engine.max_model_len, cfg.router.prefill_timeout_s, cfg.router.prefill_retries,
        {**cfg.router.coordinator_settings(engine.block_size),
         "enable_metrics": cfg.enable_metrics}, cfg.router.ingress_settings(),
        renderer_flags(cfg.decode.engine))


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Serve's application builder: ``args`` are a PDConfig's fields or a ``config_file``."""
    return build_app_from_config(PDConfig.from_args(args))
