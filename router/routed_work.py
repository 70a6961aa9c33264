"""Work the router has sent to each replica, which the replica's own report may not show yet.

Ray Serve refreshes a replica's routing stats (its queued prefill tokens, its running sequences)
every ``request_routing_stats_period_s``. Between two refreshes every request routed sees the
same figures, so a burst would all go to whichever replica looked best at the last refresh. The
router knows what it sent. ``RoutedWork`` keeps, per request, the prefill tokens it sent to a
prefill replica (or to its decode replica, for a local prefill) until they are computed, and
the sequence it sent to a decode replica until the request is over. ``load`` merges that into a
replica's report, taking the larger of the two for each figure: the report also counts what
other ingress replicas sent, the ledger what is still on its way.

A replica that has not measured its prefill speed yet (a new one) is given its pool's mean
measured speed (``fill_speeds``), so that it is neither favoured nor avoided because its
figure is missing.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping

from router.policy import ReplicaLoad

# An entry whose request never reported its end is dropped after this long.
TTL_S = 600.0


@dataclasses.dataclass
class _Sent:
    sent_s: float
    prefill_id: str | None = None  # where its prompt is computed (a decode replica if local)
    prefill_tokens: int = 0  # 0 once computed
    decode_id: str | None = None


class RoutedWork:
    def __init__(self, ttl_s: float = TTL_S) -> None:
        self.ttl_s = ttl_s
        self._sent: dict[str, _Sent] = {}  # request id -> what went where, oldest first
        self._tokens: Counter[str] = Counter()  # replica -> prefill tokens not computed yet
        self._sequences: Counter[str] = Counter()  # replica -> sequences not finished

    def __len__(self) -> int:
        return len(self._sent)

    def prefill(self, request_id: str, replica_id: str, tokens: int, now_s: float) -> None:
        """``tokens`` of ``request_id`` are to be computed on ``replica_id`` (a retry moves
        them)."""
        sent = self._entry(request_id, now_s)
        self._take_tokens(sent)
        sent.prefill_id, sent.prefill_tokens = replica_id, tokens
        self._tokens[replica_id] += tokens

    def decode(self, request_id: str, replica_id: str, now_s: float) -> None:
        """``request_id`` decodes on ``replica_id`` (a retry moves it)."""
        sent = self._entry(request_id, now_s)
        if sent.decode_id is not None:
            _decrement(self._sequences, sent.decode_id, 1)
        sent.decode_id = replica_id
        self._sequences[replica_id] += 1

    def prefill_done(self, request_id: str) -> None:
        """The prompt of ``request_id`` was computed, or its prefill call ended."""
        sent = self._sent.get(request_id)
        if sent is not None:
            self._take_tokens(sent)

    def done(self, request_id: str) -> None:
        """``request_id`` is over: forget it."""
        sent = self._sent.pop(request_id, None)
        if sent is None:
            return
        self._take_tokens(sent)
        if sent.decode_id is not None:
            _decrement(self._sequences, sent.decode_id, 1)

    def placed(self, request_id: str) -> tuple[str | None, str | None]:
        """Where ``request_id``'s prompt is computed and where it decodes (None: not known)."""
        sent = self._sent.get(request_id)
        return (None, None) if sent is None else (sent.prefill_id, sent.decode_id)

    def expire(self, now_s: float) -> None:
        """Forget requests sent more than ``ttl_s`` ago (whose end was never reported)."""
        while self._sent:
            request_id, sent = next(iter(self._sent.items()))
            if now_s - sent.sent_s <= self.ttl_s:
                return
            self.done(request_id)

    def load(self, replica_id: str, reported: ReplicaLoad) -> ReplicaLoad:
        """``reported`` raised to what this router sent ``replica_id`` and is not done."""
        tokens, sequences = self._tokens[replica_id], self._sequences[replica_id]
        unseen = sequences - reported.num_running - reported.num_waiting
        if tokens <= reported.queued_prefill_tokens and unseen <= 0:
            return reported
        return dataclasses.replace(  # a sequence on its way will run there
            reported,
            queued_prefill_tokens=max(reported.queued_prefill_tokens, tokens),
            num_running=reported.num_running + max(0, unseen),
        )

    def _entry(self, request_id: str, now_s: float) -> _Sent:
        self.expire(now_s)
        sent = self._sent.get(request_id)
        if sent is None:
            sent = self._sent[request_id] = _Sent(now_s)
        return sent

    def _take_tokens(self, sent: _Sent) -> None:
        if sent.prefill_id is not None and sent.prefill_tokens:
            _decrement(self._tokens, sent.prefill_id, sent.prefill_tokens)
        sent.prefill_tokens = 0


def _decrement(counter: Counter[str], key: str, amount: int) -> None:
    counter[key] -= amount
    if counter[key] <= 0:
        del counter[key]


def fill_speeds(loads: Mapping[str, ReplicaLoad]) -> dict[str, ReplicaLoad]:
    """``loads`` with each unmeasured prefill speed set to the mean of the measured ones (as
    is when none is measured)."""
    measured = [load.prefill_tokens_per_s for load in loads.values()
                if load.prefill_tokens_per_s > 0]
    if not measured or len(measured) == len(loads):
        return dict(loads)
    mean = sum(measured) / len(measured)
    return {rid: load if load.prefill_tokens_per_s > 0 else
            dataclasses.replace(load, prefill_tokens_per_s=mean)
            for rid, load in loads.items()}
