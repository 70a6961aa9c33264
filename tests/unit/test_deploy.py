"""deploy/: the Serve config file and the app builder (no cluster needed to bind)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.config import PDConfig

LOCAL_YAML = Path(__file__).resolve().parents[2] / "deploy" / "local.yaml"


def test_local_yaml_is_a_valid_serve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(LOCAL_YAML.read_text()))
    (app,) = schema.applications
    assert app.import_path == "deploy.app:build_app"
    cfg = PDConfig.from_args(app.args)
    assert (cfg.prefill.cpu_cores, cfg.decode.cpu_cores) == ("0", "1")


def test_local_yaml_serves_the_grpc_api() -> None:
    """The Serve config file asks Ray's gRPC proxy for pdserve's service, as ``serve_local``
    does, and the servicer function it names exists."""
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    from deploy.app import grpc_options

    schema = ServeDeploySchema.model_validate(yaml.safe_load(LOCAL_YAML.read_text()))
    assert schema.grpc_options.model_dump() == {**gRPCOptions().model_dump(), **grpc_options()}
    (add_servicer,) = gRPCOptions(**grpc_options()).grpc_servicer_func_callable
    assert add_servicer.__name__ == "add_PDServeServicer_to_server"


def test_build_app_binds_three_deployments() -> None:
    from deploy.app import build_app

    app = build_app(yaml.safe_load(LOCAL_YAML.read_text())["applications"][0]["args"])
    router = app._bound_deployment
    assert router.name == "router"
    prefill, decode = (arg._bound_deployment for arg in router.init_args[:2])
    assert (prefill.name, decode.name) == ("prefill", "decode")
    assert decode.ray_actor_options["resources"] == {"pdserve_decode": 1}
    assert prefill.ray_actor_options["resources"] == {"pdserve_prefill": 1}
    assert prefill._deployment_config.request_router_config.request_router_kwargs == {
        "role": "prefill", "policy": "cache_cost", "policy_kwargs": {}}
    # Ray Serve's own choice (a request not pinned to a replica) weighs decode load as the
    # router does.
    decode_kwargs = decode._deployment_config.request_router_config.request_router_kwargs
    assert decode_kwargs["policy_kwargs"]["running_seq_tokens"] > 0


def test_build_app_rejects_disagreeing_pools() -> None:
    from deploy.app import build_app

    with pytest.raises(ValueError, match="block_size"):
        build_app({"decode": {"engine": {"block_size": 64}}})


def _bound(app) -> tuple:
    router = app._bound_deployment
    prefill, decode = (arg._bound_deployment for arg in router.init_args[:2])
    return router, prefill, decode


def _secret_of(deployment) -> str | None:
    runtime_env = (deployment.ray_actor_options or {}).get("runtime_env") or {}
    return runtime_env.get("env_vars", {}).get("PDSERVE_KV_SECRET")


def test_each_build_makes_a_secret_only_its_replicas_get(monkeypatch, caplog) -> None:
    import json
    import logging

    from deploy.app import build_app

    monkeypatch.delenv("PDSERVE_KV_SECRET", raising=False)
    with caplog.at_level(logging.DEBUG):
        router, prefill, decode = _bound(build_app({}))
    secret = _secret_of(prefill)
    assert secret is not None and len(secret) == 64 and int(secret, 16) >= 0
    # The router claims and releases the transfers of requests with several prompts.
    assert _secret_of(decode) == secret and _secret_of(router) == secret
    # Not in any replica's init arguments (the config dict), nor in any log line.
    for deployment in (router, prefill, decode):
        args = json.dumps([a for a in deployment.init_args if isinstance(a, (dict, str))],
                          default=str)
        assert secret not in args
    assert secret not in caplog.text
    assert _secret_of(_bound(build_app({}))[1]) != secret  # one per deployment


def test_a_secret_set_in_the_environment_is_used(monkeypatch) -> None:
    from deploy.app import build_app

    monkeypatch.setenv("PDSERVE_KV_SECRET", "my-operator-secret-0123456789")
    _, prefill, decode = _bound(build_app({}))
    assert _secret_of(prefill) == _secret_of(decode) == "my-operator-secret-0123456789"


def test_every_kv_transfer_field_reaches_the_connector_with_port_0() -> None:
    from cluster.config import KVTransferConfig
    from deploy.app import connector_extra
    from kvtransfer.settings import ConnectorSettings

    cfg = PDConfig.model_validate({"kv_transfer": {"lease_s": 7, "max_held_blocks": 9}})
    extra = connector_extra(cfg, "10.0.0.5")
    assert set(KVTransferConfig.model_fields) <= set(extra)
    assert (extra["host"], extra["port"], extra["lease_s"], extra["max_held_blocks"]) == (
        "10.0.0.5", 0, 7, 9)
    settings = ConnectorSettings.from_extra_config(extra)  # every name is the connector's
    assert settings.max_held_blocks == 9


def test_pool_deployments_are_health_checked_often() -> None:
    from deploy.app import GRACEFUL_SHUTDOWN_TIMEOUT_S, HEALTH_CHECK_PERIOD_S, build_app

    _, prefill, decode = _bound(build_app({}))
    for deployment in (prefill, decode):
        config = deployment._deployment_config
        assert config.health_check_period_s == HEALTH_CHECK_PERIOD_S <= 2
        assert config.health_check_timeout_s > 5  # longer than one worker probe may wait
        assert config.graceful_shutdown_timeout_s == GRACEFUL_SHUTDOWN_TIMEOUT_S
