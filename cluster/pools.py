"""Resource pools: where prefill and decode replicas may run.

Each pool's replicas ask Ray for the pool's own custom resource (``pdserve_prefill`` or
``pdserve_decode``) unless the config names others, so the two kinds never share a device: on a
GPU cluster give each node (or GPU) the pool resource it belongs to, or use accelerator types;
on one CPU machine the local cluster gets both resources and the engines are pinned to
different cores.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deploy.config import PDConfig, PoolConfig

ROLES = ("prefill", "decode")


def pool_resource(role: str) -> str:
    return f"pdserve_{role}"


def replica_actor_options(pool: PoolConfig, role: str,
                          env_vars: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``ray_actor_options`` for one replica of ``pool``; ``env_vars`` become the replica's
    environment (its ``runtime_env``), which the processes it starts inherit."""
    options: dict[str, Any] = {
        "num_cpus": pool.num_cpus,
        "resources": dict(pool.resources) or {pool_resource(role): 1},
    }
    if env_vars:
        options["runtime_env"] = {"env_vars": dict(env_vars)}
    if pool.num_gpus:
        options["num_gpus"] = pool.num_gpus
    if pool.accelerator_type:
        options["accelerator_type"] = pool.accelerator_type
    return options


def local_resources(cfg: PDConfig) -> dict[str, float]:
    """Custom resources a one-machine cluster needs to place every replica of ``cfg``."""
    resources: dict[str, float] = {}
    for role in ROLES:
        pool = getattr(cfg, role)
        for name, amount in (dict(pool.resources) or {pool_resource(role): 1}).items():
            resources[name] = resources.get(name, 0) + amount * pool.num_replicas
    return resources
