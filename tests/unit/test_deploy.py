"""deploy/: the Serve config file and the app builder (no cluster needed to bind)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploy.config import PDConfig

LOCAL_YAML = Path(__file__).resolve().parents[2] / "deploy" / "local.yaml"


def test_local_yaml_is_a_valid_serve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(LOCAL_YAML.read_text()))
    (app,) = schema.applications
    assert app.import_path == "deploy.app:build_app"
    cfg = PDConfig.from_args(app.args)
    assert (cfg.prefill.cpu_cores, cfg.decode.cpu_cores) == ("0", "1")


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
        "role": "prefill", "policy": "cache_cost"}


def test_build_app_rejects_disagreeing_pools() -> None:
    from deploy.app import build_app

    with pytest.raises(ValueError, match="block_size"):
        build_app({"decode": {"engine": {"block_size": 64}}})
