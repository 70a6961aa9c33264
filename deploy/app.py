"""The only place that turns pdserve's classes into Ray Serve deployments and binds them.

    serve run deploy.app:build_app                      # the embedded default
    serve run deploy.app:build_app config_file=my.yaml  # any PDConfig YAML
    serve run deploy/local.yaml                         # a Serve config file

Three deployments: ``prefill`` and ``decode`` (each on its own resource pool, each scaled on its
own) and ``router`` (the HTTP ingress, holding a handle to each).
"""

from __future__ import annotations

from typing import Any

from cluster.engine import OpenAIEngine, kv_transfer_config
from cluster.pools import replica_actor_options
from cluster.ports import free_port_block
from decode.server import DecodeServer
from deploy.config import PDConfig, PoolConfig
from prefill.server import PrefillServer
from router.app import ROUTES, PDRouter

ROUTER_CLASS = "router.serve_router:PolicyRequestRouter"


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def connector_extra(cfg: PDConfig, host: str, port: int = 0) -> dict[str, Any]:
    return {"host": host, "port": port, "lease_s": cfg.kv_transfer.lease_s,
            "timeout_s": cfg.kv_transfer.timeout_s}


class PrefillReplica(PrefillServer):
    """A prefill replica: starts its engine, with the producer connector, on a free port."""

    async def __init__(self, config: dict[str, Any]) -> None:
        cfg = PDConfig.model_validate(config)
        engine_cfg = cfg.prefill.engine
        host = _node_ip()
        port = free_port_block(
            host, engine_cfg.tensor_parallel_size * engine_cfg.pipeline_parallel_size)
        engine = await OpenAIEngine.start(
            engine_cfg, kv_transfer_config("kv_producer", connector_extra(cfg, host, port)),
            cfg.prefill.cpu_cores, kv_events_host=host)
        super().__init__(engine)


class DecodeReplica(DecodeServer):
    """A decode replica: starts its engine with the consumer connector."""

    async def __init__(self, config: dict[str, Any]) -> None:
        cfg = PDConfig.model_validate(config)
        host = _node_ip()
        engine = await OpenAIEngine.start(
            cfg.decode.engine, kv_transfer_config("kv_consumer", connector_extra(cfg, host)),
            cfg.decode.cpu_cores, kv_events_host=host)
        super().__init__(engine)


def _ingress_class() -> type:
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI(title="pdserve")
    for method, path, name in ROUTES:
        app.add_api_route(path, getattr(PDRouter, name), methods=[method])
    return serve.ingress(app)(PDRouter)


def _pool_deployment(cls: type, name: str, pool: PoolConfig, policy: str) -> Any:
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    return serve.deployment(
        cls,
        name=name,
        num_replicas=pool.num_replicas,
        ray_actor_options=replica_actor_options(pool, name),
        max_ongoing_requests=max(8, pool.engine.max_num_seqs * 2),
        health_check_period_s=10,
        health_check_timeout_s=60,
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_CLASS,
            request_router_kwargs={"role": name, "policy": policy},
            request_routing_stats_period_s=1,
        ),
    )


def build_app_from_config(cfg: PDConfig) -> Any:
    """Bind the three deployments of ``cfg`` into one Serve application."""
    from ray import serve

    config = cfg.model_dump()
    prefill = _pool_deployment(PrefillReplica, "prefill", cfg.prefill, cfg.router.prefill_policy)
    decode = _pool_deployment(DecodeReplica, "decode", cfg.decode, cfg.router.decode_policy)
    router = serve.deployment(_ingress_class(), name="router", num_replicas=1,
                              ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    engine = cfg.prefill.engine
    return router.bind(
        prefill.bind(config), decode.bind(config), cfg.model_name, engine.model,
        engine.max_model_len, cfg.router.prefill_timeout_s, cfg.router.prefill_retries,
        cfg.router.coordinator_settings(engine.block_size))


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Serve's application builder: ``args`` are a PDConfig's fields or a ``config_file``."""
    return build_app_from_config(PDConfig.from_args(args))
