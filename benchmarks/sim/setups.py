"""Router setups the simulator compares: a policy per pool plus the pairing settings.

A setup is plain configuration; the policies are built by ``router.policies.make_policy`` and
paired by ``router.pairing.PairSelector``, exactly as the router does. The baselines never
prefill on a decode replica (neither SGLang's nor Ray Serve's router does). ``cache_cost`` is
the router as shipped: it is built from the defaults of ``cluster.config.RouterConfig``, so the
simulator measures the configuration a deployment runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cluster.config import RouterConfig
from router.pairing import PairingSettings


@dataclasses.dataclass(frozen=True)
class RouterSetup:
    prefill_policy: str
    decode_policy: str
    prefill_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    decode_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    pairing: PairingSettings = dataclasses.field(
        default_factory=lambda: PairingSettings(enable_local_prefill=False)
    )


def shipped_setup(config: RouterConfig | None = None, seed: int = 0) -> RouterSetup:
    """The router as the config model ships it (its policies, their settings, the pairing),
    with a seeded tie-break so that a run can be repeated."""
    config = config or RouterConfig()
    return RouterSetup(
        config.prefill_policy,
        config.decode_policy,
        {"seed": seed, **config.policy_kwargs("prefill")},
        {"seed": seed, **config.policy_kwargs("decode")},
        PairingSettings(**config.pairing),
    )


SETUPS: dict[str, RouterSetup] = {
    "cache_cost": shipped_setup(),
    "sglang_cache_aware": RouterSetup("sglang_cache_aware", "sglang_cache_aware"),
    "ray_prefix_affinity": RouterSetup(
        "ray_prefix_affinity", "ray_prefix_affinity", {"seed": 0}, {"seed": 1}
    ),
    "least_loaded": RouterSetup("least_loaded", "least_loaded", {"seed": 0}, {"seed": 1}),
    "round_robin": RouterSetup("round_robin", "round_robin"),
}
