"""Prompts a policy sent to each replica that have not finished yet.

The KV index knows a prompt is cached only once the replica has computed it. A request sent to
the same replica while the first is still queued or running finds those blocks cached by the
time it runs (a replica's queue is first come, first served), so a cache-aware policy counts
them too: an agent's next step, or the next turn of a conversation under load, follows its
prefix instead of scattering while the index has not seen it yet.

``add`` when a request is routed, ``remove`` when it is done; entries older than ``ttl_s`` are
dropped (a request whose completion was never reported). To keep a routing decision cheap, only
every ``sample_tokens``-th token's block is recorded: a chained hash stands for its whole prefix,
so matching those blocks gives the shared prefix to within ``sample_tokens``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class _Routed:
    replica_id: str
    samples: tuple[int, ...]  # the chained hashes at the sampled positions
    added_s: float


class InFlightPrompts:
    def __init__(self, ttl_s: float, sample_tokens: int = 256) -> None:
        self.ttl_s = ttl_s
        self.sample_tokens = sample_tokens
        self._routed: dict[str, _Routed] = {}  # request id -> where it went, in insertion order
        self._holders: dict[int, dict[str, int]] = {}  # sampled hash -> replica -> requests

    def __len__(self) -> int:
        return len(self._routed)

    def stride(self, block_size: int) -> int:
        """Blocks between two sampled positions."""
        return max(1, self.sample_tokens // max(1, block_size))

    def add(
        self, request_id: str, replica_id: str, hashes: Sequence[int], block_size: int,
        now_s: float,
    ) -> None:
        """Record that ``request_id`` (block ``hashes``) was sent to ``replica_id``."""
        self.expire(now_s)
        self.remove(request_id)
        stride = self.stride(block_size)
        routed = _Routed(replica_id, tuple(hashes[stride - 1 :: stride]), now_s)
        self._routed[request_id] = routed
        for sample in routed.samples:
            holders = self._holders.setdefault(sample, {})
            holders[replica_id] = holders.get(replica_id, 0) + 1

    def remove(self, request_id: str) -> None:
        routed = self._routed.pop(request_id, None)
        if routed is None:
            return
        replica_id = routed.replica_id
        for sample in routed.samples:
            holders = self._holders[sample]
            if holders[replica_id] > 1:
                holders[replica_id] -= 1
                continue
            del holders[replica_id]
            if not holders:
                del self._holders[sample]

    def expire(self, now_s: float) -> None:
        """Forget requests routed more than ``ttl_s`` ago."""
        while self._routed:
            request_id, routed = next(iter(self._routed.items()))
            if now_s - routed.added_s <= self.ttl_s:
                return
            self.remove(request_id)

    def matched_blocks(self, hashes: Sequence[int], block_size: int) -> dict[str, int]:
        """Leading blocks of ``hashes`` each replica will hold once its routed prompts ran
        (rounded down to a sampled position)."""
        matched: dict[str, int] = {}
        holders = self._holders
        stride = self.stride(block_size)
        for depth in range(stride, len(hashes) + 1, stride):
            replicas = holders.get(hashes[depth - 1])
            if not replicas:
                break
            for replica_id in replicas:  # a chained hash implies the whole prefix before it
                matched[replica_id] = depth
        return matched
