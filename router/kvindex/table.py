"""``MaskTable``: chained hash -> bitmask of the replicas holding that block, in compiled code.

The index's hot loops (walking a prompt's 512 blocks in ``match``, adding an event's 128 blocks)
were Python loops over a dict of a million int objects: per block, bytecode plus three cache
misses (the table, the key object, the value object). Here the map is flat arrays probed
linearly, and each loop is one compiled function call (numba), so a block costs one probe of
one flat table and no Python objects.

Layout. ``keys`` (``uint64``, one per table position) and ``masks`` (``uint64``, one row per
position, one 64-bit word per 64 replicas: replica slot ``s`` is bit ``s % 64`` of word
``s // 64``). A position whose mask row is all zero is empty: an entry no replica holds is
deleted, shifting the later entries of its probe run back, so every key (0 included) is stored
exactly once and the number of entries is the number of distinct blocks. The table doubles
when it is half full; a word is added when a replica slot needs it (rare: 64 replicas fit in
one). Matching word by word gives the same answer as one wide mask: a replica's depth (leading
blocks held) depends only on its own bit.

The kernels are compiled at import with explicit signatures (``compiled.py``), so no request
waits for a compile. Not thread-safe: the index's callers serialize every call.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from numba import types

from router.kvindex.compiled import compiled

WORD_BITS = 64
_WORD_MASK = (1 << WORD_BITS) - 1
MIN_CAPACITY = 1024
SPREAD = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: a key's home position
_U64 = types.uint64
_KEYS = _U64[::1]
_MASKS = _U64[:, ::1]


@compiled(types.boolean(_MASKS, types.int64), inline="always")
def _is_used(masks, pos):  # pragma: no cover - compiled
    if masks[pos, 0]:  # word 0 first: with up to 64 replicas the only one
        return True
    for word in range(1, masks.shape[1]):
        if masks[pos, word]:
            return True
    return False


@compiled(types.boolean(_KEYS, types.int64, types.int64, _U64), inline="always")
def may_fill_hole(keys, pos, hole, shift):  # pragma: no cover - compiled
    """Backward-shift deletion's rule (this table's and ``keymap``'s): whether the entry at
    ``pos``, later in the probe run than the emptied ``hole``, may move back into it. It may
    unless its home lies after the hole (cyclically), where a probe for it would not pass the
    hole."""
    last = keys.shape[0] - 1
    home = np.int64((keys[pos] * SPREAD) >> shift)
    return ((pos - home) & last) >= ((pos - hole) & last)


@compiled(types.int64(_KEYS, _MASKS, _U64, _U64), inline="always")
def _probe(keys, masks, key, shift):  # pragma: no cover - compiled
    """The position holding ``key``, or the empty position where it would go."""
    last = keys.shape[0] - 1
    pos = np.int64((key * SPREAD) >> shift)
    while _is_used(masks, pos) and keys[pos] != key:
        pos = (pos + 1) & last
    return pos


@compiled(types.int64(_KEYS, _MASKS, _KEYS, types.int64, _U64, _U64, types.boolean[::1]))
def _set_bit(keys, masks, chains, word, bit, shift, had):  # pragma: no cover - compiled
    """Set ``bit`` of ``word`` on every chain; ``had[i]``: chain ``i`` had it before this call (a
    chain given twice is not counted as held by its own first copy). Returns the number of new
    entries. The caller leaves room for all of them."""
    for i in range(chains.shape[0]):
        had[i] = (masks[_probe(keys, masks, chains[i], shift), word] & bit) != 0
    num_new = 0
    for i in range(chains.shape[0]):
        pos = _probe(keys, masks, chains[i], shift)
        if not _is_used(masks, pos):
            keys[pos] = chains[i]
            num_new += 1
        masks[pos, word] |= bit
    return num_new


@compiled(types.int64(_KEYS, _MASKS, _KEYS, types.int64, _U64, _U64))
def _clear_bit(keys, masks, chains, word, bit, shift):  # pragma: no cover - compiled
    """Clear ``bit`` of ``word`` on every chain; returns the number of entries deleted (held by
    no replica any more)."""
    last = keys.shape[0] - 1
    num_deleted = 0
    for i in range(chains.shape[0]):
        hole = _probe(keys, masks, chains[i], shift)
        if not masks[hole, word] & bit:
            continue
        masks[hole, word] &= ~bit
        if _is_used(masks, hole):
            continue
        num_deleted += 1
        # Backward-shift deletion: move back each later entry of the run that may sit in the hole.
        pos = hole
        while True:
            pos = (pos + 1) & last
            if not _is_used(masks, pos):
                break
            if may_fill_hole(keys, pos, hole, shift):
                keys[hole] = keys[pos]
                masks[hole] = masks[pos]
                masks[pos] = 0
                hole = pos
    return num_deleted


@compiled(types.int64(_KEYS, _MASKS, _U64, _KEYS, types.int64, _U64, _KEYS, types.int64[::1]))
def _walk(keys, masks, shift, chains, word, active, bits_out, depth_out):  # pragma: no cover
    """Walk a prompt's chains while any ``active`` replica (bits of ``word``) holds every block
    so far.

    Writes, in order, each group of replicas that stops holding and the number of leading blocks
    the group holds (groups holding none are left out); returns the number of groups.
    """
    num_groups = 0
    depth = 0
    for i in range(chains.shape[0]):
        kept = active & masks[_probe(keys, masks, chains[i], shift), word]
        if kept != active:
            if depth:
                bits_out[num_groups] = active ^ kept
                depth_out[num_groups] = depth
                num_groups += 1
            if not kept:
                return num_groups
            active = kept
        depth += 1
    if depth:
        bits_out[num_groups] = active
        depth_out[num_groups] = depth
        num_groups += 1
    return num_groups


@compiled(types.void(_KEYS, _MASKS, _KEYS, _MASKS, _U64))
def _rehash(keys, masks, new_keys, new_masks, shift):  # pragma: no cover - compiled
    """Insert every entry of one table into an empty, larger one (``new_masks`` may have more
    words: the extra ones stay zero)."""
    for pos in range(keys.shape[0]):
        if _is_used(masks, pos):
            new = _probe(new_keys, new_masks, keys[pos], shift)
            new_keys[new] = keys[pos]
            for word in range(masks.shape[1]):
                new_masks[new, word] = masks[pos, word]


def as_chains(block_hashes: Iterable[int] | np.ndarray) -> np.ndarray:
    """Chained hashes (ints in ``[0, 2**64)``) as the contiguous ``uint64`` array the kernels
    take; ``OverflowError`` for an int out of that range."""
    if isinstance(block_hashes, np.ndarray):
        return np.require(block_hashes, np.uint64, ("C", "W"))
    return np.fromiter(block_hashes, dtype=np.uint64)


def home_shift(capacity: int) -> np.uint64:
    """The right shift that turns ``key * SPREAD`` into a home position of a table of
    ``capacity`` (a power of two) positions."""
    return np.uint64(64 - (capacity.bit_length() - 1))


def grown_capacity(capacity: int, num_entries: int) -> int | None:
    """The capacity a table of ``capacity`` positions needs to hold ``num_entries`` at most
    half full (a power of two), or None when it already does."""
    needed = 2 * num_entries
    return None if needed <= capacity else 1 << (needed - 1).bit_length()


class MaskTable:
    """Which replica slots hold each chained hash. Owned by one ``KVIndex``."""

    def __init__(self) -> None:
        self._keys, self._masks, self._shift = self._empty(MIN_CAPACITY, 1)
        self._num_entries = 0

    @staticmethod
    def _empty(capacity: int, num_words: int) -> tuple[np.ndarray, np.ndarray, np.uint64]:
        return (np.zeros(capacity, dtype=np.uint64),
                np.zeros((capacity, num_words), dtype=np.uint64), home_shift(capacity))

    def _resize(self, capacity: int, num_words: int) -> None:
        keys, masks, shift = self._empty(capacity, num_words)
        _rehash(self._keys, self._masks, keys, masks, shift)
        self._keys, self._masks, self._shift = keys, masks, shift

    def _bit(self, replica_slot: int, *, grow: bool) -> tuple[int, np.uint64] | None:
        """(word, bit) of a replica slot; None if no word holds it yet and ``grow`` is False."""
        word, bit = divmod(replica_slot, WORD_BITS)
        if word >= self._masks.shape[1]:
            if not grow:
                return None
            self._resize(len(self._keys), word + 1)
        return word, np.uint64(1 << bit)

    def add(self, replica_slot: int, chains: np.ndarray) -> np.ndarray | None:
        """Mark ``replica_slot`` as holding the chains. Returns which chains it held already (a
        chain given twice counts once), or None when it held none of them (the common case)."""
        word, bit = self._bit(replica_slot, grow=True)  # type: ignore[misc]
        capacity = grown_capacity(len(self._keys), self._num_entries + len(chains))
        if capacity is not None:
            self._resize(capacity, self._masks.shape[1])
        had = np.empty(len(chains), dtype=np.bool_)
        self._num_entries += _set_bit(self._keys, self._masks, chains, word, bit, self._shift,
                                      had)
        return had if had.any() else None

    def discard(self, replica_slot: int, chains: np.ndarray) -> None:
        """``replica_slot`` no longer holds the chains (those it did not hold are ignored)."""
        found = self._bit(replica_slot, grow=False)
        if found is not None and len(chains):
            self._num_entries -= _clear_bit(self._keys, self._masks, chains, *found, self._shift)

    def holds(self, replica_slot: int, chain: int) -> bool:
        found = self._bit(replica_slot, grow=False)
        if found is None:
            return False
        chains = np.array([chain], dtype=np.uint64)
        bits, depths = np.empty(1, dtype=np.uint64), np.empty(1, dtype=np.int64)
        return bool(_walk(self._keys, self._masks, self._shift, chains, *found, bits, depths))

    def match(self, chains: np.ndarray, live_bits: int) -> list[tuple[int, int]]:
        """(bits of the replica slots that hold exactly ``depth`` leading blocks, ``depth``)."""
        groups: list[tuple[int, int]] = []
        if not len(chains):
            return groups
        bits = np.empty(WORD_BITS, dtype=np.uint64)
        depths = np.empty(WORD_BITS, dtype=np.int64)
        for word in range(self._masks.shape[1]):
            active = (live_bits >> (word * WORD_BITS)) & _WORD_MASK
            if active:
                num_groups = _walk(self._keys, self._masks, self._shift, chains, word,
                                   np.uint64(active), bits, depths)
                shift = word * WORD_BITS
                groups += [(int(b) << shift, int(d))
                           for b, d in zip(bits[:num_groups], depths[:num_groups], strict=True)]
        return groups

    def __len__(self) -> int:
        """Distinct chains held by at least one replica slot."""
        return self._num_entries

    def estimate_bytes(self) -> int:
        """The arrays: 8 bytes a position for the key and 8 per word of replicas, at most half
        the positions used."""
        return self._keys.nbytes + self._masks.nbytes
