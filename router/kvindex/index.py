"""``KVIndex``: which replica holds which block, as a radix tree flattened into one dict.

Because a chained hash identifies its whole prefix, the tree needs no child pointers: a node is
a dict entry ``chain hash -> bitmask of the replicas holding that block``, and walking a prompt's
hashes in order walks the tree from the root. A replica is one bit (a small slot number).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from functools import reduce
from itertools import repeat
from operator import or_

from router.kvindex.events import (
    TRACKED_MEDIA,
    AllCleared,
    EngineHash,
    KVEvent,
    RemovedBlocks,
    StoredBlocks,
)
from router.kvindex.expiry import ExpiryQueue
from router.kvindex.hashing import hash_token_blocks, root_hash
from router.kvindex.replicas import ReplicaMode, ReplicaState, SlotTable

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class IndexStats:
    """Counters for logs and metrics."""

    num_blocks: int
    num_replicas: int
    event_fed_replicas: tuple[str, ...]
    guessed_replicas: tuple[str, ...]
    num_orphan_blocks: int  # stored blocks dropped: their parent was unknown to the index
    num_ignored_events: int  # events about media the index does not track (CPU, storage)
    num_blocks_by_replica: dict[str, int]  # distinct blocks each registered replica holds


class KVIndex:
    """Global index of cached blocks across replicas; see ``router.kvindex`` for the API."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._masks: dict[int, int] = {}
        self._replicas: dict[str, ReplicaState] = {}
        self._slots = SlotTable()
        self._live_bits = 0
        self._expiry = ExpiryQueue()
        self._num_orphan_blocks = 0
        self._num_ignored_events = 0

    # -- replicas ---------------------------------------------------------------------------

    def add_replica(self, replica_id: str, *, is_event_fed: bool) -> None:
        """Declare a replica and where its blocks will be learnt from (idempotent)."""
        mode = ReplicaMode.EVENT_FED if is_event_fed else ReplicaMode.GUESSED
        rep = self._replicas.get(replica_id)
        if rep is None:
            self._register(replica_id, mode)
        elif rep.mode is not mode:
            self._switch_mode(rep, mode)

    def remove_replica(self, replica_id: str) -> None:
        """Forget a replica that left or died, and all it held."""
        rep = self._replicas.pop(replica_id, None)
        if rep is None:
            return
        self._clear(rep)
        rep.is_removed = True
        self._live_bits &= ~rep.bit
        self._slots.release(rep.slot)

    def clear_replica(self, replica_id: str) -> None:
        """Drop everything a replica holds; it stays registered."""
        rep = self._replicas.get(replica_id)
        if rep is not None:
            self._clear(rep)

    def replica_ids(self) -> list[str]:
        return list(self._replicas)

    def is_event_fed(self, replica_id: str) -> bool:
        """True if the replica's blocks come from its own KV events, False if guessed or unknown."""
        rep = self._replicas.get(replica_id)
        return rep is not None and rep.mode is ReplicaMode.EVENT_FED

    # -- event-fed updates ----------------------------------------------------------------------

    def insert(self, replica_id: str, block_hashes: Sequence[int]) -> None:
        """Record that a replica holds a chain of blocks (chained hashes from the root)."""
        rep = self._event_fed(replica_id)
        self._add_blocks(rep, block_hashes, block_hashes)

    def remove(self, replica_id: str, block_hashes: Iterable[int]) -> None:
        """Record that a replica evicted these blocks (chained hashes given to ``insert``)."""
        rep = self._replicas.get(replica_id)
        if rep is not None and rep.mode is ReplicaMode.EVENT_FED:
            self._remove_keys(rep, block_hashes)

    def apply(self, replica_id: str, event: KVEvent) -> None:
        """Apply one KV cache event published by a replica's engine."""
        if isinstance(event, StoredBlocks):
            self._apply_stored(replica_id, event)
        elif isinstance(event, RemovedBlocks):
            if event.medium not in TRACKED_MEDIA:
                self._num_ignored_events += 1
                return
            self._remove_keys(self._event_fed(replica_id), event.block_hashes)
        elif isinstance(event, AllCleared):
            self._clear(self._event_fed(replica_id))
        else:
            raise TypeError(f"not a KV event: {event!r}")

    # -- guessed updates ------------------------------------------------------------------------

    def record_routed(self, replica_id: str, block_hashes: Sequence[int], ttl_s: float) -> bool:
        """Guess that a replica holds the blocks of a prompt just routed to it, for ``ttl_s``.

        Returns False (and records nothing) if the replica publishes its own events.
        """
        rep = self._replicas.get(replica_id) or self._register(replica_id, ReplicaMode.GUESSED)
        if rep.mode is ReplicaMode.EVENT_FED:
            return False
        now = self._clock()
        self._expire(now)
        expiry = now + ttl_s
        masks, bit, held = self._masks, rep.bit, rep.expiry
        for chain in block_hashes:
            old = held.get(chain)
            if old is None:
                masks[chain] = masks.get(chain, 0) | bit
            elif old >= expiry:
                continue
            held[chain] = expiry
        if expiry != math.inf and block_hashes:
            self._expiry.push(expiry, rep, block_hashes)
        return True

    # -- queries ----------------------------------------------------------------------------

    def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """Number of leading blocks of ``block_hashes`` each replica holds (absent: none).

        A replica counts only blocks contiguous from the first one. Cost: one dict lookup and a
        few integer operations per block, plus one entry per replica in the result.
        """
        if self._expiry.has_due(now := self._clock()):
            self._expire(now)
        get = self._masks.get
        active = self._live_bits
        result: dict[str, int] = {}
        depth = 0
        for chain in block_hashes:
            kept = active & get(chain, 0)
            if kept != active:
                if depth:
                    self._credit(result, active ^ kept, depth)
                if not kept:
                    return result
                active = kept
            depth += 1
        if depth:
            self._credit(result, active, depth)
        return result

    @property
    def num_blocks(self) -> int:
        """Distinct blocks held by at least one replica."""
        self._expire(self._clock())
        return len(self._masks)

    def num_blocks_of(self, replica_id: str) -> int:
        self._expire(self._clock())
        rep = self._replicas.get(replica_id)
        return 0 if rep is None else rep.num_blocks

    def chains_of(self, replica_id: str) -> frozenset[int]:
        """The chained hashes of the blocks a replica holds (empty for an unknown replica)."""
        self._expire(self._clock())
        rep = self._replicas.get(replica_id)
        return frozenset() if rep is None else frozenset(rep.chains())

    def stats(self) -> IndexStats:
        self._expire(self._clock())
        reps = self._replicas.values()
        return IndexStats(
            num_blocks=len(self._masks),
            num_replicas=len(self._replicas),
            event_fed_replicas=tuple(r.replica_id for r in reps if r.mode is ReplicaMode.EVENT_FED),
            guessed_replicas=tuple(r.replica_id for r in reps if r.mode is ReplicaMode.GUESSED),
            num_orphan_blocks=self._num_orphan_blocks,
            num_ignored_events=self._num_ignored_events,
            num_blocks_by_replica={r.replica_id: r.num_blocks for r in reps},
        )

    def estimate_memory_bytes(self) -> int:
        """Rough size of the index: its dicts plus one int object per key and value they own."""
        total = sys.getsizeof(self._masks) + 2 * 32 * len(self._masks)
        for rep in self._replicas.values():
            total += sys.getsizeof(rep.blocks) + sys.getsizeof(rep.expiry)
            total += 32 * len(rep.blocks) + 24 * len(rep.expiry)
        return total

    # -- internals --------------------------------------------------------------------------

    def _register(self, replica_id: str, mode: ReplicaMode) -> ReplicaState:
        rep = ReplicaState(replica_id, self._slots.allocate(replica_id), mode)
        self._replicas[replica_id] = rep
        self._live_bits |= rep.bit
        if mode is ReplicaMode.GUESSED:
            logger.warning(
                "KV index: replica %s publishes no KV cache events; its cached blocks are "
                "guessed from routing decisions and expire",
                replica_id,
            )
        return rep

    def _switch_mode(self, rep: ReplicaState, mode: ReplicaMode) -> None:
        logger.info("KV index: replica %s switches to %s", rep.replica_id, mode.value)
        self._clear(rep)
        rep.mode = mode

    def _event_fed(self, replica_id: str) -> ReplicaState:
        rep = self._replicas.get(replica_id)
        if rep is None:
            return self._register(replica_id, ReplicaMode.EVENT_FED)
        if rep.mode is not ReplicaMode.EVENT_FED:
            self._switch_mode(rep, ReplicaMode.EVENT_FED)
        return rep

    def _apply_stored(self, replica_id: str, event: StoredBlocks) -> None:
        if event.medium not in TRACKED_MEDIA:
            self._num_ignored_events += 1
            return
        rep = self._event_fed(replica_id)
        if event.parent_block_hash is None:
            parent = root_hash(event.lora_id)
        else:
            parent = rep.blocks.get(event.parent_block_hash)
            if parent is None:
                self._num_orphan_blocks += len(event.block_hashes)
                return
        chains = hash_token_blocks(event.token_ids, event.block_size, parent)
        if len(chains) != len(event.block_hashes):
            raise ValueError(
                f"{len(event.block_hashes)} block hashes but {len(event.token_ids)} tokens "
                f"of block size {event.block_size}"
            )
        self._add_blocks(rep, event.block_hashes, chains)

    def _add_blocks(
        self, rep: ReplicaState, keys: Sequence[EngineHash], chains: Sequence[int]
    ) -> None:
        masks, blocks, bit = self._masks, rep.blocks, rep.bit
        if len(keys) == len(chains) and blocks.keys().isdisjoint(keys):
            # The common case, engine keys the replica did not hold: bulk dict operations (the
            # chains of one event are distinct, being the chain of one sequence).
            blocks.update(zip(keys, chains, strict=True))
            old_masks = list(map(masks.get, chains, repeat(0, len(chains))))
            masks.update(zip(chains, [mask | bit for mask in old_masks], strict=True))
            if reduce(or_, old_masks, 0) & bit:  # some chains it held under other keys
                extra = rep.extra_refs
                for chain, mask in zip(chains, old_masks, strict=True):
                    if mask & bit:
                        extra[chain] = extra.get(chain, 0) + 1
            return
        for key, chain in zip(keys, chains, strict=True):
            old = blocks.get(key)
            if old is not None:
                if old == chain:
                    continue
                self._drop_chain(rep, old)
            blocks[key] = chain
            mask = masks.get(chain, 0)
            if mask & bit:
                rep.extra_refs[chain] = rep.extra_refs.get(chain, 0) + 1
            else:
                masks[chain] = mask | bit

    def _remove_keys(self, rep: ReplicaState, keys: Iterable[EngineHash]) -> None:
        pop = rep.blocks.pop
        for key in keys:
            chain = pop(key, None)
            if chain is not None:
                self._drop_chain(rep, chain)

    def _drop_chain(self, rep: ReplicaState, chain: int) -> None:
        extra = rep.extra_refs.get(chain)
        if extra:
            if extra == 1:
                del rep.extra_refs[chain]
            else:
                rep.extra_refs[chain] = extra - 1
            return
        self._clear_bit(chain, rep.bit)

    def _clear_bit(self, chain: int, bit: int) -> None:
        mask = self._masks.get(chain, 0) & ~bit
        if mask:
            self._masks[chain] = mask
        else:
            self._masks.pop(chain, None)

    def _clear(self, rep: ReplicaState) -> None:
        for chain in rep.chains():
            self._clear_bit(chain, rep.bit)
        rep.reset()

    def _expire(self, now: float) -> None:
        for expiry, rep, chains in self._expiry.pop_due(now):
            held = rep.expiry
            for chain in chains:
                if held.get(chain) == expiry:  # not refreshed since
                    del held[chain]
                    self._clear_bit(chain, rep.bit)

    def _credit(self, result: dict[str, int], bits: int, depth: int) -> None:
        ids = self._slots.ids
        while bits:
            low = bits & -bits
            result[ids[low.bit_length() - 1]] = depth  # type: ignore[index]
            bits ^= low
