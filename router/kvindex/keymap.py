"""``EngineKeyMap``: one replica's map from engine block hash to the index's chained hash.

Every stored block passes through this map (an event names its blocks by engine hash) and every
removal looks its blocks up in it, so it is most of what ingesting an event costs. vLLM's engine
hashes are ints in ``[0, 2**64)`` by default (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``): those go
in flat ``uint64`` arrays probed linearly, at most half full, one compiled call per event (as in
``table.py``), with no Python int objects per entry. An engine that publishes bytes (or any
other key) moves its replica's map to a Python dict for good, the first time it does; nothing
else changes.

Keys are converted once per event (``coerce``); the other methods take what it returned. Not
thread-safe: the index's callers serialize every call.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import numpy as np
from numba import types

from router.kvindex.compiled import compiled
from router.kvindex.events import EngineHash
from router.kvindex.table import (
    MIN_CAPACITY,
    SPREAD,
    grown_capacity,
    home_shift,
    may_fill_hole,
)

_U64 = types.uint64
_ARRAY = _U64[::1]
_USED = types.boolean[::1]
_INT_ONLY = frozenset({int})
_KEY_LIMIT = 1 << 64

# What ``coerce`` returns: a ``uint64`` array while the map is compiled, else the keys as given.
Keys = np.ndarray | Sequence[EngineHash]


@compiled(types.int64(_ARRAY, _USED, _U64, _U64), inline="always")
def _find(keys, used, key, shift):  # pragma: no cover - compiled
    """The position holding ``key``, or the empty position where it would go."""
    last = keys.shape[0] - 1
    pos = np.int64((key * SPREAD) >> shift)
    while used[pos] and keys[pos] != key:
        pos = (pos + 1) & last
    return pos


@compiled(types.int64(_ARRAY, _ARRAY, _USED, _ARRAY, _U64, _ARRAY, _USED))
def _lookup(keys, values, used, query, shift, found_values, found):  # pragma: no cover
    """``found[i]``, ``found_values[i]``: whether ``query[i]`` is held and its value. Returns the
    number held."""
    num_found = 0
    for i in range(query.shape[0]):
        pos = _find(keys, used, query[i], shift)
        found[i] = used[pos]
        if used[pos]:
            found_values[i] = values[pos]
            num_found += 1
    return num_found


@compiled(types.int64(_ARRAY, _ARRAY, _USED, _ARRAY, _ARRAY, _U64))
def _put(keys, values, used, new_keys, new_values, shift):  # pragma: no cover - compiled
    """Set each key's value (the last one given wins); returns the number of keys added. The
    caller leaves room for all of them."""
    num_added = 0
    for i in range(new_keys.shape[0]):
        pos = _find(keys, used, new_keys[i], shift)
        if not used[pos]:
            used[pos] = True
            keys[pos] = new_keys[i]
            num_added += 1
        values[pos] = new_values[i]
    return num_added


@compiled(types.int64(_ARRAY, _ARRAY, _USED, _ARRAY, _ARRAY, _U64))
def _put_if_all_new(keys, values, used, new_keys, new_values, shift):  # pragma: no cover
    """``_put`` when no key is held yet; else nothing, and -1."""
    for i in range(new_keys.shape[0]):
        if used[_find(keys, used, new_keys[i], shift)]:
            return -1
    return _put(keys, values, used, new_keys, new_values, shift)


@compiled(types.int64(_ARRAY, _ARRAY, _USED, _ARRAY, _U64, _ARRAY))
def _pop(keys, values, used, gone, shift, popped):  # pragma: no cover - compiled
    """Delete the keys that are held, writing their values, in order, to ``popped``; returns
    how many. Backward-shift deletion (``table.may_fill_hole``), as in ``table._clear_bit``:
    no tombstones."""
    last = keys.shape[0] - 1
    num_popped = 0
    for i in range(gone.shape[0]):
        hole = _find(keys, used, gone[i], shift)
        if not used[hole]:
            continue
        popped[num_popped] = values[hole]
        num_popped += 1
        used[hole] = False
        pos = hole
        while True:
            pos = (pos + 1) & last
            if not used[pos]:
                break
            if may_fill_hole(keys, pos, hole, shift):
                keys[hole], values[hole], used[hole] = keys[pos], values[pos], True
                used[pos] = False
                hole = pos
    return num_popped


def int_keys(keys: Iterable[EngineHash]) -> np.ndarray | None:
    """The keys as a ``uint64`` array if every one is an int in ``[0, 2**64)``, else None.

    The type check is exact (numpy would read ``b"12"`` as 12 and truncate 1.5 to 1): in a
    list, numpy integer scalars are not ints either; an integer ndarray is taken whole.
    """
    if isinstance(keys, np.ndarray):  # e.g. ``hash_token_blocks_array``'s hashes
        if keys.dtype.kind == "u" or (keys.dtype.kind == "i" and not (keys < 0).any()):
            return np.ascontiguousarray(keys, dtype=np.uint64)
        return None
    keys = keys if isinstance(keys, Sequence) else list(keys)
    if keys and frozenset(map(type, keys)) != _INT_ONLY:
        return None
    try:
        return np.fromiter(keys, dtype=np.uint64, count=len(keys))
    except OverflowError:
        return None


def _storable(keys: Iterable[EngineHash]) -> list[int]:
    """The keys the arrays can hold; the others cannot be held. An unhashable key raises
    ``TypeError``, as it would in a dict."""
    storable = []
    for key in keys:
        hash(key)
        if type(key) is int and 0 <= key < _KEY_LIMIT:
            storable.append(key)
    return storable


class EngineKeyMap:
    """Engine hash -> chained hash for one replica; compiled arrays, or a dict (see module)."""

    def __init__(self) -> None:
        self._dict: dict[EngineHash, int] | None = None
        self.clear()

    def clear(self) -> None:
        """Hold nothing; a map that moved to a dict stays one (its engine publishes bytes)."""
        if self._dict is not None:
            self._dict = {}
            return
        self._keys, self._values, self._used, self._shift = self._empty(MIN_CAPACITY)
        self._num_keys = 0

    @staticmethod
    def _empty(capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.uint64]:
        return (np.zeros(capacity, dtype=np.uint64), np.zeros(capacity, dtype=np.uint64),
                np.zeros(capacity, dtype=np.bool_), home_shift(capacity))

    @property
    def is_compiled(self) -> bool:
        return self._dict is None

    def coerce(self, keys: Sequence[EngineHash]) -> Keys:
        """Convert an event's keys once for the calls below; the first key the arrays cannot
        hold moves this map to a dict."""
        if self._dict is None:
            array = int_keys(keys)
            if array is not None:
                return array
            self._dict = dict(zip(self._held_keys().tolist(), self._held_values().tolist(),
                                  strict=True))
            self._keys = self._values = np.zeros(0, dtype=np.uint64)
            self._used = np.zeros(0, dtype=np.bool_)
        return keys

    def get(self, key: EngineHash) -> int | None:
        if self._dict is not None:
            return self._dict.get(key)
        if type(key) is not int or not 0 <= key < _KEY_LIMIT:
            return None
        pos = _find(self._keys, self._used, np.uint64(key), self._shift)
        return int(self._values[pos]) if self._used[pos] else None

    def lookup(self, keys: Keys) -> list[int | None] | None:
        """Each key's chained hash, or None for a key not held; None when no key is held (the
        common case: an event's blocks are new)."""
        if self._dict is not None:
            values = [self._dict.get(key) for key in keys]
            return None if values.count(None) == len(values) else values
        found_values = np.empty(len(keys), dtype=np.uint64)
        found = np.empty(len(keys), dtype=np.bool_)
        if not _lookup(self._keys, self._values, self._used, keys, self._shift, found_values,
                       found):
            return None
        return [v if f else None for v, f in zip(found_values.tolist(), found.tolist(),
                                                 strict=True)]

    def update(self, keys: Keys, chains: np.ndarray, chain_ints: list[int]) -> None:
        """Set each key's chained hash (``chains`` as an array and as ints, same values)."""
        if self._dict is not None:
            self._dict.update(zip(keys, chain_ints, strict=True))
            return
        self._make_room(len(keys))
        self._num_keys += _put(self._keys, self._values, self._used, keys,
                               np.require(chains, np.uint64, "C"), self._shift)

    def update_if_all_new(self, keys: Keys, chains: np.ndarray, chain_ints: list[int]) -> bool:
        """``update`` if no key is held yet (an event's new blocks, the common case: one
        compiled call); else change nothing and return False."""
        if self._dict is not None:
            if not self._dict.keys().isdisjoint(keys):
                return False
            self._dict.update(zip(keys, chain_ints, strict=True))
            return True
        self._make_room(len(keys))
        num_added = _put_if_all_new(self._keys, self._values, self._used, keys,
                                    np.require(chains, np.uint64, "C"), self._shift)
        if num_added < 0:
            return False
        self._num_keys += num_added
        return True

    def set(self, key: EngineHash, chain: int) -> None:
        """Set one key's chained hash."""
        keys = self.coerce([key])
        self.update(keys, np.array([chain], dtype=np.uint64), [chain])

    def pop_into(self, keys: Iterable[EngineHash], popped: list[int]) -> None:
        """Remove the keys held (others are ignored), appending their chained hashes, in order,
        to ``popped``. An unhashable key raises ``TypeError``: in a dict, after the keys before
        it were removed (they are in ``popped``); in the arrays, before any change."""
        if self._dict is not None:
            pop = self._dict.pop
            for key in keys:
                chain = pop(key, None)
                if chain is not None:
                    popped.append(chain)
            return
        if not isinstance(keys, np.ndarray):
            keys = list(keys)
        array = int_keys(keys)
        if array is None:
            array = np.array(_storable(keys), dtype=np.uint64)
        out = np.empty(len(array), dtype=np.uint64)
        num_popped = _pop(self._keys, self._values, self._used, array, self._shift, out)
        self._num_keys -= num_popped
        popped += out[:num_popped].tolist()

    def chains(self) -> list[int]:
        """Every chained hash held, once per key."""
        if self._dict is not None:
            return list(self._dict.values())
        return self._held_values().tolist()

    def __len__(self) -> int:
        return len(self._dict) if self._dict is not None else self._num_keys

    def estimate_bytes(self) -> int:
        """The arrays (17 bytes a position, at most half of them used); for a dict, the dict
        and one int object per key and value."""
        if self._dict is not None:
            return sys.getsizeof(self._dict) + 64 * len(self._dict)
        return self._keys.nbytes + self._values.nbytes + self._used.nbytes

    def _held_keys(self) -> np.ndarray:
        return self._keys[self._used]

    def _held_values(self) -> np.ndarray:
        return self._values[self._used]

    def _make_room(self, num_new: int) -> None:
        capacity = grown_capacity(len(self._keys), self._num_keys + num_new)
        if capacity is not None:
            self._resize(capacity)

    def _resize(self, capacity: int) -> None:
        old_keys, old_values = self._held_keys(), self._held_values()
        self._keys, self._values, self._used, self._shift = self._empty(capacity)
        _put(self._keys, self._values, self._used, old_keys, old_values, self._shift)
