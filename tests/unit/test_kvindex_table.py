"""The compiled mask table of the KV index against a plain dict, growth, deletion and wide slots."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.kvindex.table import MIN_CAPACITY, WORD_BITS, MaskTable, as_chains
from tests.helpers import keys_at_home


class Model:
    """The table's meaning: chain -> set of slots."""

    def __init__(self) -> None:
        self.slots: dict[int, set[int]] = {}

    def add(self, slot: int, chains: list[int]) -> list[bool]:
        had = [slot in self.slots.get(c, ()) for c in chains]  # before any of them is added
        for chain in chains:
            self.slots.setdefault(chain, set()).add(slot)
        return had

    def discard(self, slot: int, chains: list[int]) -> None:
        for chain in chains:
            held = self.slots.get(chain)
            if held is not None:
                held.discard(slot)
                if not held:
                    del self.slots[chain]

    def match(self, chains: list[int], live: set[int]) -> dict[int, int]:
        depths = {}
        for slot in live:
            depth = 0
            while depth < len(chains) and slot in self.slots.get(chains[depth], ()):
                depth += 1
            if depth:
                depths[slot] = depth
        return depths


def table_match(table: MaskTable, chains: list[int], live: set[int]) -> dict[int, int]:
    bits = sum(1 << slot for slot in live)
    depths = {}
    for group, depth in table.match(as_chains(chains), bits):
        for slot in range(group.bit_length()):
            if group >> slot & 1:
                depths[slot] = depth
    return depths


def check(table: MaskTable, model: Model, rng: random.Random, keys: list[int],
          slots: list[int]) -> None:
    assert len(table) == len(model.slots)
    for _ in range(5):
        start = rng.randrange(len(keys))
        chains = keys[start:start + rng.randrange(1, 40)]
        live = set(rng.sample(slots, rng.randrange(1, len(slots) + 1)))
        assert table_match(table, chains, live) == model.match(chains, live)
    for chain in rng.sample(keys, 10):
        for slot in slots:
            assert table.holds(slot, chain) == (slot in model.slots.get(chain, ()))


def apply(table: MaskTable, model: Model, is_add: bool, slot: int, chains: list[int]) -> None:
    """One add (whose answer must be the model's) or discard, on both."""
    if is_add:
        held = table.add(slot, as_chains(chains))
        expected = model.add(slot, chains)
        assert (held.tolist() if held is not None else [False] * len(chains)) == expected
    else:
        table.discard(slot, as_chains(chains))
        model.discard(slot, chains)


def run_ops(seed: int, keys: list[int], slots: list[int], num_ops: int) -> None:
    rng = random.Random(seed)
    table, model = MaskTable(), Model()
    for op in range(num_ops):
        slot = rng.choice(slots)
        start = rng.randrange(len(keys))
        chains = list(dict.fromkeys(keys[start:start + rng.randrange(1, 300)]))
        apply(table, model, rng.random() < 0.6, slot, chains)
        if op % 25 == 0:
            check(table, model, rng, keys, slots)
    check(table, model, rng, keys, slots)


def test_random_adds_and_discards_agree_with_a_dict_through_growth() -> None:
    rng = random.Random(1)
    keys = [rng.getrandbits(64) for _ in range(6 * MIN_CAPACITY)]  # grows several times
    run_ops(2, keys, list(range(5)), 400)


def test_clustered_keys_survive_backward_shift_deletion() -> None:
    # Several keys per home in the last and first positions of the smallest table make long
    # probe runs across its end; deleting from the middle of a run must keep every later key
    # findable, wrapping around. The other keys make the table grow.
    colliding = [k for home in (1019, 1021, 1022, 1023, 0, 1, 2)
                 for k in keys_at_home(home, 8, MIN_CAPACITY)]
    keys = colliding + list(range(700)) + [i << 54 for i in range(1, 700)] + \
        [(1 << 64) - 1 - i for i in range(300)]
    run_ops(3, keys, [0, 1, 2], 500)
    run_ops(4, colliding, [0, 1], 300)  # the smallest table only: every run crosses its end


def test_slots_beyond_one_word_get_their_own_mask_word() -> None:
    rng = random.Random(4)
    keys = [rng.getrandbits(64) for _ in range(2000)]
    run_ops(5, keys, [0, 1, WORD_BITS - 1, WORD_BITS, WORD_BITS + 3, 3 * WORD_BITS + 1], 300)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 2), st.lists(st.integers(0, 40),
                                                                      max_size=12)),
                max_size=40))
def test_any_sequence_of_operations_agrees_with_the_model(ops: list) -> None:
    table, model = MaskTable(), Model()
    for is_add, slot, raw in ops:
        chains = raw if is_add else list(dict.fromkeys(raw))  # duplicates given to add too
        apply(table, model, is_add, slot, chains)
    assert len(table) == len(model.slots)
    everything = list(range(41))
    for start in range(0, 41, 7):
        assert table_match(table, everything[start:], {0, 1, 2}) == \
            model.match(everything[start:], {0, 1, 2})


def test_memory_is_the_arrays_and_a_table_half_full_at_most() -> None:
    table = MaskTable()
    chains = np.arange(1, 3001, dtype=np.uint64)
    table.add(0, chains)
    assert len(table) == 3000
    assert table.estimate_bytes() == 16 * 8192  # 3000 entries need 6000 slots: 8192


def test_read_only_and_int64_arrays_are_taken_as_chains() -> None:
    table = MaskTable()
    chains = np.arange(5, dtype=np.uint64)
    table.add(0, chains)
    read_only = np.frombuffer(chains.tobytes(), dtype=np.uint64)  # as Ray deserializes arrays
    assert table.match(as_chains(read_only), 1) == [(1, 5)]
    assert table.match(as_chains(np.arange(5, dtype=np.int64)), 1) == [(1, 5)]


def test_compiled_falls_back_to_no_cache_where_numba_cannot_write_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from numba import njit as real_njit

    from router.kvindex import compiled as module

    def njit(signature: object, **options: object) -> object:
        if options.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x'")
        return real_njit(signature, **options)

    monkeypatch.setattr(module, "njit", njit)

    @module.compiled("int64(int64)")
    def twice(x):  # pragma: no cover - compiled
        return 2 * x

    assert twice(21) == 42
