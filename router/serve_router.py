"""Our routing policies inside Ray Serve's request routing.

``PolicyRequestRouter`` is a Ray Serve ``RequestRouter``: Serve hands it the live replicas of a
deployment and the pending request, it asks a ``router.policy.RoutingPolicy`` to pick one. Load
figures come from each replica's ``record_routing_stats``. The policy name and settings come from
``request_router_kwargs`` (see ``deploy/``), so prefill and decode get separate instances.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from router.policies import make_policy
from router.policy import Candidate, ReplicaLoad, RoutingContext


def load_of(routing_stats: dict[str, Any] | None) -> ReplicaLoad:
    stats = routing_stats or {}
    return ReplicaLoad(
        num_running=int(stats.get("num_running", 0)),
        num_waiting=int(stats.get("num_waiting", 0)),
        queued_prefill_tokens=int(stats.get("queued_prefill_tokens", 0)),
        kv_usage=float(stats.get("kv_usage", 0.0)),
    )


class PolicyRequestRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, policy: str = "least_loaded",
                         policy_kwargs: dict[str, Any] | None = None, **_: Any) -> None:
        self._policy = make_policy(policy, **(policy_kwargs or {}))
        self._replica_ids: frozenset[str] = frozenset()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ids = frozenset(by_id)
        if ids != self._replica_ids:
            self._replica_ids = ids
            self._policy.on_replicas_changed(ids)
        request_id = pending_request.metadata.request_id if pending_request else ""
        candidates = [Candidate(rid, load_of(r.routing_stats)) for rid, r in by_id.items()]
        choice = self._policy.select(candidates, RoutingContext(request_id=request_id))
        return [[by_id[choice.replica_id]]]
