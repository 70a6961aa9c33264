"""The contract every routing policy implements.

A policy picks one replica of one pool (prefill or decode) for one request. Prefill and decode get
separate policy instances, built by ``router.policies.make_policy`` from a name.

Called by the router, in the ingress process, on the event loop (never concurrently):

``select(candidates, ctx) -> Candidate``
    Required. ``candidates`` is non-empty and holds only live replicas of one pool. ``ctx`` carries
    every signal a policy may use (load, cache overlap, prompt size); a new signal is a new field
    of ``RoutingContext`` or ``ReplicaLoad``, never a new argument. Must not mutate ``candidates``.

``charged_tokens(choice, ctx) -> float``
    Optional, called right after ``select`` chose ``choice`` for ``ctx``: the prompt tokens the
    policy counted against it (by default its uncached tokens). The pairing compares them with
    what the decode replica would compute.

``on_request_done(replica_id, ctx)``
    Optional hook, called once when a request routed by this policy finished on ``replica_id``
    (successfully or not). Policies that keep their own bookkeeping update it here.

``on_replicas_changed(replica_ids)``
    Optional hook, called with the full set of live replica ids of the pool whenever it changes.
    Policies drop state kept for replicas that left.

A policy owns only its own bookkeeping; the KV index and the load figures belong to the router.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import ClassVar

# Prefill speed assumed for a replica that has not measured its own (prompt tokens per second).
NOMINAL_PREFILL_TOKENS_PER_S = 10000.0


@dataclasses.dataclass(frozen=True)
class ReplicaLoad:
    """Load figures one replica reports about itself (zero when unknown)."""

    num_running: int = 0
    num_waiting: int = 0
    queued_prefill_tokens: int = 0
    kv_usage: float = 0.0
    # Speeds the replica measured on its own engine steps (0 until it has measured them).
    prefill_tokens_per_s: float = 0.0  # prompt tokens computed per second of prefill
    decode_step_s: float = 0.0  # duration of an engine step that only decodes

    def prefill_speed(self, nominal_tokens_per_s: float) -> float:
        """Prompt tokens per second: measured, else ``nominal_tokens_per_s``."""
        return self.prefill_tokens_per_s or nominal_tokens_per_s


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One live replica a request may go to."""

    replica_id: str
    load: ReplicaLoad = ReplicaLoad()


@dataclasses.dataclass
class RoutingContext:
    """Everything a policy may know about the request being routed."""

    request_id: str
    num_prompt_tokens: int = 0
    block_size: int = 1
    prompt_token_ids: Sequence[int] | None = None
    # Number of leading prompt tokens already cached on each replica (from the KV index);
    # replicas absent from the map hold none.
    cached_tokens: Mapping[str, int] = dataclasses.field(default_factory=dict)
    # Chained hashes of the prompt's full blocks (``router.kvindex.hash_token_blocks``), for
    # policies that keep their own prefix bookkeeping.
    block_hashes: Sequence[int] = ()
    # Time of the decision in seconds on a monotonic clock; None: policies read time.monotonic().
    now_s: float | None = None
    # Routed again after a failed attempt: not a new use of its prefix.
    is_retry: bool = False

    def uncached_tokens(self, replica_id: str) -> int:
        """Prompt tokens the replica would have to compute for this request."""
        return max(0, self.num_prompt_tokens - self.cached_tokens.get(replica_id, 0))


class RoutingPolicy(abc.ABC):
    """Base class of routing policies; see the module docstring for the contract."""

    name: ClassVar[str]

    @abc.abstractmethod
    def select(self, candidates: Sequence[Candidate], ctx: RoutingContext) -> Candidate:
        """Return the candidate the request should go to."""

    def charged_tokens(self, choice: Candidate, ctx: RoutingContext) -> float:
        """Prompt tokens this policy counted against ``choice``, just selected for ``ctx``:
        its uncached tokens, unless the policy shares some of that cost with later requests
        (``cache_cost`` copying a hot prefix)."""
        return ctx.uncached_tokens(choice.replica_id)

    def on_request_done(self, replica_id: str, ctx: RoutingContext) -> None:  # noqa: B027
        """Hook: a request routed by this policy finished on ``replica_id``."""

    def on_replicas_changed(self, replica_ids: frozenset[str]) -> None:  # noqa: B027
        """Hook: the pool's live replica set is now ``replica_ids``."""
