"""``KVIndex``: which replica holds which block, as a radix tree flattened into one map.

Because a chained hash identifies its whole prefix, the tree needs no child pointers: a node is
an entry ``chain hash -> bitmask of the replicas holding that block`` (``table.py``, compiled),
and walking a prompt's hashes in order walks the tree from the root. A replica is one bit (a
small slot number). Each replica's map from engine hashes to chained hashes is compiled too
(``keymap.py``), or a dict for an engine that publishes bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import compress

import numpy as np

from router.kvindex.events import (
    TRACKED_MEDIA,
    AllCleared,
    EngineHash,
    KVEvent,
    RemovedBlocks,
    StoredBlocks,
)
from router.kvindex.expiry import ExpiryQueue
from router.kvindex.hashing import hash_token_blocks_array, root_hash
from router.kvindex.keymap import Keys
from router.kvindex.replicas import ReplicaMode, ReplicaState, SlotTable
from router.kvindex.table import MaskTable, as_chains

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class IndexStats:
    """Counters for logs and metrics."""

    num_blocks: int
    num_replicas: int
    event_fed_replicas: tuple[str, ...]
    guessed_replicas: tuple[str, ...]
    # event-fed replicas whose engine block hashes are not ints in [0, 2**64): their key maps
    # are Python dicts, slower to ingest (``keymap.EngineKeyMap``)
    dict_keyed_replicas: tuple[str, ...]
    num_orphan_blocks: int  # stored blocks dropped: their parent was unknown to the index
    num_ignored_events: int  # events about media the index does not track (CPU, storage)
    num_blocks_by_replica: dict[str, int]  # distinct blocks each registered replica holds


class KVIndex:
    """Global index of cached blocks across replicas; see ``router.kvindex`` for the API."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._table = MaskTable()
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
        self._add_blocks(rep, block_hashes, as_chains(block_hashes))

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
        chains = as_chains(block_hashes)  # refuses a hash out of range before any change
        now = self._clock()
        self._expire(now)
        expiry = now + ttl_s
        held, fresh = rep.expiry, []
        for chain in block_hashes:
            old = held.get(chain)
            if old is None:
                fresh.append(chain)
            elif old >= expiry:
                continue
            held[chain] = expiry
        if fresh:
            self._table.add(rep.slot, as_chains(fresh))
        if expiry != math.inf and len(chains):
            self._expiry.push(expiry, rep, block_hashes)
        return True

    # -- queries ----------------------------------------------------------------------------

    def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """Number of leading blocks of ``block_hashes`` each replica holds (absent: none).

        A replica counts only blocks contiguous from the first one. Cost: one compiled probe per
        block up to the deepest holder (per 64 replicas), plus one entry per replica in the
        result. ``block_hashes``: ints in ``[0, 2**64)``, or a ``uint64`` array
        (``hash_token_blocks_array``).
        """
        if self._expiry.has_due(now := self._clock()):
            self._expire(now)
        result: dict[str, int] = {}
        if self._live_bits and len(block_hashes):
            for bits, depth in self._table.match(as_chains(block_hashes), self._live_bits):
                self._credit(result, bits, depth)
        return result

    @property
    def num_blocks(self) -> int:
        """Distinct blocks held by at least one replica."""
        self._expire(self._clock())
        return len(self._table)

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
            num_blocks=len(self._table),
            num_replicas=len(self._replicas),
            event_fed_replicas=tuple(r.replica_id for r in reps if r.mode is ReplicaMode.EVENT_FED),
            guessed_replicas=tuple(r.replica_id for r in reps if r.mode is ReplicaMode.GUESSED),
            dict_keyed_replicas=tuple(r.replica_id for r in reps
                                      if r.mode is ReplicaMode.EVENT_FED
                                      and not r.blocks.is_compiled),
            num_orphan_blocks=self._num_orphan_blocks,
            num_ignored_events=self._num_ignored_events,
            num_blocks_by_replica={r.replica_id: r.num_blocks for r in reps},
        )

    def estimate_memory_bytes(self) -> int:
        """Rough size of the index: its compiled table, the per-replica engine key maps, and the
        guessed replicas' dicts with one int object per key and value they own."""
        total = self._table.estimate_bytes()
        for rep in self._replicas.values():
            total += rep.blocks.estimate_bytes() + sys.getsizeof(rep.expiry)
            total += 24 * len(rep.expiry)
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
        chains = hash_token_blocks_array(event.token_ids, event.block_size, parent)
        if len(chains) != len(event.block_hashes):
            raise ValueError(
                f"{len(event.block_hashes)} block hashes but {len(event.token_ids)} tokens "
                f"of block size {event.block_size}"
            )
        self._add_blocks(rep, event.block_hashes, chains)

    def _add_blocks(
        self, rep: ReplicaState, keys: Sequence[EngineHash], chains: np.ndarray
    ) -> None:
        # The chains of one event are distinct, being the chain of one sequence.
        blocks, chain_ints = rep.blocks, chains.tolist()
        if len(keys) != len(chain_ints):
            raise ValueError(f"{len(keys)} keys for {len(chain_ints)} chains")
        was_compiled = blocks.is_compiled
        coerced = blocks.coerce(keys)
        if was_compiled and not blocks.is_compiled:
            logger.info("KV index: replica %s publishes engine block hashes that are not ints "
                        "in [0, 2**64); they are kept in a Python dict (slower to ingest; "
                        "counted in pdserve_router_replicas{mode=\"dict_keyed\"})",
                        rep.replica_id)
        if blocks.update_if_all_new(coerced, chains, chain_ints):  # the common case
            self._mark_held(rep, chains, chain_ints)
            return
        olds = blocks.lookup(coerced)
        assert olds is not None
        # Plain ints where the keys were converted (an array's items are numpy scalars).
        key_list = coerced.tolist() if isinstance(coerced, np.ndarray) else list(keys)
        fresh = [i for i, old in enumerate(olds) if old is None]
        if all(old is None or old == chain for old, chain in zip(olds, chain_ints, strict=True)):
            # A replay, in part or whole: only the keys not held yet change anything.
            self._add_new_keys(rep, blocks.coerce([key_list[i] for i in fresh]), chains[fresh],
                               [chain_ints[i] for i in fresh])
            return
        # Rare: a key now means another block; one at a time, in order.
        for key, chain in zip(key_list, chain_ints, strict=True):
            old = blocks.get(key)
            if old is not None:
                if old == chain:
                    continue
                self._drop_chain(rep, old)
            blocks.set(key, chain)
            if self._table.holds(rep.slot, chain):
                rep.extra_refs[chain] = rep.extra_refs.get(chain, 0) + 1
            else:
                self._table.add(rep.slot, as_chains([chain]))

    def _add_new_keys(self, rep: ReplicaState, keys: Keys, chains: np.ndarray,
                      chain_ints: list[int]) -> None:
        """Engine keys the replica does not hold yet (``coerce``d), with their (distinct)
        chains, in bulk."""
        rep.blocks.update(keys, chains, chain_ints)
        self._mark_held(rep, chains, chain_ints)

    def _mark_held(self, rep: ReplicaState, chains: np.ndarray, chain_ints: list[int]) -> None:
        """Set the replica's bit on (distinct) chains it now holds under new engine keys."""
        held = self._table.add(rep.slot, chains)
        if held is not None:  # some chains it held under other keys
            extra = rep.extra_refs
            for chain in compress(chain_ints, held):
                extra[chain] = extra.get(chain, 0) + 1

    def _remove_keys(self, rep: ReplicaState, keys: Iterable[EngineHash]) -> None:
        popped: list[int] = []
        try:
            rep.blocks.pop_into(keys, popped)
        finally:  # a bad key half-way: what was popped still leaves the table
            dropped = [chain for chain in popped if not self._release_extra_ref(rep, chain)]
            self._table.discard(rep.slot, as_chains(dropped))

    def _release_extra_ref(self, rep: ReplicaState, chain: int) -> bool:
        """True if the replica still holds ``chain`` under another engine hash."""
        extra = rep.extra_refs.get(chain)
        if not extra:
            return False
        if extra == 1:
            del rep.extra_refs[chain]
        else:
            rep.extra_refs[chain] = extra - 1
        return True

    def _drop_chain(self, rep: ReplicaState, chain: int) -> None:
        if not self._release_extra_ref(rep, chain):
            self._table.discard(rep.slot, as_chains([chain]))

    def _clear(self, rep: ReplicaState) -> None:
        self._table.discard(rep.slot, as_chains(rep.chains()))
        rep.reset()

    def _expire(self, now: float) -> None:
        for expiry, rep, chains in self._expiry.pop_due(now):
            held, gone = rep.expiry, []
            for chain in chains:
                if held.get(chain) == expiry:  # not refreshed since
                    del held[chain]
                    gone.append(chain)
            self._table.discard(rep.slot, as_chains(gone))

    def _credit(self, result: dict[str, int], bits: int, depth: int) -> None:
        ids = self._slots.ids
        while bits:
            low = bits & -bits
            result[ids[low.bit_length() - 1]] = depth  # type: ignore[index]
            bits ^= low
