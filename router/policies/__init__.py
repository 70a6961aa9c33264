"""Routing policies, looked up by name without importing them all (a lazy registry)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from router.policy import RoutingPolicy

# name -> "module:Class"; importing this package imports none of them.
POLICIES: dict[str, str] = {
    "round_robin": "router.policies.round_robin:RoundRobinPolicy",
    "least_loaded": "router.policies.least_loaded:LeastLoadedPolicy",
    "cache_cost": "router.policies.cache_cost:CacheCostPolicy",
    "sglang_cache_aware": "router.policies.sglang_cache_aware:SGLangCacheAwarePolicy",
    "ray_prefix_affinity": "router.policies.ray_prefix_affinity:RayPrefixAffinityPolicy",
}


def make_policy(name: str, **kwargs: Any) -> RoutingPolicy:
    """Build the policy registered under ``name`` with ``kwargs`` as its settings."""
    try:
        target = POLICIES[name]
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown routing policy {name!r}; known: {known}") from None
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**kwargs)
