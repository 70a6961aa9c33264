"""How much local prefill a decode replica's running sequences can absorb.

A prefill on a decode replica stalls every sequence it is decoding for as long as the prefill
runs. To keep their mean inter-token latency within a target ``T``, a replica whose decode steps
take ``S`` may spend at most the fraction ``1 - S / T`` of its time prefilling. ``StallBudget``
holds that allowance per decode replica as a token bucket: it fills at that fraction of wall
time, holds at most ``window_s`` times it (the stall that can come at once: one window's worth),
and a local prefill is admitted only when its predicted stall fits in what is left.

Owned by one ``PairSelector`` in the router process; only that router's decisions spend it (a
deployment with several ingress replicas gives each its own budget).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class _Bucket:
    credit_s: float
    updated_s: float


class StallBudget:
    """Per decode replica: seconds of stall that local prefills may still add."""

    def __init__(self, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.window_s = window_s
        self._buckets: dict[str, _Bucket] = {}

    def credit_s(self, replica_id: str, fraction: float, now_s: float) -> float:
        """The stall ``replica_id`` may still take at ``now_s``, refilling at ``fraction``."""
        cap = fraction * self.window_s
        bucket = self._buckets.get(replica_id)
        if bucket is None:
            return cap
        return min(cap, bucket.credit_s + fraction * max(0.0, now_s - bucket.updated_s))

    def can_take(self, replica_id: str, stall_s: float, fraction: float, now_s: float) -> bool:
        return fraction > 0 and stall_s <= self.credit_s(replica_id, fraction, now_s)

    def take(self, replica_id: str, stall_s: float, fraction: float, now_s: float) -> None:
        """Spend ``stall_s`` of the replica's credit; it may go below zero (a debt the next
        local prefills wait out), as when a replica with nothing running takes a long one."""
        credit = self.credit_s(replica_id, fraction, now_s) - stall_s
        self._buckets[replica_id] = _Bucket(credit, now_s)
