"""Resource pools: which Ray resources prefill and decode replicas ask for."""

from __future__ import annotations

import pytest

from cluster.config import PDConfig, PoolConfig
from cluster.pools import local_resources, pool_resource, replica_actor_options


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_default_asks_for_the_pool_resource(role: str) -> None:
    options = replica_actor_options(PoolConfig(), role)
    assert options == {"num_cpus": 0, "resources": {f"pdserve_{role}": 1}}
    assert pool_resource(role) == f"pdserve_{role}"


def test_custom_resources_replace_the_pool_resource() -> None:
    pool = PoolConfig(resources={"node_a": 0.5, "fast_disk": 1}, num_cpus=2)
    options = replica_actor_options(pool, "prefill")
    assert options == {"num_cpus": 2, "resources": {"node_a": 0.5, "fast_disk": 1}}


def test_options_do_not_share_the_config_dict() -> None:
    pool = PoolConfig(resources={"node_a": 1})
    replica_actor_options(pool, "decode")["resources"]["node_a"] = 99
    assert pool.resources == {"node_a": 1}


def test_gpu_pool() -> None:
    pool = PoolConfig(num_gpus=2, accelerator_type="H100", num_cpus=4)
    options = replica_actor_options(pool, "decode")
    assert options == {
        "num_cpus": 4,
        "num_gpus": 2,
        "accelerator_type": "H100",
        "resources": {"pdserve_decode": 1},
    }


def test_accelerator_type_without_gpus_in_config() -> None:
    options = replica_actor_options(PoolConfig(accelerator_type="A10G"), "prefill")
    assert options["accelerator_type"] == "A10G"
    assert "num_gpus" not in options


def test_local_resources_sum_the_pools() -> None:
    cfg = PDConfig.model_validate(
        {"prefill": {"num_replicas": 2}, "decode": {"num_replicas": 3}}
    )
    assert local_resources(cfg) == {"pdserve_prefill": 2, "pdserve_decode": 3}


def test_local_resources_default() -> None:
    assert local_resources(PDConfig()) == {"pdserve_prefill": 1, "pdserve_decode": 1}


def test_local_resources_merge_shared_custom_resources() -> None:
    cfg = PDConfig.model_validate({
        "prefill": {"num_replicas": 2, "resources": {"big_node": 0.25, "pf": 1}},
        "decode": {"num_replicas": 4, "resources": {"big_node": 0.5}},
    })
    # big_node: 2 x 0.25 + 4 x 0.5; the pools' own resources are not asked for.
    assert local_resources(cfg) == {"big_node": 2.5, "pf": 2}


def test_env_vars_become_the_replicas_runtime_env() -> None:
    env = {"PDSERVE_KV_SECRET": "ab" * 32}
    options = replica_actor_options(PoolConfig(), "prefill", env)
    assert options["runtime_env"] == {"env_vars": env}
    options["runtime_env"]["env_vars"]["X"] = "1"
    assert env == {"PDSERVE_KV_SECRET": "ab" * 32}
    assert "runtime_env" not in replica_actor_options(PoolConfig(), "prefill", {})
