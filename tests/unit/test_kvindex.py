"""Unit tests of the KV index: hashing, the tree, engine events, guessed entries."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
from array import array
from pathlib import Path

import pytest

from router.kvindex import (
    ROOT_HASH,
    AllCleared,
    KVIndex,
    RemovedBlocks,
    StoredBlocks,
    hash_token_blocks,
    root_hash,
)
from router.kvindex.hashing import hash_token_blocks_array, token_multipliers

REPO = Path(__file__).resolve().parents[2]


MASK = (1 << 64) - 1


def fmix64(x: int) -> int:
    x = (x ^ (x >> 33)) * 0xFF51AFD7ED558CCD & MASK
    x = (x ^ (x >> 33)) * 0xC4CEB9FE1A85EC53 & MASK
    return x ^ (x >> 33)


def reference_hashes(tokens: list[int], block_size: int, parent: int = ROOT_HASH) -> list[int]:
    """The documented construction, spelled out one block at a time with Python integers."""
    multipliers = token_multipliers(block_size)
    assert all(r % 2 == 1 for r in multipliers) and len(set(multipliers)) == block_size
    out, prev = [], parent
    for start in range(0, len(tokens) // block_size * block_size, block_size):
        block = tokens[start : start + block_size]
        total = 0x2545F4914F6CDD1D + sum(t * r for t, r in zip(block, multipliers, strict=True))
        content = fmix64(total & MASK)
        prev = (prev * 0x9E3779B97F4A7C15 + content) & MASK
        out.append(prev)
    return out


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- hashing ------------------------------------------------------------------------------------


def test_hashes_follow_the_documented_construction() -> None:
    tokens = list(range(1000, 1037))
    assert hash_token_blocks(tokens, 8) == reference_hashes(tokens, 8)
    assert len(hash_token_blocks(tokens, 8)) == 4  # the partial fifth block is dropped
    rng = random.Random(3)
    big = [rng.randrange(1 << 32) for _ in range(16 * 300)]  # token ids up to 2**32 - 1
    assert hash_token_blocks(big, 16) == reference_hashes(big, 16)
    assert hash_token_blocks(array("I", big), 16, parent=7) == reference_hashes(big, 16, 7)
    with pytest.raises(OverflowError):
        hash_token_blocks([1 << 32] * 16, 16)


def test_hashes_differ_for_every_change_of_a_block() -> None:
    rng = random.Random(4)
    tokens = [rng.randrange(50_000) for _ in range(64)]
    base = hash_token_blocks(tokens, 16)
    seen = set(base)
    for position in range(64):
        for new in (0, tokens[position] ^ 1, tokens[position] + (1 << 20)):
            if new == tokens[position]:
                continue
            changed = hash_token_blocks([*tokens[:position], new, *tokens[position + 1:]], 16)
            block = position // 16
            assert changed[:block] == base[:block]  # blocks before the change keep their hash
            assert all(h not in seen for h in changed[block:])  # this one and all after differ
    swapped = hash_token_blocks(tokens[16:32] + tokens[:16], 16)
    assert swapped[1] != base[1]
    zeros = hash_token_blocks([0] * 64, 16)
    assert len(set(zeros)) == 4 and ROOT_HASH not in zeros  # no fixed point at the root


def test_hashes_chain_from_a_parent() -> None:
    tokens = list(range(64))
    full = hash_token_blocks(tokens, 16)
    assert hash_token_blocks(tokens[16:], 16, parent=full[0]) == full[1:]
    assert hash_token_blocks(tokens[16:], 16) != full[1:]  # same tokens, other prefix


def test_hashes_are_stable_across_processes() -> None:
    code = "from router.kvindex import hash_token_blocks as h; print(h(list(range(48)), 16))"
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(result.stdout.strip())
    assert outputs == {str(hash_token_blocks(list(range(48)), 16))}


def test_lora_roots_differ() -> None:
    assert root_hash(None) == ROOT_HASH
    assert len({root_hash(None), root_hash(1), root_hash(2)}) == 3


def test_hashing_rejects_bad_input() -> None:
    assert hash_token_blocks([1, 2, 3], 4) == []
    with pytest.raises(ValueError):
        hash_token_blocks([1, 2], 0)
    with pytest.raises(OverflowError):
        hash_token_blocks([-1, 2], 2)


# -- tree ---------------------------------------------------------------------------------------


def test_match_counts_leading_blocks_per_replica() -> None:
    index = KVIndex()
    chain = hash_token_blocks(list(range(64)), 16)
    index.insert("a", chain)
    index.insert("b", chain[:2])
    assert index.match(chain) == {"a": 4, "b": 2}
    assert index.match(chain[:1]) == {"a": 1, "b": 1}
    assert index.match(hash_token_blocks(list(range(100, 132)), 16)) == {}
    assert index.match([]) == {}
    assert index.num_blocks == 4
    assert index.num_blocks_of("a") == 4 and index.num_blocks_of("b") == 2
    assert index.stats().num_blocks_by_replica == {"a": 4, "b": 2}
    assert index.chains_of("a") == frozenset(chain) and index.chains_of("b") == set(chain[:2])
    assert index.chains_of("missing") == frozenset()


def test_match_stops_at_the_first_missing_block() -> None:
    index = KVIndex()
    chain = hash_token_blocks(list(range(64)), 16)
    index.insert("a", chain)
    index.remove("a", [chain[1]])
    assert index.match(chain) == {"a": 1}  # blocks 2 and 3 are held but not contiguous


def test_remove_replica_frees_its_slot_for_a_newcomer() -> None:
    index = KVIndex()
    chain = hash_token_blocks(list(range(32)), 16)
    index.insert("a", chain)
    index.insert("b", chain[:1])
    index.remove_replica("a")
    assert index.match(chain) == {"b": 1}
    index.insert("c", [])  # reuses a's slot; must not inherit its blocks
    assert index.match(chain) == {"b": 1}
    assert index.replica_ids() == ["b", "c"]
    index.remove_replica("missing")  # no-op


def test_clear_replica_keeps_it_registered() -> None:
    index = KVIndex()
    chain = hash_token_blocks(list(range(32)), 16)
    index.insert("a", chain)
    index.clear_replica("a")
    assert index.match(chain) == {} and index.num_blocks == 0
    assert index.replica_ids() == ["a"] and index.is_event_fed("a")


def test_a_hash_given_twice_is_one_block() -> None:
    index = KVIndex()
    chain = hash_token_blocks(list(range(32)), 16)
    index.insert("a", [chain[0], chain[0], chain[1]])
    assert index.num_blocks_of("a") == 2 and index.match(chain) == {"a": 2}
    index.remove("a", [chain[0]])
    assert index.num_blocks_of("a") == 1 and index.match(chain) == {}


def test_a_removal_with_an_unhashable_key_leaves_table_and_maps_in_step() -> None:
    index = KVIndex()
    tokens = list(range(32))
    chain = hash_token_blocks(tokens, 16)
    index.insert("a", chain)  # int keys: compiled, the removal is refused before any change
    index.apply("b", StoredBlocks([b"k0", b"k1"], None, tokens, 16))  # bytes keys: a dict
    with pytest.raises(TypeError):
        index.remove("a", [chain[1], [], chain[0]])  # an unhashable key in the middle
    with pytest.raises(TypeError):
        index.apply("b", RemovedBlocks([b"k1", [], b"k0"]))  # k1 goes before the bad key
    assert index.match(chain) == {"a": 2, "b": 1}  # k1's block is gone from the table too
    for replica in ("a", "b"):
        index.clear_replica(replica)  # what the event subscriber does after a failed event
    assert index.match(chain) == {} and index.num_blocks == 0


def test_hashes_given_as_an_array_work_like_a_list() -> None:
    index = KVIndex()
    tokens = list(range(48))
    chain = hash_token_blocks(tokens, 16)
    index.insert("a", hash_token_blocks_array(tokens, 16))
    index.insert("a", hash_token_blocks_array(tokens[:32], 16))  # a replay
    assert index.match(chain) == {"a": 3} and index._replicas["a"].blocks.is_compiled
    index.remove("a", hash_token_blocks_array(tokens, 16)[1:2])
    assert index.match(chain) == {"a": 1} and index.num_blocks_of("a") == 2


def test_an_engine_that_switches_to_bytes_keeps_what_it_held() -> None:
    index = KVIndex()
    tokens = list(range(48))
    chain = hash_token_blocks(tokens, 16)
    index.apply("a", StoredBlocks([11, 12], None, tokens[:32], 16))
    index.apply("b", StoredBlocks([21], None, tokens[:16], 16))
    assert index.stats().dict_keyed_replicas == ()
    index.apply("a", StoredBlocks([b"third"], 12, tokens[32:], 16))  # an int parent, bytes key
    assert index.match(chain) == {"a": 3, "b": 1}
    assert index.stats().dict_keyed_replicas == ("a",)  # exported by the router's metrics
    index.apply("a", RemovedBlocks([12]))
    assert index.match(chain) == {"a": 1, "b": 1} and index.num_blocks_of("a") == 2


def test_a_guess_with_a_hash_out_of_range_records_nothing() -> None:
    index = KVIndex()
    with pytest.raises(OverflowError):
        index.record_routed("g", [1, 2**64], ttl_s=10.0)
    assert index.num_blocks_of("g") == 0 and index.chains_of("g") == frozenset()


def test_more_replicas_than_one_mask_word_match_alike() -> None:
    index = KVIndex()
    chain = hash_token_blocks(list(range(160)), 16)  # 10 blocks
    for i in range(150):  # three 64-bit words of replicas
        index.insert(f"r{i}", chain[: i % 10])
    assert index.match(chain) == {f"r{i}": i % 10 for i in range(150) if i % 10}
    assert index.num_blocks == 9
    index.remove_replica("r9")
    index.remove_replica("r19")
    index.remove_replica("r129")
    assert index.match(chain).get("r139") == 9 and "r129" not in index.match(chain)
    for i in range(150):
        if i % 10 == 9:
            index.remove_replica(f"r{i}")
    assert index.num_blocks == 8  # the ninth block is held by no one now


# -- engine events ------------------------------------------------------------------------------


def test_events_map_engine_hashes_to_own_hashes() -> None:
    index = KVIndex()
    tokens = list(range(48))
    chain = hash_token_blocks(tokens, 16)
    index.apply("p", StoredBlocks(["e1", "e2"], None, tokens[:32], 16))
    index.apply("p", StoredBlocks(["e3"], "e2", tokens[32:], 16))
    assert index.match(chain) == {"p": 3}
    index.apply("p", RemovedBlocks(["e3", "unknown"]))
    assert index.match(chain) == {"p": 2}
    index.apply("p", AllCleared())
    assert index.match(chain) == {}


def test_stored_block_with_unknown_parent_is_counted_and_dropped() -> None:
    index = KVIndex()
    index.apply("p", StoredBlocks(["e9"], "never-seen", list(range(16)), 16))
    assert index.num_blocks == 0
    assert index.stats().num_orphan_blocks == 1


def test_events_for_other_media_are_ignored() -> None:
    index = KVIndex()
    index.apply("p", StoredBlocks(["e1"], None, list(range(16)), 16, medium="CPU"))
    index.apply("p", RemovedBlocks(["e1"], medium="CPU"))
    assert index.num_blocks == 0 and index.stats().num_ignored_events == 2


def test_lora_blocks_are_distinct_from_base_blocks() -> None:
    index = KVIndex()
    tokens = list(range(16))
    index.apply("p", StoredBlocks(["e1"], None, tokens, 16, lora_id=3))
    assert index.match(hash_token_blocks(tokens, 16)) == {}
    assert index.match(hash_token_blocks(tokens, 16, parent=root_hash(3))) == {"p": 1}


def test_two_engine_hashes_for_one_block_need_two_removals() -> None:
    index = KVIndex()
    tokens = list(range(16))
    chain = hash_token_blocks(tokens, 16)
    index.apply("p", StoredBlocks(["salt-a"], None, tokens, 16))
    index.apply("p", StoredBlocks(["salt-b"], None, tokens, 16))
    index.apply("p", RemovedBlocks(["salt-a"]))
    assert index.match(chain) == {"p": 1}
    index.apply("p", RemovedBlocks(["salt-b"]))
    assert index.match(chain) == {}


def test_bad_event_is_rejected() -> None:
    index = KVIndex()
    with pytest.raises(ValueError):
        index.apply("p", StoredBlocks(["e1", "e2"], None, list(range(16)), 16))
    with pytest.raises(TypeError):
        index.apply("p", "not an event")  # type: ignore[arg-type]


# -- guessed replicas ---------------------------------------------------------------------------


def test_guesses_expire(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    index = KVIndex(clock=clock)
    chain = hash_token_blocks(list(range(48)), 16)
    with caplog.at_level(logging.WARNING, logger="router.kvindex.index"):
        assert index.record_routed("g", chain, ttl_s=10.0)
        index.record_routed("g", chain[:1], ttl_s=30.0)
    assert sum("publishes no KV cache events" in r.message for r in caplog.records) == 1
    assert index.match(chain) == {"g": 3}
    clock.now += 10.0
    assert index.match(chain) == {"g": 1}  # the first block was refreshed for 30 s
    clock.now += 20.0
    assert index.match(chain) == {} and index.num_blocks == 0
    stats = index.stats()
    assert stats.guessed_replicas == ("g",) and stats.event_fed_replicas == ()
    assert stats.num_blocks_by_replica == {"g": 0} and index.chains_of("g") == frozenset()


def test_event_fed_replicas_ignore_guesses_and_guessed_ones_switch_on_events() -> None:
    index = KVIndex(clock=FakeClock())
    tokens = list(range(32))
    chain = hash_token_blocks(tokens, 16)
    index.add_replica("e", is_event_fed=True)
    assert not index.record_routed("e", chain, ttl_s=5.0)
    assert index.match(chain) == {}
    index.record_routed("g", chain, ttl_s=5.0)
    assert not index.is_event_fed("g")
    index.apply("g", StoredBlocks(["x"], None, tokens[:16], 16))  # starts publishing
    assert index.is_event_fed("g") and index.match(chain) == {"g": 1}


def test_memory_estimate_grows_with_blocks() -> None:
    index = KVIndex()
    empty = index.estimate_memory_bytes()
    index.insert("a", hash_token_blocks(list(range(1600)), 16))
    assert index.estimate_memory_bytes() > empty + 100 * 64


def test_match_depths_past_gaps() -> None:
    """Each replica's matched depth, wherever it stops; blocks past a gap do not count."""
    rng = random.Random(3)
    index = KVIndex()
    chains = [rng.getrandbits(64) for _ in range(20)]
    depths = {"a": 0, "b": 1, "c": 3, "d": 7, "e": 20, "f": 13}
    for replica, depth in depths.items():
        index.add_replica(replica, is_event_fed=False)
        index.insert(replica, chains[:depth])
    index.insert("a", chains[5:9])
    want = {r: d for r, d in depths.items() if d}
    assert index.match(chains) == want
    assert index.match(chains[:10]) == {r: min(d, 10) for r, d in want.items()}
    assert index.match([]) == {}
    assert index.match([rng.getrandbits(64)] + chains) == {}
