"""One replica's engine key map (compiled arrays, or a dict after bytes) against a plain dict."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.kvindex.keymap import EngineKeyMap, int_keys
from router.kvindex.table import MIN_CAPACITY, SPREAD, home_shift
from tests.helpers import keys_at_home

# Keys that crowd probe runs: several per home in the last positions of the smallest table and
# the first ones, so runs are long, cross the table's end, and deletion must shift them back
# (wrapping around); plus a spread of others, enough to make the table grow.
COLLIDING = [k for home in (1019, 1021, 1022, 1023, 0, 1, 2, 500)
             for k in keys_at_home(home, 6, MIN_CAPACITY)]
CLUSTERED = COLLIDING + [*range(150), *(k << 54 for k in range(1, 1024))]


def put(keymap: EngineKeyMap, model: dict, keys: list, chains: list[int], *,
        if_all_new: bool) -> None:
    """One ``update`` or ``update_if_all_new``, on both, answers compared."""
    coerced = keymap.coerce(keys)
    array = np.array(chains, dtype=np.uint64)
    if if_all_new:
        expected = model.keys().isdisjoint(keys)
        assert keymap.update_if_all_new(coerced, array, chains) == expected
        if not expected:
            return
    else:
        keymap.update(coerced, array, chains)
    model.update(zip(keys, chains, strict=True))


def check(keymap: EngineKeyMap, model: dict, rng: random.Random, universe: list) -> None:
    assert len(keymap) == len(model)
    assert sorted(keymap.chains()) == sorted(model.values())
    probe = rng.sample(universe, min(30, len(universe)))
    assert [keymap.get(k) for k in probe] == [model.get(k) for k in probe]
    expected = [model.get(k) for k in probe]
    looked_up = keymap.lookup(keymap.coerce(probe))
    assert looked_up == (None if expected.count(None) == len(expected) else expected)


def run_ops(seed: int, universe: list, num_ops: int, bytes_from: int | None = None) -> EngineKeyMap:
    """Random updates, single sets and removals; from op ``bytes_from`` on, bytes keys too."""
    rng = random.Random(seed)
    keymap, model = EngineKeyMap(), {}
    for op in range(num_ops):
        if bytes_from is not None and op == bytes_from:
            universe = universe + [f"k{i}".encode() for i in range(50)]
        keys = list(dict.fromkeys(rng.sample(universe, rng.randrange(1, 60))))
        kind = rng.random()
        if kind < 0.45:
            put(keymap, model, keys, [rng.getrandbits(64) for _ in keys],
                if_all_new=rng.random() < 0.5)
        elif kind < 0.55:
            chain = rng.getrandbits(64)
            keymap.set(keys[0], chain)
            model[keys[0]] = chain
        else:
            popped: list[int] = []
            keymap.pop_into(keys, popped)
            assert popped == [model.pop(k) for k in keys if k in model]
        if op % 10 == 0:
            check(keymap, model, rng, universe)
    check(keymap, model, rng, universe)
    return keymap


@pytest.mark.parametrize("seed", range(4))
def test_compiled_map_matches_a_dict_through_growth_and_deletion(seed: int) -> None:
    keymap = run_ops(seed, CLUSTERED + [2**64 - 1], 400)
    assert keymap.is_compiled
    assert len(keymap._keys) > MIN_CAPACITY  # it grew


@pytest.mark.parametrize("seed", range(3))
def test_a_map_that_meets_bytes_moves_to_a_dict_and_keeps_its_entries(seed: int) -> None:
    keymap = run_ops(seed, CLUSTERED, 300, bytes_from=150)
    assert not keymap.is_compiled


def test_colliding_keys_share_homes_and_wrap_around() -> None:
    homes = (np.array(COLLIDING, dtype=np.uint64) * SPREAD) >> home_shift(MIN_CAPACITY)
    assert sorted(set(homes.tolist())) == [0, 1, 2, 500, 1019, 1021, 1022, 1023]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.lists(st.sampled_from(COLLIDING), max_size=12)),
                max_size=40))
def test_keys_with_heavy_collisions(ops: list[tuple[bool, list[int]]]) -> None:
    keymap, model = EngineKeyMap(), {}
    for is_put, keys in ops:
        keys = list(dict.fromkeys(keys))
        if is_put:
            put(keymap, model, keys, [k % 1000 + 1 for k in keys], if_all_new=False)
        else:
            popped: list[int] = []
            keymap.pop_into(keys, popped)
            assert popped == [model.pop(k) for k in keys if k in model]
        assert len(keymap) == len(model)
        assert {k: keymap.get(k) for k in COLLIDING} == {k: model.get(k) for k in COLLIDING}


def test_integer_arrays_are_keys_too() -> None:
    keymap = EngineKeyMap()
    keys = np.array([3, 2**64 - 1], dtype=np.uint64)
    keymap.update(keymap.coerce(keys), np.array([30, 40], dtype=np.uint64), [30, 40])
    assert keymap.is_compiled and keymap.get(3) == 30
    popped: list[int] = []
    keymap.pop_into(np.array([3], dtype=np.int64), popped)
    assert popped == [30] and len(keymap) == 1
    assert int_keys(np.array([-1, 2], dtype=np.int64)) is None


def test_clearing_keeps_a_dict_map_a_dict() -> None:
    keymap = EngineKeyMap()
    keymap.update(keymap.coerce([b"a"]), np.array([1], dtype=np.uint64), [1])
    keymap.clear()
    assert not keymap.is_compiled and len(keymap) == 0 and keymap.get(b"a") is None


def test_only_exact_ints_in_range_go_in_the_arrays() -> None:
    assert int_keys([0, 2**64 - 1]).tolist() == [0, 2**64 - 1]
    # numpy would take each of these: b"12" as 12, 1.5 as 1, True as 1.
    for keys in ([b"12"], [1.5], [True], [-1], [2**64], [1, np.uint64(2)]):
        assert int_keys(keys) is None
    keymap = EngineKeyMap()
    assert keymap.get(b"12") is None and keymap.get(-1) is None and keymap.get(2**64) is None
    keymap.set(12, 5)
    assert keymap.get(b"12") is None and keymap.is_compiled


def test_removing_keys_the_arrays_cannot_hold_removes_nothing_else() -> None:
    keymap = EngineKeyMap()
    keymap.update(keymap.coerce([1, 2]), np.array([10, 20], dtype=np.uint64), [10, 20])
    popped: list[int] = []
    keymap.pop_into([b"x", 2, -5, 2**70], popped)
    assert popped == [20] and keymap.get(1) == 10 and keymap.is_compiled
    with pytest.raises(TypeError):  # unhashable, as in a dict; refused before any change
        keymap.pop_into([1, []], popped)
    assert keymap.get(1) == 10


def test_a_dict_map_keeps_what_it_removed_before_a_bad_key() -> None:
    keymap = EngineKeyMap()
    keymap.update(keymap.coerce([b"a", b"b"]), np.array([1, 2], dtype=np.uint64), [1, 2])
    popped: list[int] = []
    with pytest.raises(TypeError):
        keymap.pop_into([b"a", [], b"b"], popped)
    assert popped == [1] and keymap.get(b"a") is None and keymap.get(b"b") == 2


def test_memory_is_a_few_dozen_bytes_a_key() -> None:
    keymap = EngineKeyMap()
    keys = list(range(100_000))
    keymap.update(keymap.coerce(keys), np.array(keys, dtype=np.uint64), keys)
    assert keymap.estimate_bytes() / len(keymap) <= 4 * 17  # at least a quarter full
