"""``MaskTable``: chained hash -> bitmask of the replicas holding that block, in compiled code.

The index's hot loops (walking a prompt's 512 blocks in ``match``, adding an event's 128 blocks)
were Python loops over a dict of a million int objects: per block, bytecode plus three cache
misses (the table, the key object, the value object). Here the map is two flat arrays, keys and
masks (``uint64``), probed linearly, and each loop is one compiled function call (numba), so a
block costs one probe of one flat table and no Python objects. A slot whose mask is 0 is empty
(an entry nobody holds is deleted, shifting later entries of its probe run back), so every key,
0 included, is stored exactly. The table doubles when it is half full.

A replica is one bit of a 64-bit word. Slot ``s`` is bit ``s % 64`` of word ``s // 64``; each word
has its own table, so a cluster of up to 64 replicas (the usual case) has one, and a bigger one
gets another per 64 replicas. Matching word by word gives the same answer as one wide mask: a
replica's depth (leading blocks held) depends only on its own bit.

The kernels are compiled at import with explicit signatures and cached on disk (numba's
``cache=True``), so no request waits for a compile.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit, types

WORD_BITS = 64
_WORD_MASK = (1 << WORD_BITS) - 1
MIN_CAPACITY = 1024
_SPREAD = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: a key's home slot
_U64 = types.uint64
_ARRAY = _U64[::1]


@njit(types.int64(_ARRAY, _ARRAY, _U64, _U64), cache=True, inline="always")
def _probe(keys, masks, key, shift):  # pragma: no cover - compiled
    """The slot holding ``key``, or the empty slot where it would go."""
    last = keys.shape[0] - 1
    slot = np.int64((key * _SPREAD) >> shift)
    while masks[slot] != 0 and keys[slot] != key:
        slot = (slot + 1) & last
    return slot


@njit(types.int64(_ARRAY, _ARRAY, _ARRAY, _U64, _U64, types.boolean[::1]), cache=True)
def _set_bit(keys, masks, chains, bit, shift, had):  # pragma: no cover - compiled
    """Set ``bit`` on every chain; ``had[i]``: chain ``i`` had it before this call (a chain
    given twice is not counted as held by its own first copy). Returns the number of new
    entries. The caller leaves room for all of them."""
    for i in range(chains.shape[0]):
        had[i] = (masks[_probe(keys, masks, chains[i], shift)] & bit) != 0
    num_new = 0
    for i in range(chains.shape[0]):
        slot = _probe(keys, masks, chains[i], shift)
        mask = masks[slot]
        if mask == 0:
            keys[slot] = chains[i]
            num_new += 1
        masks[slot] = mask | bit
    return num_new


@njit(types.int64(_ARRAY, _ARRAY, _ARRAY, _U64, _U64), cache=True)
def _clear_bit(keys, masks, chains, bit, shift):  # pragma: no cover - compiled
    """Clear ``bit`` on every chain; returns the number of entries deleted (no bit left)."""
    last = keys.shape[0] - 1
    num_deleted = 0
    for i in range(chains.shape[0]):
        hole = _probe(keys, masks, chains[i], shift)
        if not masks[hole] & bit:
            continue
        masks[hole] &= ~bit
        if masks[hole]:
            continue
        num_deleted += 1
        # Backward-shift deletion: move back each later entry of the run that may sit in the hole.
        slot = hole
        while True:
            slot = (slot + 1) & last
            if masks[slot] == 0:
                break
            home = np.int64((keys[slot] * _SPREAD) >> shift)
            if ((slot - home) & last) >= ((slot - hole) & last):
                keys[hole] = keys[slot]
                masks[hole] = masks[slot]
                masks[slot] = 0
                hole = slot
    return num_deleted


@njit(types.int64(_ARRAY, _ARRAY, _U64, _ARRAY, _U64, _ARRAY, types.int64[::1]), cache=True)
def _walk(keys, masks, shift, chains, active, bits_out, depth_out):  # pragma: no cover
    """Walk a prompt's chains while any ``active`` replica holds every block so far.

    Writes, in order, each group of replicas that stops holding and the number of leading blocks
    the group holds (groups holding none are left out); returns the number of groups.
    """
    num_groups = 0
    depth = 0
    for i in range(chains.shape[0]):
        kept = active & masks[_probe(keys, masks, chains[i], shift)]
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


@njit(types.void(_ARRAY, _ARRAY, _ARRAY, _ARRAY, _U64), cache=True)
def _rehash(keys, masks, new_keys, new_masks, shift):  # pragma: no cover - compiled
    for slot in range(keys.shape[0]):
        if masks[slot]:
            new = _probe(new_keys, new_masks, keys[slot], shift)
            new_keys[new] = keys[slot]
            new_masks[new] = masks[slot]


class _Word:
    """The table of one 64-slot word."""

    def __init__(self, capacity: int = MIN_CAPACITY) -> None:
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.masks = np.zeros(capacity, dtype=np.uint64)
        self.shift = np.uint64(64 - (capacity.bit_length() - 1))
        self.count = 0

    def reserve(self, extra: int) -> None:
        """Room for ``extra`` more entries at most half full."""
        needed = 2 * (self.count + extra)
        if needed <= len(self.keys):
            return
        grown = _Word(1 << (needed - 1).bit_length())
        _rehash(self.keys, self.masks, grown.keys, grown.masks, grown.shift)
        self.keys, self.masks, self.shift = grown.keys, grown.masks, grown.shift

    def live_keys(self) -> np.ndarray:
        return self.keys[self.masks != 0]


def as_chains(block_hashes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Chained hashes as the contiguous ``uint64`` array the kernels take."""
    if isinstance(block_hashes, np.ndarray) and block_hashes.dtype == np.uint64:
        return np.ascontiguousarray(block_hashes)
    return np.fromiter(block_hashes, dtype=np.uint64, count=len(block_hashes))


class MaskTable:
    """Which slots (replicas) hold each chained hash. Owned by one ``KVIndex``; not thread-safe."""

    def __init__(self) -> None:
        self._words: list[_Word] = []

    def _word(self, slot: int) -> tuple[_Word, np.uint64]:
        word, bit = divmod(slot, WORD_BITS)
        while len(self._words) <= word:
            self._words.append(_Word())
        return self._words[word], np.uint64(1 << bit)

    def add(self, slot: int, chains: np.ndarray) -> np.ndarray | None:
        """Mark ``slot`` as holding the chains (distinct). Returns which chains it held already,
        or None when it held none of them (the common case)."""
        word, bit = self._word(slot)
        word.reserve(len(chains))
        had = np.empty(len(chains), dtype=np.bool_)
        word.count += _set_bit(word.keys, word.masks, chains, bit, word.shift, had)
        return had if had.any() else None

    def discard(self, slot: int, chains: np.ndarray) -> None:
        """``slot`` no longer holds the chains (those it did not hold are ignored)."""
        if len(chains):
            word, bit = self._word(slot)
            word.count -= _clear_bit(word.keys, word.masks, chains, bit, word.shift)

    def holds(self, slot: int, chain: int) -> bool:
        word, bit = self._word(slot)
        found = np.empty(1, dtype=np.uint64)
        depths = np.empty(1, dtype=np.int64)
        chains = np.array([chain], dtype=np.uint64)
        return bool(_walk(word.keys, word.masks, word.shift, chains, bit, found, depths))

    def match(self, chains: np.ndarray, live_bits: int) -> list[tuple[int, int]]:
        """(bits of the slots that hold exactly ``depth`` leading blocks, ``depth``) groups."""
        groups: list[tuple[int, int]] = []
        if not len(chains):
            return groups
        bits = np.empty(WORD_BITS, dtype=np.uint64)
        depths = np.empty(WORD_BITS, dtype=np.int64)
        for index, word in enumerate(self._words):
            active = (live_bits >> (index * WORD_BITS)) & _WORD_MASK
            if active:
                count = _walk(word.keys, word.masks, word.shift, chains, np.uint64(active), bits,
                              depths)
                shift = index * WORD_BITS
                groups += [(int(b) << shift, int(d))
                           for b, d in zip(bits[:count], depths[:count], strict=True)]
        return groups

    def __len__(self) -> int:
        """Distinct chains held by at least one slot."""
        if len(self._words) <= 1:
            return self._words[0].count if self._words else 0
        return len(np.unique(np.concatenate([word.live_keys() for word in self._words])))

    def estimate_bytes(self) -> int:
        """The tables' arrays: 16 bytes a slot, at most half of them used."""
        return sum(word.keys.nbytes + word.masks.nbytes for word in self._words)
