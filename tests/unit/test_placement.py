"""Placement per replica: the Serve options a pool's replicas get, checked against Ray Serve's
own validation and against what vLLM's Ray executor expects of the placement group."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from cluster.config import PDConfig
from cluster.pools import (
    WORKER_RESOURCE_SHARE,
    deployment_options,
    local_num_cpus,
    local_resources,
    placement_bundles,
)

SHARE = WORKER_RESOURCE_SHARE


def make_config(device: str = "cpu", tp: int = 1, pp: int = 1, **pool: Any) -> PDConfig:
    """Both pools with the same engine layout and the same pool settings."""
    engine = {"tensor_parallel_size": tp, "pipeline_parallel_size": pp,
              "enforce_eager": pp == 1}  # CPU PP needs compiled mode
    return PDConfig.model_validate({
        "device": device,
        "prefill": {"engine": engine, **pool},
        "decode": {"engine": engine, **pool},
    })


def test_one_worker_replicas_get_no_placement_group() -> None:
    cfg = make_config(label_selector={"pdserve-pool": "prefill"})
    options = deployment_options(cfg.prefill, "prefill")
    # Placed by labels: the pool's own resource is not asked for.
    assert options == {"ray_actor_options": {
        "num_cpus": 0, "resources": {}, "label_selector": {"pdserve-pool": "prefill"}}}
    assert cfg.prefill.engine.distributed_executor_backend is None


def test_a_replica_placed_by_labels_alone_still_has_a_bundle() -> None:
    cfg = make_config(tp=2, label_selector={"pdserve-pool": "decode"})
    options = deployment_options(cfg.decode, "decode")
    assert options["placement_group_bundles"] == [{"CPU": SHARE}, {"CPU": 1}, {"CPU": 1}]
    assert options["placement_group_bundle_label_selector"] == [{"pdserve-pool": "decode"}]
    assert "label_selector" not in options["ray_actor_options"]


def test_a_cpu_replica_reserves_its_workers_on_one_node() -> None:
    cfg = make_config(tp=2, num_cpus_per_worker=0.5)
    assert cfg.decode.engine.distributed_executor_backend == "mp"
    options = deployment_options(cfg.decode, "decode")
    assert options == {
        "ray_actor_options": {"num_cpus": 0, "resources": {"pdserve_decode": 1 - 2 * SHARE}},
        "placement_group_bundles": [
            {"pdserve_decode": 1 - 2 * SHARE},  # a replica takes 1 in all
            {"CPU": 0.5, "pdserve_decode": SHARE},
            {"CPU": 0.5, "pdserve_decode": SHARE},
        ],
        "placement_group_strategy": "STRICT_PACK",
    }


def test_a_gpu_replica_gets_one_gpu_bundle_per_worker() -> None:
    cfg = make_config("cuda", tp=4, pp=2, num_cpus=1, num_gpus=8, accelerator_type="H100",
                      label_selector={"zone": "a"}, resources={"pdserve_decode": 1},
                      pipeline_across_nodes=True)
    pool = cfg.decode
    assert pool.engine.distributed_executor_backend == "ray"
    options = deployment_options(pool, "decode", {"X": "1"})
    # The workers hold the GPUs; accelerator and labels are asked of every bundle instead.
    assert options["ray_actor_options"] == {
        "num_cpus": 1, "resources": {"pdserve_decode": 1 - 8 * SHARE},
        "runtime_env": {"env_vars": {"X": "1"}}}
    replica, *workers = options["placement_group_bundles"]
    assert replica == {"CPU": 1, "pdserve_decode": 1 - 8 * SHARE, "accelerator_type:H100": SHARE}
    assert workers == [{"CPU": 1, "GPU": 1, "pdserve_decode": SHARE,
                        "accelerator_type:H100": SHARE}] * 8
    assert options["placement_group_strategy"] == "PACK"
    assert options["placement_group_bundle_label_selector"] == [{"zone": "a"}]


def test_custom_resources_reach_every_bundle() -> None:
    cfg = make_config(tp=2, resources={"node_a": 0.5, "fast_disk": 1})
    assert placement_bundles(cfg.prefill, "prefill") == [
        {"node_a": 0.5 - 2 * SHARE, "fast_disk": 1 - 2 * SHARE},
        {"CPU": 1, "node_a": SHARE, "fast_disk": SHARE},
        {"CPU": 1, "node_a": SHARE, "fast_disk": SHARE},
    ]


def test_mp_on_gpus_keeps_the_gpus_on_the_replica() -> None:
    engine = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
    cfg = PDConfig.model_validate({"device": "cuda", "prefill": {"engine": engine, "num_gpus": 2},
                                   "decode": {"engine": engine, "num_gpus": 2}})
    options = deployment_options(cfg.prefill, "prefill")
    assert options["ray_actor_options"]["num_gpus"] == 2
    assert options["placement_group_bundles"][0] == {"GPU": 2, "pdserve_prefill": 1 - 2 * SHARE}
    assert all("GPU" not in bundle for bundle in options["placement_group_bundles"][1:])


@pytest.mark.parametrize(("data", "message"), [
    ({"device": "cpu", "engine": {"distributed_executor_backend": "ray"}},
     "CPU build has no Ray executor"),
    ({"device": "cpu", "engine": {"pipeline_parallel_size": 2}, "pipeline_across_nodes": True},
     "pipeline_across_nodes needs PP > 1 and the Ray executor"),
    ({"device": "cuda", "engine": {"tensor_parallel_size": 2}, "pipeline_across_nodes": True},
     "pipeline_across_nodes needs PP > 1"),
    ({"device": "cuda", "engine": {"tensor_parallel_size": 2}, "num_gpus": 1},
     "num_gpus must be 0 or 2, not 1.0"),
])
def test_placement_rules(data: dict[str, Any], message: str) -> None:
    device = data.pop("device")
    with pytest.raises(ValidationError, match=message):
        PDConfig.model_validate({"device": device, "prefill": dict(data), "decode": dict(data)})


def test_resolved_backend_survives_a_round_trip() -> None:
    cfg = make_config("cuda", tp=2)
    assert PDConfig.model_validate(cfg.model_dump()) == cfg


def test_local_cluster_has_room_for_the_worker_bundles() -> None:
    cfg = PDConfig.model_validate({
        "prefill": {"num_replicas": 2, "engine": {"tensor_parallel_size": 2}},
        "decode": {"num_replicas": 1, "engine": {"tensor_parallel_size": 2}},
    })
    # Each replica takes exactly 1 of its pool's resource, its workers' shares included.
    assert local_resources(cfg) == {"pdserve_prefill": 2, "pdserve_decode": 1}
    assert local_num_cpus(cfg) == 6  # three replicas of two one-CPU workers
    assert local_num_cpus(PDConfig()) == 0


def _bound_pools(cfg: PDConfig) -> tuple[Any, Any]:
    from deploy.app import build_app_from_config

    router = build_app_from_config(cfg)._bound_deployment
    return tuple(arg._bound_deployment for arg in router.init_args[:2])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_ray_serve_accepts_the_options(device: str) -> None:
    """Binding runs Ray Serve's own checks: the bundles are valid, the replica fits bundle 0."""
    extra = {"num_gpus": 4, "accelerator_type": "H100", "pipeline_across_nodes": True} \
        if device == "cuda" else {}
    cfg = make_config(device, tp=2, pp=2, num_cpus=1, label_selector={"zone": "a"}, **extra)
    prefill, decode = _bound_pools(cfg)
    for deployment, role in ((prefill, "prefill"), (decode, "decode")):
        replica_config = deployment._replica_config
        assert replica_config.placement_group_bundles == placement_bundles(cfg.prefill, role)
        assert replica_config.placement_group_strategy == (
            "PACK" if device == "cuda" else "STRICT_PACK")
        assert replica_config.placement_group_bundle_label_selector == [{"zone": "a"}] * 5


def test_engine_flags_name_the_executor() -> None:
    from cluster.engine import engine_flags, parse_flags

    cfg = make_config("cuda", tp=2)
    args = parse_flags(engine_flags(cfg.prefill.engine, None))
    assert args.distributed_executor_backend == "ray"
    assert "--distributed-executor-backend" not in engine_flags(make_config().prefill.engine, None)


def test_the_engine_gets_the_replicas_placement_group(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.util

    from cluster.engine import use_replica_placement_group

    group = object()
    monkeypatch.setattr(ray.util, "get_current_placement_group", lambda: group)
    ray_config = SimpleNamespace(parallel_config=SimpleNamespace(
        distributed_executor_backend="ray", placement_group=None))
    use_replica_placement_group(ray_config)
    assert ray_config.parallel_config.placement_group is group
    mp_config = SimpleNamespace(parallel_config=SimpleNamespace(
        distributed_executor_backend="mp", placement_group=None))
    use_replica_placement_group(mp_config)
    assert mp_config.parallel_config.placement_group is None


def test_vllm_ranks_each_stage_on_one_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's own rank order over our bundles, placed as PACK places them on two 4-GPU
    nodes: a worker in every GPU bundle and none in the replica's; the replica's node first,
    so PP stage 0 is that node's TP group and stage 1 the other node's."""
    from vllm.platforms import current_platform
    from vllm.v1.executor import ray_utils

    cfg = make_config("cuda", tp=4, pp=2, pipeline_across_nodes=True)
    bundles = placement_bundles(cfg.prefill, "prefill")
    on_node = {0: "node-a", **{i: "node-b" for i in range(1, 5)},
               **{i: "node-a" for i in range(5, 9)}}
    group = SimpleNamespace(bundle_specs=bundles)
    monkeypatch.setattr(type(current_platform), "ray_device_key", "GPU")
    monkeypatch.setattr(ray_utils, "placement_group_table",
                        lambda pg: {"bundles_to_node_id": on_node}, raising=False)
    monkeypatch.setattr(ray_utils.ray, "nodes", lambda: [
        {"NodeID": node, "NodeManagerAddress": f"10.0.0.{i}", "Alive": True}
        for i, node in enumerate(("node-a", "node-b"))])
    monkeypatch.setattr(ray_utils.ray, "get_runtime_context",
                        lambda: SimpleNamespace(get_node_id=lambda: "node-a"))

    ranked = ray_utils.get_bundles_sorted_by_node(group)
    assert [bundle for bundle, _, _ in ranked] == [5, 6, 7, 8, 1, 2, 3, 4]  # bundle 0: none
    tp = cfg.prefill.engine.tensor_parallel_size
    stages = [{node for _, node, _ in ranked[s * tp:(s + 1) * tp]} for s in range(2)]
    assert stages == [{"node-a"}, {"node-b"}]
    assert all(bundles[b]["GPU"] == 1 for b, _, _ in ranked)  # vLLM refuses more than one
