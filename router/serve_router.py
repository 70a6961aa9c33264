"""Our routing inside Ray Serve's request routing.

``PolicyRequestRouter`` is a Ray Serve ``RequestRouter``: Serve hands it the live replicas of a
deployment and the pending request. It reports the replicas and their load (each replica's
``record_routing_stats``) to the ingress's ``RoutingCoordinator``, and sends the request to the
replica the coordinator pinned it to (the call's ``pin`` keyword). A request without a pin, or
pinned to a replica that is gone, goes where the pool's own policy (``request_router_kwargs``)
sends it, among the replicas the coordinator does not leave out as failed (all of them when it
leaves out every one: better a try than no answer).
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from router.coordinator import get_coordinator
from router.policies import make_policy
from router.policy import Candidate, ReplicaLoad, RoutingContext


def load_of(routing_stats: dict[str, Any] | None) -> ReplicaLoad:
    stats = routing_stats or {}
    return ReplicaLoad(
        num_running=int(stats.get("num_running", 0)),
        num_waiting=int(stats.get("num_waiting", 0)),
        queued_prefill_tokens=int(stats.get("queued_prefill_tokens", 0)),
        kv_usage=float(stats.get("kv_usage", 0.0)),
        prefill_tokens_per_s=float(stats.get("prefill_tokens_per_s", 0.0)),
        decode_step_s=float(stats.get("decode_step_s", 0.0)),
    )


class PolicyRequestRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, role: str = "decode", policy: str = "least_loaded",
                         policy_kwargs: dict[str, Any] | None = None, **_: Any) -> None:
        self._role = role
        self._policy = make_policy(policy, **(policy_kwargs or {}))
        self._replica_ids: frozenset[str] = frozenset()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        coordinator = get_coordinator()
        if coordinator is not None:
            coordinator.observe(self._role, {rid: r.routing_stats for rid, r in by_id.items()})
        pin = pending_request.kwargs.get("pin") if pending_request else None
        if pin in by_id:
            return [[by_id[pin]]]
        ids = frozenset(by_id)
        if ids != self._replica_ids:
            self._replica_ids = ids
            self._policy.on_replicas_changed(ids)
        request_id = pending_request.metadata.request_id if pending_request else ""
        candidates = [Candidate(rid, load_of(r.routing_stats)) for rid, r in by_id.items()]
        if coordinator is not None:
            candidates = [c for c in candidates
                          if coordinator.is_healthy(c.replica_id)] or candidates
        choice = self._policy.select(candidates, RoutingContext(request_id=request_id))
        return [[by_id[choice.replica_id]]]
