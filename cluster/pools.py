"""Resource pools: where prefill and decode replicas, and each replica's workers, may run.

A pool is placed by custom resource (each replica asks for the pool's own ``pdserve_prefill``
or ``pdserve_decode`` unless the config names others), by node labels (a Ray label selector),
or by accelerator type, as its config says; on one CPU machine the local cluster gets both
pool resources and the engines are pinned to different cores.

A replica with more than one worker (TP x PP > 1) gets a placement group through Ray Serve:
bundle 0 holds the replica actor (and the engine-core process it starts), then one bundle per
worker. With vLLM's Ray executor (GPU pools) each worker bundle holds one GPU, which is what
vLLM's executor looks for in the group it is handed: it starts one worker in each bundle that
has a GPU, ranks the workers by node (the replica's node first), and so gives each PP stage
the TP workers of one node. Bundle 0 has no GPU, so vLLM never puts a worker there. With the
``mp`` executor (CPU pools) the worker bundles reserve CPUs on the replica's node. Every
bundle carries a share of the pool's resources, its accelerator type and its label selector,
so no worker of a replica lands outside the replica's pool; the shares add up to the
replica's configured amount, so a node offering one unit of the pool's resource holds one
replica, workers and all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.config import PDConfig, PoolConfig

ROLES = ("prefill", "decode")
# What a worker bundle asks of each of the pool's resources: enough to need a node of the
# pool. Bundle 0 asks the rest, so a replica takes exactly its configured amount in all.
WORKER_RESOURCE_SHARE = 0.001


def pool_resource(role: str) -> str:
    return f"pdserve_{role}"


def accelerator_resource(accelerator_type: str) -> str:
    """The resource Ray gives a node with ``accelerator_type`` (what ``accelerator_type=``
    in actor options asks for)."""
    return f"accelerator_type:{accelerator_type}"


def replica_resources(pool: PoolConfig, role: str) -> dict[str, float]:
    """The custom resources one replica of ``pool`` asks for: the config's, else none for a
    pool placed by labels, else the pool's own resource."""
    if pool.resources or pool.label_selector:
        return dict(pool.resources)
    return {pool_resource(role): 1}


def replica_bundle_resources(pool: PoolConfig, role: str) -> dict[str, float]:
    """What the replica itself asks of the pool's resources: all of them, or, in a placement
    group, what its workers' shares leave (a node offering 1 unit holds a whole replica)."""
    resources = replica_resources(pool, role)
    if not uses_placement_group(pool):
        return resources
    workers = WORKER_RESOURCE_SHARE * pool.engine.world_size
    return {name: round(amount - workers, 4) for name, amount in resources.items()}


def uses_placement_group(pool: PoolConfig) -> bool:
    """A replica with more than one worker reserves them a placement group."""
    return pool.engine.world_size > 1


def uses_ray_executor(pool: PoolConfig) -> bool:
    return pool.engine.distributed_executor_backend == "ray"


def replica_actor_options(pool: PoolConfig, role: str,
                          env_vars: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``ray_actor_options`` for one replica of ``pool``; ``env_vars`` become the replica's
    environment (its ``runtime_env``), which the processes it starts inherit. In a placement
    group the accelerator type and label selector are on the bundles instead."""
    options: dict[str, Any] = {"num_cpus": pool.num_cpus,
                               "resources": replica_bundle_resources(pool, role)}
    if env_vars:
        options["runtime_env"] = {"env_vars": dict(env_vars)}
    if pool.num_gpus and not uses_ray_executor(pool):
        options["num_gpus"] = pool.num_gpus
    if uses_placement_group(pool):
        return options
    if pool.accelerator_type:
        options["accelerator_type"] = pool.accelerator_type
    if pool.label_selector:
        options["label_selector"] = dict(pool.label_selector)
    return options


def placement_bundles(pool: PoolConfig, role: str) -> list[dict[str, float]]:
    """One replica's placement group: the replica's bundle, then one bundle per worker."""
    replica = {"CPU": pool.num_cpus, **replica_bundle_resources(pool, role)}
    worker = {"CPU": pool.num_cpus_per_worker,
              **dict.fromkeys(replica_resources(pool, role), WORKER_RESOURCE_SHARE)}
    if uses_ray_executor(pool):
        worker["GPU"] = 1
    elif pool.num_gpus:
        replica["GPU"] = pool.num_gpus  # mp workers use the replica actor's GPUs
    if pool.accelerator_type:
        replica[accelerator_resource(pool.accelerator_type)] = WORKER_RESOURCE_SHARE
        worker[accelerator_resource(pool.accelerator_type)] = WORKER_RESOURCE_SHARE
    bundles = [replica] + [dict(worker) for _ in range(pool.engine.world_size)]
    bundles = [{name: amount for name, amount in bundle.items() if amount} for bundle in bundles]
    # Ray refuses an empty bundle: a replica that asks for nothing (placed by labels alone,
    # no CPUs) still needs its bundle 0.
    bundles[0] = bundles[0] or {"CPU": WORKER_RESOURCE_SHARE}
    return bundles


def placement_group_options(pool: PoolConfig, role: str) -> dict[str, Any]:
    """Ray Serve's placement-group options for ``pool``'s deployment (none for replicas of
    one worker): the bundles, STRICT_PACK (one node) unless the pool lets PP stages span
    nodes (PACK), and the pool's label selector for every bundle."""
    if not uses_placement_group(pool):
        return {}
    options: dict[str, Any] = {
        "placement_group_bundles": placement_bundles(pool, role),
        "placement_group_strategy": "PACK" if pool.pipeline_across_nodes else "STRICT_PACK",
    }
    if pool.label_selector:
        options["placement_group_bundle_label_selector"] = [dict(pool.label_selector)]
    return options


def deployment_options(pool: PoolConfig, role: str,
                       env_vars: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Where one replica of ``pool`` runs, as ``serve.deployment`` options."""
    return {"ray_actor_options": replica_actor_options(pool, role, env_vars),
            **placement_group_options(pool, role)}


def local_resources(cfg: PDConfig) -> dict[str, float]:
    """Custom resources a one-machine cluster needs to place every replica of ``cfg``,
    workers' bundles included."""
    resources: dict[str, float] = {}
    for role in ROLES:
        pool = getattr(cfg, role)
        bundles = placement_bundles(pool, role) if uses_placement_group(pool) \
            else [replica_resources(pool, role)]
        for bundle in bundles:
            for name, amount in bundle.items():
                if name not in ("CPU", "GPU"):
                    resources[name] = resources.get(name, 0) + amount * pool.num_replicas
    # Ray counts resources in ten-thousandths: a sum rounded down would fall one unit short.
    return {name: round(amount, 4) for name, amount in resources.items()}


def local_num_cpus(cfg: PDConfig) -> float:
    """Logical CPUs every replica of ``cfg`` and their workers' bundles reserve together."""
    total = 0.0
    for role in ROLES:
        pool = getattr(cfg, role)
        per_replica = sum(bundle.get("CPU", 0) for bundle in placement_bundles(pool, role)) \
            if uses_placement_group(pool) else pool.num_cpus
        total += per_replica * pool.num_replicas
    return total
