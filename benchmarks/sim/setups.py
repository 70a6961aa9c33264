"""Router setups the simulator compares: a policy per pool plus the pairing settings.

A setup is plain configuration; the policies are built by ``router.policies.make_policy`` and
paired by ``router.pairing.PairSelector``, exactly as the router does. The baselines never
prefill on a decode replica (neither SGLang's nor Ray Serve's router does).
"""

from __future__ import annotations

import dataclasses
from typing import Any

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


# Our settings (defaults of CacheCostSettings and PairingSettings unless listed). Prefill pool:
# least uncached prompt within a load band of 1.5x the mean queued prefill tokens + 8192. Decode
# pool: a running sequence weighs 256 tokens and the band is tighter (1.2x + 16 sequences), so
# running sequences stay even while a conversation stays where its history is cached.
CACHE_COST_PREFILL: dict[str, Any] = {"seed": 0}
CACHE_COST_DECODE: dict[str, Any] = {
    "running_seq_tokens": 256.0,
    "load_bound_rel": 1.2,
    "load_bound_abs": 4096.0,
    "seed": 0,
}
CACHE_COST_PAIRING = PairingSettings()

SETUPS: dict[str, RouterSetup] = {
    "cache_cost": RouterSetup(
        "cache_cost", "cache_cost", CACHE_COST_PREFILL, CACHE_COST_DECODE, CACHE_COST_PAIRING
    ),
    "sglang_cache_aware": RouterSetup("sglang_cache_aware", "sglang_cache_aware"),
    "ray_prefix_affinity": RouterSetup(
        "ray_prefix_affinity", "ray_prefix_affinity", {"seed": 0}, {"seed": 1}
    ),
    "least_loaded": RouterSetup("least_loaded", "least_loaded", {"seed": 0}, {"seed": 1}),
    "round_robin": RouterSetup("round_robin", "round_robin"),
}
