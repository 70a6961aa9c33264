"""The global KV index: which replica (prefill or decode) holds which prompt block.

A radix tree over chained block hashes (``hashing.py``), flattened into one map from chain hash
to a bitmask of replicas (``index.py``, ``table.py``). The hashing and the map's loops are
compiled with numba (at import, cached on disk); imports no torch, vLLM or Ray.

Called by the router, in the ingress process, from its event loop, its KV-event subscriber thread
and Ray Serve's request-router threads; not thread-safe: the callers serialize every call (the
coordinator's lock).

Hashing (the request path)
    ``hash_token_blocks(token_ids, block_size, parent=None) -> list[int]``: chained hashes of the
    full blocks of a prompt; ``hash_token_blocks_array`` gives them as a ``uint64`` array, which
    ``match`` takes without a conversion. ``root_hash(lora_id)`` is the parent of a LoRA
    request's first block.

Queries (the request path)
    ``KVIndex.match(block_hashes) -> dict[replica_id, num_leading_blocks]``: longest cached prefix
    per replica; replicas holding none are absent. Read-only apart from expiring old guesses.
    ``num_blocks``, ``num_blocks_of(replica_id)``, ``chains_of(replica_id)``, ``stats()``,
    ``estimate_memory_bytes()``.

Engine events (the event subscriber; one call per event, in publication order per replica)
    ``apply(replica_id, event)`` with ``StoredBlocks`` / ``RemovedBlocks`` / ``AllCleared``, the
    plain mirrors of vLLM's ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``. Nodes are
    keyed on the index's own hashes, computed from the event's ``token_ids``; per replica, a map
    from engine hash to own hash lets ``RemovedBlocks`` (engine hashes only) be applied. A stored
    block whose parent the index never saw is dropped and counted (``stats().num_orphan_blocks``).
    ``insert(replica_id, block_hashes)`` / ``remove(replica_id, block_hashes)`` are the same
    updates given the index's own hashes (a chain from the root).

Event order (the event subscriber, per replica; ``stream.py``)
    ``ReplicaStream`` turns a publisher's numbered batches into actions (apply a batch, drop the
    replica's entries, ask for a replay): gaps, restarts and replays decided without sockets.

Fallback for replicas that publish no events (the router, after each routing decision)
    ``record_routed(replica_id, block_hashes, ttl_s)``: guess the replica now holds the prompt;
    the guess expires after ``ttl_s`` on the injected clock. ``is_event_fed(replica_id)`` and
    ``stats()`` say which replicas are event-fed and which are guessed; a guessed replica is
    logged once as a warning. A guessed replica that starts sending events becomes event-fed.

Membership (the router, when the replica set changes)
    ``add_replica(replica_id, is_event_fed=...)`` (optional: the first update registers a
    replica), ``clear_replica(replica_id)``, ``remove_replica(replica_id)``, ``replica_ids()``.

The index owns all of its state; callers keep no references into it. Inputs (hash lists, events)
are read, never kept, except the block hashes of a guess, copied into a tuple until it expires.
"""

from __future__ import annotations

from router.kvindex.events import AllCleared, EngineHash, KVEvent, RemovedBlocks, StoredBlocks
from router.kvindex.hashing import (
    ROOT_HASH,
    hash_token_blocks,
    hash_token_blocks_array,
    root_hash,
)
from router.kvindex.index import IndexStats, KVIndex
from router.kvindex.replicas import ReplicaMode

__all__ = [
    "ROOT_HASH",
    "AllCleared",
    "EngineHash",
    "IndexStats",
    "KVEvent",
    "KVIndex",
    "RemovedBlocks",
    "ReplicaMode",
    "StoredBlocks",
    "hash_token_blocks",
    "hash_token_blocks_array",
    "root_hash",
]
