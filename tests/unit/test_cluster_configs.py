"""deploy/configs: every setup's Serve config, Ray cluster launcher config and KubeRay
RayService, checked with Ray's own schemas, the config model, and against each other."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.config import PDConfig
from cluster.pools import ROLES, replica_resources

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SETUPS = sorted(path.name for path in (DEPLOY / "configs").iterdir() if path.is_dir())


def load(setup: str, name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "configs" / setup / name).read_text())


def app_config(serve_config: dict[str, Any]) -> PDConfig:
    from ray.serve.schema import ServeDeploySchema

    (app,) = ServeDeploySchema.model_validate(serve_config).applications
    assert app.import_path == "deploy.app:build_app"
    return PDConfig.from_args(app.args)


def test_every_setup_is_here() -> None:
    assert SETUPS == ["gpu-cluster", "one-node", "two-node-cpu"]
    for setup in SETUPS:
        assert {p.name for p in (DEPLOY / "configs" / setup).iterdir()} == {
            "serve.yaml", "cluster.yaml", "rayservice.yaml"}


@pytest.mark.parametrize("setup", SETUPS)
def test_serve_config_builds_the_app(setup: str) -> None:
    """Ray's Serve schema accepts the file, the config model its args, and Ray Serve the
    deployments they make (placement groups included)."""
    from ray.serve.config import gRPCOptions

    from deploy.app import build_app_from_config, grpc_options

    serve_config = load(setup, "serve.yaml")
    cfg = app_config(serve_config)
    assert serve_config["grpc_options"] == grpc_options()
    assert gRPCOptions(**serve_config["grpc_options"]).grpc_servicer_func_callable
    assert serve_config["http_options"]["host"] == "0.0.0.0"  # reachable from the cluster
    router = build_app_from_config(cfg)._bound_deployment
    assert [arg._bound_deployment.name for arg in router.init_args[:2]] == list(ROLES)


def test_one_node_is_the_local_default() -> None:
    local = yaml.safe_load((DEPLOY / "local.yaml").read_text())
    assert local["applications"] == load("one-node", "serve.yaml")["applications"]
    assert local["grpc_options"] == load("one-node", "serve.yaml")["grpc_options"]


def test_gpu_cluster_places_each_pool_its_own_way() -> None:
    cfg = app_config(load("gpu-cluster", "serve.yaml"))
    assert cfg.device == "cuda"
    assert (cfg.prefill.num_replicas, cfg.decode.num_replicas) == (4, 2)
    assert (cfg.prefill.engine.tensor_parallel_size, cfg.decode.engine.tensor_parallel_size,
            cfg.decode.engine.pipeline_parallel_size) == (2, 4, 2)
    assert cfg.prefill.pipeline_across_nodes and not cfg.decode.pipeline_across_nodes
    assert cfg.prefill.engine.distributed_executor_backend == "ray"
    assert (cfg.prefill.accelerator_type, cfg.decode.accelerator_type) == ("L40S", "H100")
    assert cfg.decode.label_selector == {"pdserve-pool": "decode"}


@pytest.mark.parametrize("setup", SETUPS)
def test_rayservice_serves_the_same_config(setup: str) -> None:
    import ray

    service = load(setup, "rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config == load(setup, "serve.yaml")
    assert app_config(serve_config) == app_config(load(setup, "serve.yaml"))


@pytest.mark.parametrize("setup", SETUPS)
def test_cluster_launcher_config_is_valid(setup: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(setup, "cluster.yaml")))


def _start_flags(command: str) -> dict[str, str]:
    """The ``--name=value`` flags of a ``ray start`` command line."""
    words = shlex.split(command.replace(";", " "))
    return dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)


def launcher_nodes(cluster: dict[str, Any]) -> list[tuple[dict[str, float], dict[str, str]]]:
    """(custom resources, labels) of each kind of node the launcher starts."""
    from ray._private.label_utils import parse_node_labels_string

    if "available_node_types" in cluster:
        return [(kind.get("resources", {}), kind.get("labels", {}))
                for kind in cluster["available_node_types"].values()]
    nodes = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        flags = _start_flags(" ".join(cluster.get(key, [])))
        if flags or key == "head_start_ray_commands":
            nodes.append((json.loads(flags.get("resources", "{}")),
                          parse_node_labels_string(flags.get("labels", ""))))
    return nodes


def rayservice_nodes(service: dict[str, Any]) -> list[tuple[dict[str, float], dict[str, str]]]:
    """(custom resources, labels) of each group of pods the RayService starts."""
    from ray._private.label_utils import parse_node_labels_string

    spec = service["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [(json.loads(json.loads(g["rayStartParams"].get("resources", '"{}"'))),
             parse_node_labels_string(g["rayStartParams"].get("labels", "")))
            for g in groups]


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("kind", ["cluster.yaml", "rayservice.yaml"])
def test_every_pool_has_nodes_and_no_node_has_both(setup: str, kind: str) -> None:
    cfg = app_config(load(setup, "serve.yaml"))
    nodes = (launcher_nodes if kind == "cluster.yaml" else rayservice_nodes)(load(setup, kind))

    def hosts(resources: dict[str, float], labels: dict[str, str], role: str) -> bool:
        pool = getattr(cfg, role)
        return all(resources.get(name, 0) >= amount
                   for name, amount in replica_resources(pool, role).items()) \
            and pool.label_selector.items() <= labels.items()

    for role in ROLES:
        assert any(hosts(*node, role) for node in nodes), f"{setup}/{kind}: no {role} node"
    shared = [node for node in nodes if all(hosts(*node, role) for role in ROLES)]
    assert bool(shared) == (setup == "one-node")
